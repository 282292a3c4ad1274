"""Pruning scores: one small function per method, pure tensor code, chosen from a registry.

A score is a tensor shaped like the layer's weight; higher means more worth keeping. LAP
(Eq. 5 of the paper) multiplies |w| by the norm of the producer's row feeding w's input unit and
the norm of the consumers' column reading w's output unit; Eq. 9 multiplies in batch-norm scales.
The neighbour factors come from :mod:`lookahead_prune.graph` and the weights passed in, so
the same functions serve the base, forward and backward orders.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .graph import Layer, LayerGraph


def batchnorm_scale(bn: nn.Module | None, n: int, like: Tensor) -> Tensor:
    """|a| of Eq. (8): the per-unit factor |gamma| / sqrt(running_var + eps) of a batch norm."""
    if bn is None or getattr(bn, "running_var", None) is None:
        return torch.ones(n, device=like.device, dtype=like.dtype)
    scale = (bn.running_var.detach().to(like) + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(like).abs()
    return scale


def row_sq_norms(weight: Tensor) -> Tensor:
    """Squared norm of each output unit's weights (‖W[j, :]‖², kernel entries included)."""
    return torch.linalg.vector_norm(weight.flatten(1), dim=1).square()


def col_sq_norms(weight: Tensor, groups: int = 1) -> Tensor:
    """Squared norm of the weights reading each input unit (‖W[:, k]‖²), grouped convs mapped."""
    if weight.dim() == 2:
        return torch.linalg.vector_norm(weight, dim=0).square()
    per = torch.linalg.vector_norm(weight.flatten(2), dim=2).square()  # [out, in/groups]
    out, in_per_group = per.shape
    return per.view(groups, out // groups, in_per_group).sum(1).reshape(-1)


@dataclass
class Neighbourhood:
    """What a score function may look at for one layer: its graph entry and current weights."""

    layer: Layer
    weights: Mapping[str, Tensor]
    bn: bool = True
    generator: torch.Generator | None = None
    measured: Mapping[str, Tensor] | None = None  # per-layer statistics of a data score

    @property
    def weight(self) -> Tensor:
        """The layer's current (masked) weight."""
        return self.weights[self.layer.name]

    def _scale(self, bn: nn.Module) -> Tensor:
        return batchnorm_scale(bn if self.bn else None, bn.num_features, self.weight)  # type: ignore[arg-type]

    def _back_scale(self, bns: tuple, n: int) -> Tensor:
        """Per input unit u: product of the batch-norm scales met on the path (Eq. 9's a_{i-1})."""
        out = torch.ones(n, device=self.weight.device, dtype=self.weight.dtype)
        for bn, sel in bns:
            sel = sel.to(out.device)
            hit = sel >= 0
            out[hit] *= self._scale(bn)[sel[hit]]
        return out

    def _fwd_scale(self, bns: tuple, n: int) -> Tensor:
        """Per output unit k: product of the batch-norm scales met on the path (Eq. 9's a_i)."""
        out = torch.ones(n, device=self.weight.device, dtype=self.weight.dtype)
        for bn, src in bns:
            src = src.to(out.device)
            hit = src >= 0
            t = torch.ones_like(out)
            t[src[hit]] = self._scale(bn)[hit]
            out *= t
        return out

    def input_factor(self, graph: LayerGraph) -> Tensor:
        """Per input unit j: sqrt(Σ_paths a²‖W_prev[j,:]‖² + open paths), Eq. 9's left side."""
        device, n = self.weight.device, self.layer.in_units
        sq = self.layer.in_open.to(self.weight, copy=True)
        for link in self.layer.producers:
            rows = row_sq_norms(self.weights[link.producer])
            idx = link.index.to(device)
            hit = idx >= 0
            sq[hit] += rows[idx[hit]] * self._back_scale(link.bns, n)[hit].square()
        for index, bns in self.layer.in_open_bn:
            hit = index.to(device) >= 0
            sq[hit] += self._back_scale(bns, n)[hit].square()
        return sq.sqrt()

    def output_factor(self, graph: LayerGraph) -> Tensor:
        """Per output unit k: sqrt(Σ_paths a_k²‖W_next[:,k]‖² + open paths), Eq. 9's right."""
        device, n = self.weight.device, self.layer.out_units
        sq = self.layer.out_open.to(self.weight, copy=True)
        for link in self.layer.consumers:
            cons = graph[link.consumer]
            cols = col_sq_norms(self.weights[cons.name], cons.groups)
            idx = link.index.to(device)
            hit = idx >= 0
            part = torch.zeros_like(sq).index_add_(0, idx[hit], cols[hit])
            sq += part * self._fwd_scale(link.bns, n).square()
        for index, bns in self.layer.out_open_bn:
            part = torch.bincount(index[index >= 0], minlength=n).to(sq)
            sq += part * self._fwd_scale(bns, n).square()
        return sq.sqrt()


def _expand(weight: Tensor, layer: Layer, inputs: Tensor | None, outputs: Tensor | None) -> Tensor:
    """Outer product of per-unit factors, shaped to broadcast against ``weight``."""
    out, in_per_group = weight.shape[:2]
    kernel = (1,) * (weight.dim() - 2)
    factor = None
    if inputs is not None:
        g = layer.groups
        fi = inputs.view(g, 1, in_per_group).expand(g, out // g, in_per_group)
        factor = fi.reshape(out, in_per_group)
    if outputs is not None:
        fo = outputs.view(out, 1)
        factor = fo if factor is None else factor * fo
    assert factor is not None
    return factor.view(factor.shape[0], factor.shape[1], *kernel)


def magnitude(nb: Neighbourhood, graph: LayerGraph) -> Tensor:
    """MP: |w| (Han et al., 2015)."""
    return nb.weight.abs()


def random_scores(nb: Neighbourhood, graph: LayerGraph) -> Tensor:
    """RP: independent uniform scores from the seeded generator."""
    w = nb.weight
    return torch.rand(w.shape, generator=nb.generator, dtype=torch.float32).to(w.device)


def lookahead(nb: Neighbourhood, graph: LayerGraph) -> Tensor:
    """LAP, Eq. (5)/(9): |w| · a_{i-1}[j]‖W_{i-1}[j,:]‖ · a_i[k]‖W_{i+1}[:,k]‖."""
    factor = _expand(nb.weight, nb.layer, nb.input_factor(graph), nb.output_factor(graph))
    return nb.weight.abs().mul_(factor)


def lookahead_forward_only(nb: Neighbourhood, graph: LayerGraph) -> Tensor:
    """LFP: |w| · a_i[k]‖W_{i+1}[:,k]‖, looking only at the next layer."""
    return nb.weight.abs() * _expand(nb.weight, nb.layer, None, nb.output_factor(graph))


def lookahead_backward_only(nb: Neighbourhood, graph: LayerGraph) -> Tensor:
    """LBP: |w| · a_{i-1}[j]‖W_{i-1}[j,:]‖, looking only at the previous layer."""
    return nb.weight.abs() * _expand(nb.weight, nb.layer, nb.input_factor(graph), None)


def lamp(nb: Neighbourhood, graph: LayerGraph) -> Tensor:
    """LAMP (Lee et al., ICLR 2021): w² / Σ_{v: |v| >= |w|} v², a layer-adaptive magnitude score."""
    sq = nb.weight.flatten().square()
    sorted_sq, order = torch.sort(sq)
    tail = sorted_sq.flip(0).cumsum(0).flip(0)  # sum of all weights not smaller than each
    ratio = torch.where(tail > 0, sorted_sq / tail, torch.zeros_like(tail))
    out = torch.empty_like(sq)
    out[order] = ratio
    return out.view_as(nb.weight)


ScoreFn = Callable[[Neighbourhood, LayerGraph], Tensor]


@dataclass(frozen=True)
class Score:
    """A registered method: its score function and what it needs, declared in one place.

    ``global_power``: global scope ranks ``s**p / ‖s**p‖`` per layer, the official code's
    normalised score (its LAP is our score squared, its MP is |w| itself); ``None`` leaves
    the scores as they are (RP and LAMP, as the official code and LAMP's authors compare them).
    ``data``: the name of a :data:`~lookahead_prune.data_scores.MEASURES` entry that turns
    examples into per-layer statistics before scoring (activation rates, Hessian diagonals).
    """

    fn: ScoreFn
    needs_neighbours: bool = False
    global_power: float | None = 1.0
    data: str | None = None


def activation_lookahead(nb: Neighbourhood, graph: LayerGraph) -> Tensor:
    """LAP-act: LAP on weights whose rows are scaled by sqrt(activation rate) (official code).

    The scaling is done once for all layers by ``prune`` (:func:`scale_rows`), so this is LAP.
    """
    return lookahead(nb, graph)


def optimal_brain_damage(nb: Neighbourhood, graph: LayerGraph) -> Tensor:
    """OBD (LeCun et al., 1990): 1/2 · h_ii · w², h_ii the Hessian diagonal of the loss."""
    assert nb.measured is not None
    return nb.measured[nb.layer.name].to(nb.weight) * nb.weight.square() / 2


SCORES: dict[str, Score] = {
    "mp": Score(magnitude),
    "rp": Score(random_scores, global_power=None),
    "lap": Score(lookahead, needs_neighbours=True, global_power=2.0),
    "lfp": Score(lookahead_forward_only, needs_neighbours=True, global_power=2.0),
    "lbp": Score(lookahead_backward_only, needs_neighbours=True, global_power=2.0),
    "lamp": Score(lamp, global_power=None),
    "lap-act": Score(
        activation_lookahead, needs_neighbours=True, global_power=2.0, data="activation"
    ),
    "obd": Score(optimal_brain_damage, data="hessian"),
}
"""Registered methods by name; add an entry to register a new one."""


def score_spec(method: str) -> Score:
    """The registered :class:`Score` for ``method``; unknown names list the known ones."""
    try:
        return SCORES[method]
    except KeyError:
        raise ValueError(
            f"unknown method {method!r}; known methods: {', '.join(sorted(SCORES))} "
            "(and lap-forward, lap-backward, lap-forward-seq, lap-backward-seq)"
        ) from None


def score_function(method: str) -> ScoreFn:
    """The registered score function for ``method``; unknown names list the known ones."""
    return score_spec(method).fn


def scale_rows(weights: Mapping[str, Tensor], scales: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Weights whose output unit k is multiplied by ``scales[name][k]`` (LAP-act's reweighting)."""
    out = dict(weights)
    for name, scale in scales.items():
        w = weights[name]
        out[name] = w * scale.to(w).view(-1, *([1] * (w.dim() - 1)))
    return out
