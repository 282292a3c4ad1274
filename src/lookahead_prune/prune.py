"""``prune()``: score, select and apply masks, with the paper's orders, -seq steps and scopes.

Everything is validated and every mask computed on detached copies of the weights before the
model is touched, so an error leaves the model exactly as it was.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .data_scores import MEASURES, Data, measure
from .graph import (
    GraphError,
    LayerGraph,
    build_graph,
    canonical,
    check_graph_mode,
    from_canonical,
    layer_type,
    layers_only,
    prunable_layers,
    weight_name,
)
from .graph.capture import ExampleInputs
from .masks import (
    apply_mask,
    current_mask,
    effective_weight,
    global_masks,
    nm_groups_fit,
    nm_mask,
    parse_nm,
    top_k_mask,
)
from .masks import is_masked as masks_is_masked
from .scores import SCORES, Neighbourhood, scale_rows, score_function, score_spec

ORDERS = ("base", "forward", "backward")
SCOPES = ("layer", "global")
SEQ_STEPS = 5  # the paper's -seq variants split the budget into five rounds

Keep = float | str | Mapping[str, float]  # a str is an N:M pattern: "2:4"


@dataclass(frozen=True)
class MethodSpec:
    """A method name resolved into score, order and number of steps."""

    score: str
    order: str
    steps: int

    @property
    def name(self) -> str:
        """The one canonical spelling (``lap``, ``lap-forward-seq``; steps other than 1 and 5
        have no name and show as ``-steps3``), so aliases share one run key."""
        name = self.score + ("" if self.order == "base" else f"-{self.order}")
        if self.steps == SEQ_STEPS:
            return name + "-seq"
        return name if self.steps == 1 else f"{name}-steps{self.steps}"


def canonical_method(method: str) -> str:
    """``LAP``, ``lap-base`` and ``Lap-Base`` all become ``lap``; unknown names raise."""
    return parse_method(method).name


def parse_method(method: str, order: str | None = None, steps: int | None = None) -> MethodSpec:
    """Resolve shorthands like ``lap-forward-seq`` into (score ``lap``, order, 5 steps)."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, not {type(method).__name__}")
    parts = method.lower().split("-")
    cut = next((i for i in range(len(parts), 0, -1) if "-".join(parts[:i]) in SCORES), 1)
    base, rest = "-".join(parts[:cut]), parts[cut:]  # the longest registered name: lap-act
    implied_steps = None
    if rest and rest[-1] == "seq":
        implied_steps, rest = SEQ_STEPS, rest[:-1]
    implied_order = rest[0] if len(rest) == 1 and rest[0] in ORDERS else None
    if len(rest) > 1 or (rest and implied_order is None):
        score_function(method)  # raises the list of known methods
    score_function(base)
    for given, implied, what in ((order, implied_order, "order"), (steps, implied_steps, "steps")):
        if given is not None and implied is not None and given != implied:
            raise ValueError(f"method {method!r} implies {what}={implied!r}, but got {given!r}")
    order = order or implied_order or "base"
    steps = steps if steps is not None else (implied_steps or 1)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, not {steps!r}")
    return MethodSpec(base, order, steps)


@dataclass(frozen=True)
class LayerResult:
    """How many weights of one layer survive."""

    name: str
    kind: str
    shape: tuple[int, ...]
    total: int
    kept: int

    @property
    def keep(self) -> float:
        """Fraction of this layer's weights that survive."""
        return self.kept / self.total


