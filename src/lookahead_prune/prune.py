"""``prune()``: score, select and apply masks, with the paper's orders, -seq steps and scopes.

Everything is validated and every mask computed on detached copies of the weights before the
model is touched, so an error leaves the model exactly as it was. The method name is resolved
once into a :class:`~lookahead_prune.methods.MethodSpec` and the other settings into one
:class:`PruneOptions`; both travel down as they are.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .data_scores import MEASURES, Data, measure
from .graph import (
    GraphError,
    LayerGraph,
    build_graph,
    canonical,
    check_graph_mode,
    from_canonical,
    layers_only,
    prunable_layers,
    weight_name,
)
from .graph.capture import ExampleInputs
from .masks import (
    apply_mask,
    effective_weight,
    global_masks,
    layer_mask,
    nm_groups_fit,
    nm_mask,
    parse_nm,
    refuse_tied_weights,
    top_k_mask,
    unmaskable,
)
from .methods import ORDERS, SEQ_STEPS, MethodSpec, canonical_method, parse_method, resolve
from .prune_report import LayerResult, PruneReport, dense_weights, is_masked, report_for
from .scores import SCORES, Neighbourhood, Score, scale_rows

__all__ = [  # the method grammar and report types are re-exported from where they once lived
    "ORDERS",
    "SCOPES",
    "SEQ_STEPS",
    "LayerResult",
    "Masks",
    "MethodSpec",
    "PruneOptions",
    "PruneReport",
    "canonical_method",
    "compute_masks",
    "compute_scores",
    "dense_weights",
    "excluded_layers",
    "is_masked",
    "parse_method",
    "prune",
]

SCOPES = ("layer", "global")

Keep = float | str | Mapping[str, float]  # a str is an N:M pattern: "2:4"


@dataclass(frozen=True, eq=False)
class PruneOptions:
    """Everything ``prune`` and ``compute_masks`` take besides the model, the method (with
    its order and steps: a :class:`MethodSpec`) and ``keep``; their keyword arguments, built
    once at the edge and passed down as one object. See :func:`prune` for each field."""

    scope: str = "layer"
    bn: bool = True
    normalize: bool = True
    graph: str = "fx"
    example_inputs: ExampleInputs = None
    layers: Iterable[str] | None = None
    exclude: Iterable[str] = ()
    seed: int = 0
    data: Data | None = None
    strict: bool = True

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, not {self.scope!r}")


class Masks(tuple[dict[str, Tensor], MethodSpec]):
    """``(masks, spec)``, as :func:`compute_masks` has always returned them, plus
    ``approximated``: ``(layer, what was opened)`` for each layer whose neighbours
    ``strict=False`` could not all follow (a factor of 1 on that side)."""

    approximated: tuple[tuple[str, str], ...]

    def __new__(
        cls,
        masks: dict[str, Tensor],
        spec: MethodSpec,
        approximated: tuple[tuple[str, str], ...] = (),
    ) -> Masks:
        self = super().__new__(cls, (masks, spec))
        self.approximated = approximated
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:  # pickle and deepcopy rebuild it whole
        return (self[0], self[1], self.approximated)

    @property
    def masks(self) -> dict[str, Tensor]:
        """Bool masks by layer name, in each module's own weight layout."""
        return self[0]

    @property
    def spec(self) -> MethodSpec:
        """The resolved method."""
        return self[1]


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


def _refuse_dead(names: Iterable[str], graph: LayerGraph) -> None:
    dead = [n for n in names if n in graph.unreached]
    if dead:
        raise GraphError(
            f"prunable modules {dead} are never called in the traced forward(); "
            "leave them out with layers=[...] or a keep dict."
        )


@dataclass
class _Scoring:
    """What scoring a layer reads besides the weights: the method, the graph, the settings."""

    spec: MethodSpec
    graph: LayerGraph
    bn: bool
    generator: torch.Generator | None = None
    measured: Mapping[str, Tensor] | None = None  # per-layer statistics of a data score


