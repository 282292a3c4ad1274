"""What ``prune`` did: per-layer survivor counts (:class:`PruneReport`) and every weight tensor
it left dense, and why (:func:`dense_weights`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .graph import canonical, layer_type, prunable_layers, weight_name
from .masks import is_masked as masks_is_masked
from .masks import layer_mask, nm_groups_fit, parse_nm
from .methods import MethodSpec


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


def is_masked(module: nn.Module) -> bool:
    """Whether a prunable module's weight carries a mask (it was pruned, now or before):
    ``torch.nn.utils.prune``'s ``weight_mask``, or a :class:`~.masks.WeightMask`
    parametrisation on a weight-normalised weight (where ``prune.is_pruned`` says False)."""
    return masks_is_masked(module, weight_name(module))


def _weight_params(module: nn.Module, wn: str) -> set[str]:
    """The module's own parameters its weight is made of: the weight, torch prune's
    ``weight_orig``, the hook-based weight norm's ``weight_g``/``weight_v``."""
    return {wn, f"{wn}_orig", f"{wn}_g", f"{wn}_v"}


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


def report_for(
    model: nn.Module,
    spec: MethodSpec,
    scope: str,
    keep: object,
    masks: Mapping[str, Tensor],
    excluded: Iterable[str],
    approximated: tuple[tuple[str, str], ...] = (),
) -> PruneReport:
    """The report of a prune that has just applied ``masks`` to ``model`` (``keep`` as given:
    an N:M pattern names the layers it left dense; ``excluded``: the layers matched by
    ``exclude``; ``approximated``: what ``strict=False`` opened)."""
    excluded = set(excluded)
    modules = prunable_layers(model)
    results: list[LayerResult] = []
    left: list[LayerResult] = []
    for name, module in modules.items():
        mask = layer_mask(module)
        kind = layer_type(module).name
        result = LayerResult(name, kind, tuple(mask.shape), mask.numel(), int(mask.sum()))
        (results if name in masks or is_masked(module) else left).append(result)
    nm_dense: tuple[tuple[str, str], ...] = ()
    if isinstance(keep, str):  # an N:M pattern (compute_masks refused anything else)
        m = parse_nm(keep)[1]
        nm_dense = tuple(
            (f"{n}.{weight_name(mod)}", f"input size not a multiple of {m} for {keep}")
            for n, mod in modules.items()
            if n not in masks
            and not nm_groups_fit(tuple(canonical(mod, layer_mask(mod)).shape), m)
            and n not in excluded
        )
    dense = dense_weights(model, set(masks), excluded)
    dense = tuple(d for d in dense if d[0] not in dict(nm_dense)) + nm_dense
    return PruneReport(
        spec.score, spec.order, spec.steps, scope, tuple(results), dense, approximated,
        tuple(left),
    )  # fmt: skip