@dataclass(frozen=True)
class PruneReport:
    """What ``prune`` did: method, settings and the per-layer survivor counts.

    ``layers`` are the layers that carry a mask (pruned now, or before and counting toward
    the fraction); ``keep``, ``kept`` and ``total`` are over those alone. Prunable layers left
    dense (``exclude``, or left out of a keep dict or ``layers``) are apart in ``excluded``.
    """

    method: str
    order: str
    steps: int
    scope: str
    layers: tuple[LayerResult, ...]
    dense: tuple[tuple[str, str], ...] = ()  # weight tensors left dense: (name, why)
    approximated: tuple[tuple[str, str], ...] = ()  # strict=False: layer, what was opened
    excluded: tuple[LayerResult, ...] = ()  # prunable layers left dense, all weights kept

    @property
    def total(self) -> int:
        """Number of weights in the pruned layers."""
        return sum(r.total for r in self.layers)

    @property
    def kept(self) -> int:
        """Number of surviving weights in the pruned layers."""
        return sum(r.kept for r in self.layers)

    @property
    def keep(self) -> float:
        """Fraction of the pruned layers' weights that survive (1.0 when none is pruned)."""
        return self.kept / self.total if self.total else 1.0

    @property
    def keep_overall(self) -> float:
        """Fraction over every prunable layer, the ones left dense counted whole: what
        ``keep`` meant before excluded layers were reported apart, and what a results
        database stores as ``keep``."""
        total = self.total + sum(r.total for r in self.excluded)
        return (self.kept + sum(r.kept for r in self.excluded)) / total

    def table(self) -> str:
        """A plain-text table of layers, survivors and kept fractions."""
        k = max([6, *(len(r.kind) for r in self.layers)])
        n = max([28, *(len(r.name) for r in self.layers)])
        head = f"{'layer':<{n}} {'kind':<{k}} {'shape':<20} {'kept':>10} {'total':>10} {'keep':>8}"
        lines = [
            f"method={self.method} order={self.order} steps={self.steps} scope={self.scope}",
            head,
            "-" * len(head),
        ]
        for r in self.layers:
            shape = "x".join(map(str, r.shape))
            lines.append(
                f"{r.name:<{n}} {r.kind:<{k}} {shape:<20} {r.kept:>10} {r.total:>10} "
                f"{100 * r.keep:>7.2f}%"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'total':<{n}} {'':<{k}} {'':<20} {self.kept:>10} {self.total:>10} "
            f"{100 * self.keep:>7.2f}%"
        )
        if self.excluded:
            n_dense = sum(r.total for r in self.excluded)
            lines.append(
                f"left dense: {len(self.excluded)} prunable layers, {n_dense} weights "
                f"(over every prunable layer {100 * self.keep_overall:.2f}% kept)"
            )
        for name, why in self.dense:
            lines.append(f"dense: {name} ({why})")
        for name, why in self.approximated:
            lines.append(f"approximated (strict=False): {name}: {why}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _check_fraction(value: object, where: str) -> float:
    """A keep fraction as a float: any real scalar (Python, NumPy, a 0-d tensor or array)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # 0-d tensor or array (NumPy scalars give their Python value too)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        nm = " or an N:M pattern such as '2:4'" if where == "keep" else ""
        raise TypeError(f"{where} must be a number in (0, 1]{nm}, not {value!r}")
    value = float(value)
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"{where} must be in (0, 1], got {value!r}")
    return value


def _targets(keep: Keep, names: Sequence[str], layers: Iterable[str] | None) -> dict[str, float]:
    """Per-layer keep fractions to reach, validated against the model's prunable layers."""
    known = set(names)
    if layers is not None:
        layers = list(layers)
        unknown = [n for n in layers if n not in known]
        if unknown:
            raise ValueError(f"unknown layers {unknown}; prunable layers are {list(names)}")
        names = [n for n in names if n in set(layers)]
    if isinstance(keep, Mapping):
        unknown = [n for n in keep if n not in known]
        if unknown:
            raise ValueError(
                f"keep names layers that are not prunable layers of the model: {unknown}; "
                f"prunable layers are {list(names)}"
            )
        return {n: _check_fraction(keep[n], f"keep[{n!r}]") for n in names if n in keep}
    value = _check_fraction(keep, "keep")
    return dict.fromkeys(names, value)


def excluded_layers(names: Iterable[str], exclude: Iterable[str]) -> frozenset[str]:
    """The layer names matched by ``exclude`` (exact names or ``fnmatch`` patterns).

    A pattern that matches no layer is an error, so a typo cannot silently prune a layer
    that was meant to stay dense.
    """
    if isinstance(exclude, str):
        exclude = [exclude]
    names = list(names)
    matched: set[str] = set()
    for pattern in exclude:
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            raise ValueError(
                f"exclude pattern {pattern!r} matches no prunable layer; layers are {names}"
            )
        matched |= hits
    return frozenset(matched)


def _for_scoring(weight: Tensor) -> Tensor:
    """Half-precision weights are scored in float32: bf16 has too few distinct values to rank."""
    return weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight


def _check_finite(weights: Mapping[str, Tensor]) -> None:
    for name, w in weights.items():
        if bool(torch.isfinite(w.sum())):  # any NaN/inf makes the sum non-finite
            continue
        if not bool(torch.isfinite(w).all()):
            bad = int((~torch.isfinite(w)).sum())
            raise ValueError(
                f"layer '{name}' has {bad} NaN/inf weights; scores would be meaningless. "
                "Fix the model (e.g. a diverged training run) before pruning."
            )


def _score_layers(
    names: Iterable[str],
    method: str,
    graph: LayerGraph,
    weights: Mapping[str, Tensor],
    bn: bool,
    generator: torch.Generator | None,
    measured: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    names = list(names)
    dead = [n for n in names if n in graph.unreached]
    if dead:
        raise GraphError(
            f"prunable modules {dead} are never called in the traced forward(); "
            "leave them out with layers=[...] or a keep dict."
        )
    fn = score_function(method)
    out = {}
    for n in names:
        nb = Neighbourhood(graph[n], weights, bn=bn, generator=generator, measured=measured)
        out[n] = fn(nb, graph)
        if not bool(torch.isfinite(out[n]).all()):
            raise ValueError(
                f"layer '{n}' gets NaN/inf {method} scores; check the batch-norm "
                "statistics and weights of its neighbours."
            )
    return out


def _measured(
    method: str,
    model: nn.Module,
    data: Data | None,
    targets: Iterable[str],
    weights: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """For a data score: the weights it ranks and the statistics it reads, measured once.

    Row scales apply to every layer (they change the neighbours too); others to the targets.
    """
    need = score_spec(method).data
    if need is None:
        return weights, None
    rows = MEASURES[need].scales_rows
    stats = measure(need, method, model, data, list(weights if rows else targets))
    if rows:
        return scale_rows(weights, stats), None
    # per-weight statistics (OBD's Hessian) come in the module's layout: view them as scored
    modules = dict(model.named_modules())
    return weights, {
        n: canonical(modules[n], t)
        if t.shape == getattr(modules[n], weight_name(modules[n])).shape
        else t
        for n, t in stats.items()
    }


def _schedule(final: int, start: int, steps: int) -> list[int]:
    """Survivor counts after steps 1..steps, ending exactly at ``final``."""
    if final >= start:
        return [final] * steps
    return [round(start - (start - final) * s / steps) for s in range(1, steps + 1)]


def _graph_for(
    method: str,
    model: nn.Module,
    mode: str,
    example_inputs: ExampleInputs,
    skip: frozenset[str] = frozenset(),
    strict: bool = True,
) -> LayerGraph:
    """The traced graph for methods that look at neighbours; bare layers for the others.

    MP, RP, LAMP and OBD never read a neighbour, so they skip tracing (and work on any model).
    """
    if score_spec(method).needs_neighbours:
        graph = build_graph(model, mode, example_inputs, skip=skip, strict=strict)
        if graph.approximated:
            warnings.warn(
                f"strict=False: the neighbours of {sorted(graph.approximated)} could not all "
                "be followed; those sides get a factor of 1 (see the report)",
                stacklevel=4,
            )
        return graph
    check_graph_mode(mode)
    return layers_only(model)


def _normalised(scores: Mapping[str, Tensor], power: float | None) -> dict[str, Tensor]:
    """Per-layer normalisation for global scope, as the official code: s^p / ‖s^p‖ with the
    method's power (the official LAP score is ours squared, its MP is |w|); ``None``: as is."""
    if power is None:
        return dict(scores)
    out = {}
    for n, s in scores.items():
        sp = s.float().pow(power)
        norm = torch.linalg.vector_norm(sp)
        out[n] = sp / norm if norm > 0 else sp
    return out


def _refuse_tied_weights(
    model: nn.Module, modules: Mapping[str, nn.Module], targets: Iterable[str]
) -> None:
    """Refuse to prune a weight that several places share (tied embeddings, reused layers).

    A mask lives on one module; the other users of the same Parameter would keep reading the
    unmasked tensor, so the tie would break silently and the kept counts would be wrong.
    """
    users: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        users.setdefault(param.data_ptr(), []).append(name)
    for name in targets:
        module = modules[name]
        wn = weight_name(module)
        weight = getattr(module, f"{wn}_orig", None)
        weight = weight if isinstance(weight, Tensor) else getattr(module, wn)
        shared = sorted(set(users.get(weight.data_ptr(), [])))
        own = {f"{name}.{attr}" if name else attr for attr in (wn, f"{wn}_orig")}
        others = [n for n in shared if n not in own]
        if others:
            raise ValueError(
                f"layer '{name}' shares its weight with {others} (tied parameters): one mask "
                f"cannot keep the tie; untie them or pass exclude=['{name}'] to leave it dense"
            )


def compute_masks(
    model: nn.Module,
    method: str = "lap",
    keep: Keep = 0.1,
    *,
    order: str | None = None,
    steps: int | None = None,
    scope: str = "layer",
    bn: bool = True,
    normalize: bool = True,
    graph: str = "fx",
    example_inputs: ExampleInputs = None,
    layers: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    seed: int = 0,
    data: Data | None = None,
    strict: bool = True,
) -> tuple[dict[str, Tensor], MethodSpec]:
    """The masks ``prune`` would apply, without touching the model (same arguments)."""
    spec = parse_method(method, order, steps)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
    modules = prunable_layers(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no prunable layers (nn.Linear/Conv).")
    skip = excluded_layers(modules, exclude)
    nm = parse_nm(keep) if isinstance(keep, str) and ":" in keep else None
    if nm is not None:
        if scope != "layer":
            raise ValueError(f"an N:M keep ({keep!r}) is per group of weights; use scope='layer'")
        keep = nm[0] / nm[1]
    targets = _targets(keep, list(modules), layers)
    asked = set(keep) if isinstance(keep, Mapping) else set(layers or ())
    if asked & skip:
        raise ValueError(f"layers {sorted(asked & skip)} are both excluded and asked to be pruned")
    targets = {n: v for n, v in targets.items() if n not in skip}
    _refuse_tied_weights(model, modules, targets)
    if scope == "global":
        if isinstance(keep, Mapping):
            raise ValueError("scope='global' takes one overall keep fraction, not a dict")
        if spec.order != "base":
            raise ValueError("scope='global' prunes all layers at once; use order='base'")
    for n in targets:
        why = _unmaskable(modules[n])
        if why:
            raise ValueError(f"layer '{n}': {why}, or pass exclude=['{n}'] to leave it dense")
    weights = _canonical_weights(modules)  # read-only, viewed [out, in/groups, ...]
    if nm is not None:  # layers whose input axis does not split into groups of M stay dense
        targets = {n: v for n, v in targets.items() if nm_groups_fit(weights[n].shape, nm[1])}
    _check_finite(weights)
    alive = {n: canonical(modules[n], _mask_of(modules[n])) for n in targets}
    layer_graph = _graph_for(spec.score, model, graph, example_inputs, skip, strict)
    _score_layers(
        [n for n in targets if n in layer_graph.unreached],
        spec.score,
        layer_graph,
        weights,
        bn,
        None,
    )  # raises if a pruned layer is never called
    weights, measured = _measured(spec.score, model, data, targets, weights)
    generator = torch.Generator().manual_seed(seed)
    totals = {n: weights[n].numel() for n in targets}
    start = {n: int(torch.count_nonzero(alive[n])) for n in targets}
    finals = {n: round(targets[n] * totals[n]) for n in targets}
    for n in targets if scope == "layer" else ():
        if finals[n] > start[n]:
            warnings.warn(
                f"layer '{n}' already keeps {start[n]} of {totals[n]} weights, fewer than the "
                f"{finals[n]} asked for; pruned weights are never revived, so it stays as is.",
                stacklevel=3,
            )
    if scope == "global":
        if not targets:
            return {}, spec
        total_final = round(targets[next(iter(targets))] * sum(totals.values()))
        if total_final > sum(start.values()):
            warnings.warn(
                "the model already keeps fewer weights than asked for; nothing is "
                "revived, so the layers stay as they are.",
                stacklevel=3,
            )
        plan = _schedule(total_final, sum(start.values()), spec.steps)
        for step, k in enumerate(plan):
            scores = _score_layers(
                targets, spec.score, layer_graph, weights, bn, generator, measured
            )
            if normalize:
                scores = _normalised(scores, score_spec(spec.score).global_power)
            alive = global_masks(scores, k, alive)
            if step + 1 < len(plan):
                weights = weights | {n: weights[n] * alive[n] for n in targets}
        return _own_layout(modules, alive), spec
    plans = {n: _schedule(finals[n], start[n], spec.steps) for n in targets}
    if nm is not None:  # survivors per group of M, reaching N in spec.steps rounds
        per_group = _schedule(nm[0], nm[1], spec.steps)

        def select(n: str, score: Tensor, step: int) -> Tensor:
            return nm_mask(score, per_group[step], nm[1], alive[n])
    else:

        def select(n: str, score: Tensor, step: int) -> Tensor:
            return top_k_mask(score, plans[n][step], alive[n])

    ordered = [n for n in layer_graph.names() if n in targets]
    if spec.order == "backward":
        ordered.reverse()
    for step in range(spec.steps):
        last = step + 1 == spec.steps
        if spec.order == "base":
            scores = _score_layers(
                ordered, spec.score, layer_graph, weights, bn, generator, measured
            )
            for n in ordered:
                alive[n] = select(n, scores[n], step)
            if not last:
                weights = weights | {n: weights[n] * alive[n] for n in ordered}
        else:
            for i, n in enumerate(ordered):
                score = _score_layers(
                    [n], spec.score, layer_graph, weights, bn, generator, measured
                )[n]
                alive[n] = select(n, score, step)
                if not (last and i + 1 == len(ordered)):
                    weights = weights | {n: weights[n] * alive[n]}
    return _own_layout(modules, alive), spec


def prune(
    model: nn.Module,
    method: str = "lap",
    keep: Keep = 0.1,
    *,
    order: str | None = None,
    steps: int | None = None,
    scope: str = "layer",
    bn: bool = True,
    normalize: bool = True,
    graph: str = "fx",
    example_inputs: ExampleInputs = None,
    layers: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    seed: int = 0,
    data: Data | None = None,
    strict: bool = True,
) -> PruneReport:
    """Prune ``model`` in place so that a ``keep`` fraction of weights survives; see DESIGN.md.

    ``keep`` is one fraction for every prunable layer (or the overall fraction with
    ``scope='global'``), or a dict from layer name to fraction (other layers are left alone),
    or an N:M pattern such as ``"2:4"``: in every group of M consecutive weights along each
    layer's input axis (input channels innermost for convolutions) the N best survive; -seq
    variants reach N in steps; layers whose input size is not a multiple of M stay dense.
    ``method`` is ``mp``, ``rp``, ``lap``, ``lfp``, ``lbp``, ``lamp``, a data score (``lap-act``,
    ``obd``: pass examples as ``data=(x, y)`` or ``data=x``) or a shorthand such as
    ``lap-forward-seq``; ``order``/``steps`` give LAP-forward/backward and the -seq variants.
    With ``scope='global'`` and ``normalize`` each layer's scores are normalised as the
    official code does (:attr:`Score.global_power`).
    ``bn=False`` drops Eq. 9's batch-norm factors; ``graph='sequential'`` chains layers in
    module order like the official code. ``exclude`` (names or glob patterns) leaves layers
    unpruned and, with ``graph='sequential'``, out of the chain too, as the official code
    treats ResNet shortcuts. Masks are applied with ``torch.nn.utils.prune``.
    A layer left with no weight at all gets a warning that names it. ``strict=False`` gives
    layers whose neighbours cannot all be followed a factor of 1 there (named in a warning
    and the report) instead of failing. The report lists every weight tensor left dense.
    """
    if torch.is_inference_mode_enabled():
        raise ValueError(
            "prune() was called under torch.inference_mode(): its masks would be inference "
            "tensors that training can never use; call it outside (torch.no_grad() is fine)"
        )
    masks, spec = compute_masks(
        model,
        method,
        keep,
        order=order,
        steps=steps,
        scope=scope,
        bn=bn,
        normalize=normalize,
        graph=graph,
        example_inputs=example_inputs,
        layers=layers,
        exclude=exclude,
        seed=seed,
        data=data,
        strict=strict,
    )
    modules = prunable_layers(model)
    for name, mask in masks.items():
        apply_mask(modules[name], mask, weight_name(modules[name]))
    results, left = [], []
    for name, module in modules.items():
        mask = _mask_of(module)
        kind = layer_type(module).name
        result = LayerResult(name, kind, tuple(mask.shape), mask.numel(), int(mask.sum()))
        (results if name in masks or is_masked(module) else left).append(result)
    emptied = [r.name for r in results if r.kept == 0 and r.name in masks]
    if emptied:
        warnings.warn(
            f"layers {emptied} keep no weight at all (keep too small for their size): the "
            "network is cut there and its output no longer depends on the input",
            stacklevel=2,
        )
    nm_dense: tuple[tuple[str, str], ...] = ()
    if isinstance(keep, str):  # an N:M pattern (compute_masks refused anything else)
        m = parse_nm(keep)[1]
        nm_dense = tuple(
            (f"{n}.{weight_name(mod)}", f"input size not a multiple of {m} for {keep}")
            for n, mod in modules.items()
            if n not in masks
            and not nm_groups_fit(tuple(canonical(mod, _mask_of(mod)).shape), m)
            and n not in excluded_layers(modules, exclude)
        )
    approximated = ()
    cached = _graph_cache_entry(model)
    if cached is not None and score_spec(spec.score).needs_neighbours:
        approximated = tuple(sorted(cached.approximated.items()))
    return PruneReport(
        spec.score,
        spec.order,
        spec.steps,
        scope,
        tuple(results),
        tuple(
            d
            for d in dense_weights(model, set(masks), excluded_layers(modules, exclude))
            if d[0] not in dict(nm_dense)
        )
        + nm_dense,
        approximated,
        tuple(left),
    )


def _graph_cache_entry(model: nn.Module) -> LayerGraph | None:
    from .graph import _CACHE

    entry = _CACHE.get(model)
    return None if entry is None else entry[1]


def _canonical_weights(modules: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """Effective weights viewed ``[out, in/groups, ...]`` (transposed types converted)."""
    return {
        n: _for_scoring(canonical(m, effective_weight(m, weight_name(m))))
        for n, m in modules.items()
    }


def _mask_of(module: nn.Module) -> Tensor:
    """The current mask of the parameter a prunable module has pruned."""
    return current_mask(module, weight_name(module))


def is_masked(module: nn.Module) -> bool:
    """Whether a prunable module's weight carries a mask (it was pruned, now or before):
    ``torch.nn.utils.prune``'s ``weight_mask``, or a :class:`~.masks.WeightMask`
    parametrisation on a weight-normalised weight (where ``prune.is_pruned`` says False)."""
    return masks_is_masked(module, weight_name(module))


_OLD_HOOKS = {
    "WeightNorm": ("weight_norm", "remove_weight_norm"),
    "SpectralNorm": ("spectral_norm", "remove_spectral_norm"),
}


def _unmaskable(module: nn.Module) -> str | None:
    """Why a layer's weight cannot be masked (with the fix), or None when it can."""
    wn = weight_name(module)
    for hook in module._forward_pre_hooks.values():
        kind = _OLD_HOOKS.get(type(hook).__name__)
        if kind is not None and getattr(hook, "name", wn) == wn:
            return (
                f"its weight is computed by the hook-based torch.nn.utils.{kind[0]}, which no "
                f"mask can follow; switch to torch.nn.utils.parametrizations.{kind[0]} (after "
                f"torch.nn.utils.{kind[1]}), which is pruned like any layer"
            )
    if hasattr(module, f"{wn}_orig") and hasattr(module, f"{wn}_mask"):
        return None  # torch.nn.utils.prune's reparametrisation
    if parametrize.is_parametrized(module, wn):
        return None  # masked as one more parametrisation
    if isinstance(module._parameters.get(wn), nn.Parameter):
        return None
    return (
        f"its weight is a {type(getattr(module, wn, None)).__name__}, not a parameter or a "
        f"parametrised one; register it with torch.nn.utils.parametrize"
    )


def _weight_params(module: nn.Module, wn: str) -> set[str]:
    """The module's own parameters its weight is made of: the weight, torch prune's
    ``weight_orig``, the hook-based weight norm's ``weight_g``/``weight_v``."""
    return {wn, f"{wn}_orig", f"{wn}_g", f"{wn}_v"}


def _own_layout(modules: Mapping[str, nn.Module], masks: Mapping[str, Tensor]) -> dict:
    """Masks from the canonical view back in each module's own weight layout."""
    return {n: from_canonical(modules[n], m) for n, m in masks.items()}


def dense_weights(
    model: nn.Module, pruned: set[str], excluded: Iterable[str] = ()
) -> tuple[tuple[str, str], ...]:
    """Every weight tensor (2-D or more) this prune left dense, and why."""
    excluded = set(excluded)
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    out, seen = [], set()
    mods = list(model.named_modules())
    mods.sort(key=lambda nm: layer_type(nm[1]) is None)  # a tied weight under its layer's name
    by_name = dict(mods)
    for mname, module in mods:
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() < 2 or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            layer = _layer_owning(mname, module, pname, by_name)
            if layer is not None and layer in pruned:
                continue
            tied = [o for o in owners[id(p)] if o != full]
            if layer is not None:
                why = "excluded" if layer in excluded else "not asked for"
                if is_masked(by_name[layer]):
                    continue  # pruned before, not now: it keeps its mask
            else:
                why = f"not prunable ({type(module).__name__}.{pname})"
            if tied:
                why += f", tied to {', '.join(tied)}"
            out.append((full, why))
    return tuple(out)


def _layer_owning(
    mname: str, module: nn.Module, pname: str, by_name: Mapping[str, nn.Module]
) -> str | None:
    """The prunable layer whose weight parameter ``pname`` of ``module`` makes, or None:
    the layer's own weight (or ``weight_orig``, ``weight_g``/``weight_v``), or an original
    of a parametrised weight (``<layer>.parametrizations.weight.original0``)."""
    if layer_type(module) is not None:
        return mname if pname in _weight_params(module, weight_name(module)) else None
    parts = mname.split(".")
    if isinstance(module, parametrize.ParametrizationList) and len(parts) >= 2:
        owner = ".".join(parts[:-2])
        layer = by_name.get(owner)
        if layer is not None and layer_type(layer) is not None and parts[-1] == weight_name(layer):
            return owner
    return None


def compute_scores(
    model: nn.Module,
    method: str = "lap",
    *,
    bn: bool = True,
    graph: str = "fx",
    example_inputs: ExampleInputs = None,
    exclude: Iterable[str] = (),
    seed: int = 0,
    data: Data | None = None,
    strict: bool = True,
) -> dict[str, Tensor]:
    """Scores of every prunable layer's weights, keyed by qualified module name.

    Layers matched by ``exclude`` get no score (and leave the sequential chain).
    """
    spec = parse_method(method)
    if spec.order != "base" or spec.steps != 1:
        raise ValueError(
            f"compute_scores takes a plain score method ({', '.join(sorted(SCORES))}); "
            f"orders and -seq steps only make sense inside prune()"
        )
    modules = prunable_layers(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no prunable layers (nn.Linear/Conv).")
    skip = excluded_layers(modules, exclude)
    weights = _canonical_weights(modules)
    _check_finite(weights)
    layer_graph = _graph_for(spec.score, model, graph, example_inputs, skip, strict)
    generator = torch.Generator().manual_seed(seed)
    scored = [n for n in modules if n not in skip]
    weights, measured = _measured(spec.score, model, data, scored, weights)
    scores = _score_layers(scored, spec.score, layer_graph, weights, bn, generator, measured)
    return _own_layout(modules, scores)
