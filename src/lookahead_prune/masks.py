"""Scores -> masks: exact survivor counts with deterministic ties, per layer or globally,
applied with ``torch.nn.utils.prune`` so the usual ``weight_orig``/``weight_mask`` result
(a parametrised weight, weight norm or spectral norm, gets the mask as one more
parametrisation: :class:`WeightMask`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from .graph.layers import weight_name


class WeightMask(nn.Module):
    """A mask as one more parametrisation (``torch.nn.utils.parametrize``): the weight a
    weight-normalised or spectral-normalised layer computes with is its own weight times the
    mask. The mask is a buffer, ``parametrizations.weight.<i>.mask`` in the state dict."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask

    def right_inverse(self, weight: Tensor) -> Tensor:
        return weight  # assigning a weight sets the parametrisations before the mask


def _parametrized(module: nn.Module, name: str) -> bool:
    return parametrize.is_parametrized(module, name)


def mask_parametrization(module: nn.Module, name: str = "weight") -> WeightMask | None:
    """The :class:`WeightMask` on a parametrised weight, or None."""
    if not _parametrized(module, name):
        return None
    return next((p for p in module.parametrizations[name] if isinstance(p, WeightMask)), None)


def is_masked(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``name`` carries a mask: ``torch.nn.utils.prune``'s or a :class:`WeightMask`."""
    return hasattr(module, f"{name}_mask") or mask_parametrization(module, name) is not None


def current_mask(module: nn.Module, name: str = "weight") -> Tensor:
    """The module's weight mask (all ones when it has never been pruned), as bool."""
    mask = getattr(module, f"{name}_mask", None)
    if mask is None:
        masked = mask_parametrization(module, name)
        if masked is not None:
            return masked.mask.detach().bool()
        return torch.ones_like(_weight(module, name), dtype=torch.bool)
    return mask.detach().bool()


def layer_mask(module: nn.Module) -> Tensor:
    """The current mask of a prunable layer's weight (whatever its parameter is called)."""
    return current_mask(module, weight_name(module))


def _weight(module: nn.Module, name: str) -> Tensor:
    """The weight as forward() sees it, read without side effects: a parametrised weight is
    computed with its parametrisations in eval mode (spectral norm's power iteration would
    otherwise update its buffers on every read)."""
    if not _parametrized(module, name):
        return getattr(module, name).detach()
    plist = module.parametrizations[name]
    modes = [(m, m.training) for m in plist.modules()]
    plist.eval()
    try:
        with torch.no_grad():
            return getattr(module, name).detach()
    finally:
        for m, flag in modes:
            m.training = flag


def effective_weight(module: nn.Module, name: str = "weight") -> Tensor:
    """The weight the module computes with: ``weight_orig * weight_mask`` once pruned, or the
    parametrised weight (weight norm, spectral norm) with its :class:`WeightMask`."""
    orig, mask = getattr(module, f"{name}_orig", None), getattr(module, f"{name}_mask", None)
    if orig is None or mask is None:  # (the hook-based spectral norm has a weight_orig too)
        return _weight(module, name)
    return (orig * mask).detach()


_SAMPLE = 65536  # strided sample size used to bracket the threshold in large tensors


def kth_smallest(flat: Tensor, j: int) -> Tensor:
    """``torch.kthvalue(flat, j).values`` exactly, faster on big tensors.

    A strided sample brackets the rank; ``kthvalue`` then runs on the few candidates on the
    right side of the bracket, falling back to the full tensor when the bracket misses.
    """
    n = flat.numel()
    if n >= 16 * _SAMPLE:
        sample = flat[:: n // _SAMPLE].contiguous()
        m, p = sample.numel(), j / n
        if p >= 0.5:
            r = int((p - 0.01) * m)
            if r >= 1:
                cand = flat[flat >= torch.kthvalue(sample, r).values]
                below = n - cand.numel()
                if below < j:
                    return torch.kthvalue(cand, j - below).values
        else:
            r = int((p + 0.01) * m) + 1
            if r <= m:
                cand = flat[flat <= torch.kthvalue(sample, r).values]
                if j <= cand.numel():
                    return torch.kthvalue(cand, j).values
    return torch.kthvalue(flat, j).values


def top_k_mask(scores: Tensor, k: int, alive: Tensor | None = None) -> Tensor:
    """Bool mask keeping exactly the ``k`` highest scores among ``alive`` entries.

    Ties at the threshold go to the lowest flat index, so equal inputs give equal masks. Uses a
    linear-time selection (``kthvalue``) rather than a full sort.
    """
    flat = scores.detach().flatten()
    if flat.dtype != torch.float64:
        flat = flat.float()
    n = flat.numel()
    alive_flat = None
    if alive is not None:
        alive_flat = alive.flatten()
        n_alive = int(torch.count_nonzero(alive_flat))
        if n_alive < n:
            flat = torch.where(alive_flat, flat, torch.full_like(flat, float("-inf")))
        k = min(k, n_alive)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = kth_smallest(flat, n - k)
    keep = flat > threshold
    at = flat == threshold
    if alive_flat is not None:
        keep &= alive_flat
        at &= alive_flat
    missing = k - int(torch.count_nonzero(keep))
    if missing > 0:
        ties = torch.nonzero(at).flatten()[:missing]
        keep[ties] = True
    return keep.view_as(scores)


def global_masks(
    scores: Mapping[str, Tensor], k: int, alive: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Masks keeping the ``k`` highest scores over all layers together (one threshold)."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten() for n in names])
    alive_flat = torch.cat([alive[n].flatten() for n in names])
    keep = top_k_mask(flat, k, alive_flat)
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start : start + size].view_as(scores[n])
        start += size
    return out


def apply_mask(module: nn.Module, mask: Tensor, name: str = "weight") -> None:
    """Apply ``mask`` with ``torch.nn.utils.prune`` (cumulative with any earlier mask); a
    parametrised weight gets it as a :class:`WeightMask` appended to its parametrisations."""
    if _parametrized(module, name):
        weight = _weight(module, name)
        mask = mask.to(device=weight.device, dtype=weight.dtype)
        masked = mask_parametrization(module, name)
        if masked is not None:
            masked.mask.mul_(mask)  # cumulative, as torch.nn.utils.prune
        else:
            parametrize.register_parametrization(module, name, WeightMask(mask))
        return
    weight = getattr(module, name)
    mask = mask.to(device=weight.device, dtype=weight.dtype)
    torch_prune.custom_from_mask(module, name, mask)


def parse_nm(spec: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: N of every M consecutive weights survive (0 < N < M)."""
    parts = spec.split(":") if isinstance(spec, str) else []
    try:
        n, m = (int(p.strip()) for p in parts)
    except ValueError:
        raise ValueError(
            f"an N:M keep must look like '2:4' (N of every M weights survive), not {spec!r}"
        ) from None
    if not 0 < n < m:
        raise ValueError(f"an N:M keep needs 0 < N < M (e.g. '2:4'), got {spec!r}")
    return n, m


def nm_groups_fit(canonical_shape: tuple[int, ...], m: int) -> bool:
    """Whether the input axis (dim 1 of the canonical view) splits into groups of ``m``."""
    return len(canonical_shape) >= 2 and canonical_shape[1] % m == 0


def _grouped(t: Tensor, m: int) -> Tensor:
    """``[out, in, *k]`` -> ``[groups, m]`` with M consecutive inputs per group, inputs innermost
    (``[out, *k, in]`` order, as NVIDIA's sparse tensor cores read a conv's channels)."""
    return t.movedim(1, -1).reshape(-1, m)


def _ungrouped(g: Tensor, like: Tensor) -> Tensor:
    moved = like.movedim(1, -1).shape
    return g.reshape(moved).movedim(-1, 1)


def nm_mask(scores: Tensor, n: int, m: int, alive: Tensor | None = None) -> Tensor:
    """Bool mask keeping, in every group of ``m`` consecutive weights along the input axis of
    a canonical ``[out, in, *k]`` tensor, the ``n`` highest-scoring alive ones (ties go to the
    lowest index). Groups with fewer than ``n`` alive weights keep those."""
    flat = scores.detach()
    flat = flat.float() if flat.dtype != torch.float64 else flat
    g = _grouped(flat, m)
    if alive is not None:
        g = torch.where(_grouped(alive.bool(), m), g, torch.full_like(g, float("-inf")))
    order = torch.sort(g, dim=1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, order, True)
    if alive is not None:
        keep &= _grouped(alive.bool(), m)
    return _ungrouped(keep, scores)


_OLD_HOOKS = {
    "WeightNorm": ("weight_norm", "remove_weight_norm"),
    "SpectralNorm": ("spectral_norm", "remove_spectral_norm"),
}


def unmaskable(module: nn.Module, name: str = "weight") -> str | None:
    """Why a layer's weight cannot be masked (with the fix), or None when it can."""
    wn = name
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


def refuse_tied_weights(
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