def _score_layers(
    names: Iterable[str], scoring: _Scoring, weights: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    names = list(names)
    graph = scoring.graph
    _refuse_dead(names, graph)
    fn = scoring.spec.entry.fn
    out = {}
    for n in names:
        nb = Neighbourhood(
            graph[n],
            weights,
            bn=scoring.bn,
            generator=scoring.generator,
            measured=scoring.measured,
        )
        out[n] = fn(nb, graph)
        if not bool(torch.isfinite(out[n]).all()):
            raise ValueError(
                f"layer '{n}' gets NaN/inf {scoring.spec.score} scores; check the batch-norm "
                "statistics and weights of its neighbours."
            )
    return out


def _measured(
    spec: MethodSpec,
    model: nn.Module,
    data: Data | None,
    targets: Iterable[str],
    weights: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """For a data score: the weights it ranks and the statistics it reads, measured once.

    Row scales apply to every layer (they change the neighbours too); others to the targets.
    """
    need = spec.entry.data
    if need is None:
        return weights, None
    rows = MEASURES[need].scales_rows
    stats = measure(need, spec.score, model, data, list(weights if rows else targets))
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
    score: Score,
    model: nn.Module,
    options: PruneOptions,
    skip: frozenset[str] = frozenset(),
) -> LayerGraph:
    """The traced graph for methods that look at neighbours; bare layers for the others.

    MP, RP, LAMP and OBD never read a neighbour, so they skip tracing (and work on any model).
    """
    if score.needs_neighbours:
        graph = build_graph(
            model, options.graph, options.example_inputs, skip=skip, strict=options.strict
        )
        if graph.approximated:
            warnings.warn(
                f"strict=False: the neighbours of {sorted(graph.approximated)} could not all "
                "be followed; those sides get a factor of 1 (see the report)",
                stacklevel=4,
            )
        return graph
    check_graph_mode(options.graph)
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


def _masks(model: nn.Module, spec: MethodSpec, keep: Keep, options: PruneOptions) -> Masks:
    """The body of :func:`compute_masks`: validate, score, select."""
    scope = options.scope
    modules = prunable_layers(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no prunable layers (nn.Linear/Conv).")
    skip = excluded_layers(modules, options.exclude)
    nm = parse_nm(keep) if isinstance(keep, str) and ":" in keep else None
    if nm is not None:
        if scope != "layer":
            raise ValueError(f"an N:M keep ({keep!r}) is per group of weights; use scope='layer'")
        keep = nm[0] / nm[1]
    targets = _targets(keep, list(modules), options.layers)
    asked = set(keep) if isinstance(keep, Mapping) else set(options.layers or ())
    if asked & skip:
        raise ValueError(f"layers {sorted(asked & skip)} are both excluded and asked to be pruned")
    targets = {n: v for n, v in targets.items() if n not in skip}
    refuse_tied_weights(model, modules, targets)
    if scope == "global":
        if isinstance(keep, Mapping):
            raise ValueError("scope='global' takes one overall keep fraction, not a dict")
        if spec.order != "base":
            raise ValueError("scope='global' prunes all layers at once; use order='base'")
    for n in targets:
        why = unmaskable(modules[n], weight_name(modules[n]))
        if why:
            raise ValueError(f"layer '{n}': {why}, or pass exclude=['{n}'] to leave it dense")
    weights = _canonical_weights(modules)  # read-only, viewed [out, in/groups, ...]
    if nm is not None:  # layers whose input axis does not split into groups of M stay dense
        targets = {n: v for n, v in targets.items() if nm_groups_fit(weights[n].shape, nm[1])}
    _check_finite(weights)
    alive = {n: canonical(modules[n], layer_mask(modules[n])) for n in targets}
    layer_graph = _graph_for(spec.entry, model, options, skip)
    _refuse_dead(targets, layer_graph)  # a pruned layer that is never called
    approximated: tuple[tuple[str, str], ...] = ()
    if spec.entry.needs_neighbours:
        approximated = tuple(sorted(layer_graph.approximated.items()))
    weights, measured = _measured(spec, model, options.data, targets, weights)
    generator = torch.Generator().manual_seed(options.seed)
    scoring = _Scoring(spec, layer_graph, options.bn, generator, measured)
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
            return Masks({}, spec, approximated)
        total_final = round(targets[next(iter(targets))] * sum(totals.values()))
        if total_final > sum(start.values()):
            warnings.warn(
                "the model already keeps fewer weights than asked for; nothing is "
                "revived, so the layers stay as they are.",
                stacklevel=3,
            )
        plan = _schedule(total_final, sum(start.values()), spec.steps)
        alive = _select_global(scoring, list(targets), plan, weights, alive, options.normalize)
    else:
        plans = {n: _schedule(finals[n], start[n], spec.steps) for n in targets}
        ordered = [n for n in layer_graph.names() if n in targets]
        alive = _select_per_layer(scoring, ordered, plans, nm, weights, alive)
    return Masks(_own_layout(modules, alive), spec, approximated)


def _select_global(
    scoring: _Scoring,
    targets: list[str],
    plan: list[int],
    weights: dict[str, Tensor],
    alive: dict[str, Tensor],
    normalize: bool,
) -> dict[str, Tensor]:
    """One threshold over every target layer per step, survivors ``plan[step]`` in all."""
    for step, k in enumerate(plan):
        scores = _score_layers(targets, scoring, weights)
        if normalize:
            scores = _normalised(scores, scoring.spec.entry.global_power)
        alive = global_masks(scores, k, alive)
        if step + 1 < len(plan):
            weights = weights | {n: weights[n] * alive[n] for n in targets}
    return alive


def _select_per_layer(
    scoring: _Scoring,
    ordered: list[str],
    plans: Mapping[str, list[int]],
    nm: tuple[int, int] | None,
    weights: dict[str, Tensor],
    alive: dict[str, Tensor],
) -> dict[str, Tensor]:
    """Each layer's own survivors (``plans[name][step]``, or N of every M), in the spec's
    order: ``base`` scores all layers on the same weights, ``forward``/``backward`` score each
    layer after its predecessors in that order were pruned."""
    spec = scoring.spec
    if nm is not None:  # survivors per group of M, reaching N in spec.steps rounds
        per_group = _schedule(nm[0], nm[1], spec.steps)

        def select(n: str, score: Tensor, step: int) -> Tensor:
            return nm_mask(score, per_group[step], nm[1], alive[n])
    else:

        def select(n: str, score: Tensor, step: int) -> Tensor:
            return top_k_mask(score, plans[n][step], alive[n])

    if spec.order == "backward":
        ordered = ordered[::-1]
    for step in range(spec.steps):
        last = step + 1 == spec.steps
        if spec.order == "base":
            scores = _score_layers(ordered, scoring, weights)
            for n in ordered:
                alive[n] = select(n, scores[n], step)
            if not last:
                weights = weights | {n: weights[n] * alive[n] for n in ordered}
        else:
            for i, n in enumerate(ordered):
                alive[n] = select(n, _score_layers([n], scoring, weights)[n], step)
                if not (last and i + 1 == len(ordered)):
                    weights = weights | {n: weights[n] * alive[n]}
    return alive


def compute_masks(
    model: nn.Module,
    method: str | MethodSpec = "lap",
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
) -> Masks:
    """The masks ``prune`` would apply, without touching the model (same arguments):
    ``masks, spec = compute_masks(...)``, and ``.approximated`` (see :class:`Masks`)."""
    spec = resolve(method, order, steps)
    options = PruneOptions(
        scope, bn, normalize, graph, example_inputs, layers, exclude, seed, data, strict
    )
    return _masks(model, spec, keep, options)


def prune(
    model: nn.Module,
    method: str | MethodSpec = "lap",
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
    ``lap-forward-seq`` (or a :class:`MethodSpec` resolved before); ``order``/``steps`` give
    LAP-forward/backward and the -seq variants.
    With ``scope='global'`` and ``normalize`` each layer's scores are normalised as the
    official code does (:attr:`Score.global_power`).
    ``bn=False`` drops Eq. 9's batch-norm factors; ``graph='sequential'`` chains layers in
    module order like the official code. ``exclude`` (names or glob patterns) leaves layers
    unpruned and, with ``graph='sequential'``, out of the chain too, as the official code
    treats ResNet shortcuts. Masks are applied with ``torch.nn.utils.prune``.
    A layer left with no weight at all gets a warning that names it. ``strict=False`` gives
    layers whose neighbours cannot all be followed a factor of 1 there (named in a warning
    and the report) instead of failing. The report lists every weight tensor left dense.
    The keyword arguments other than ``order`` and ``steps`` are the :class:`PruneOptions`.
    """
    if torch.is_inference_mode_enabled():
        raise ValueError(
            "prune() was called under torch.inference_mode(): its masks would be inference "
            "tensors that training can never use; call it outside (torch.no_grad() is fine)"
        )
    spec = resolve(method, order, steps)
    options = PruneOptions(
        scope, bn, normalize, graph, example_inputs, layers, exclude, seed, data, strict
    )
    computed = _masks(model, spec, keep, options)
    masks = computed.masks
    modules = prunable_layers(model)
    for name, mask in masks.items():
        apply_mask(modules[name], mask, weight_name(modules[name]))
    excluded = excluded_layers(modules, exclude)
    report = report_for(model, spec, scope, keep, masks, excluded, computed.approximated)
    emptied = [r.name for r in report.layers if r.kept == 0 and r.name in masks]
    if emptied:
        warnings.warn(
            f"layers {emptied} keep no weight at all (keep too small for their size): the "
            "network is cut there and its output no longer depends on the input",
            stacklevel=2,
        )
    return report


def compute_scores(
    model: nn.Module,
    method: str | MethodSpec = "lap",
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
    spec = resolve(method)
    if spec.order != "base" or spec.steps != 1:
        raise ValueError(
            f"compute_scores takes a plain score method ({', '.join(sorted(SCORES))}); "
            f"orders and -seq steps only make sense inside prune()"
        )
    options = PruneOptions(
        bn=bn, graph=graph, example_inputs=example_inputs, exclude=exclude, seed=seed,
        data=data, strict=strict,
    )  # fmt: skip
    modules = prunable_layers(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no prunable layers (nn.Linear/Conv).")
    skip = excluded_layers(modules, exclude)
    weights = _canonical_weights(modules)
    _check_finite(weights)
    layer_graph = _graph_for(spec.entry, model, options, skip)
    generator = torch.Generator().manual_seed(seed)
    scored = [n for n in modules if n not in skip]
    weights, measured = _measured(spec, model, data, scored, weights)
    scoring = _Scoring(spec, layer_graph, bn, generator, measured)
    return _own_layout(modules, _score_layers(scored, scoring, weights))


def _canonical_weights(modules: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """Effective weights viewed ``[out, in/groups, ...]`` (transposed types converted)."""
    return {
        n: _for_scoring(canonical(m, effective_weight(m, weight_name(m))))
        for n, m in modules.items()
    }


def _own_layout(modules: Mapping[str, nn.Module], masks: Mapping[str, Tensor]) -> dict:
    """Masks from the canonical view back in each module's own weight layout."""
    return {n: from_canonical(modules[n], m) for n, m in masks.items()}
