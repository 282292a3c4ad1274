"""Training a pruned model without torch's pruning hooks: the masks stay plain tensors.

``torch.nn.utils.prune`` recomputes ``weight = weight_orig * weight_mask`` in a forward
pre-hook on every call. In a training loop that costs a multiply (and its backward) per layer
per step, and under ``torch.compile`` it writes a module attribute inside the traced region.
The trainer zeroes the masked entries of ``weight_orig`` after every update anyway, so
``weight_orig`` already *is* the effective weight: :class:`HooklessMasks` lets each layer read
it directly while training and puts the hooks back afterwards. The kept entries see
bit-identical gradients and updates (Adam and SGD are elementwise); the masked entries get
updates that the next mask multiply erases. The compiled graph therefore never depends on the
masks, and one compilation serves every sparsity level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

__all__ = ["HooklessMasks", "apply_masks", "mask_pairs", "refresh_pruned"]


def mask_pairs(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """``(name_orig, name_mask)`` of every ``torch.nn.utils.prune`` reparametrisation."""
    pairs = []
    for module in model.modules():
        for name, mask in module.named_buffers(recurse=False):
            if name.endswith("_mask"):
                orig = getattr(module, name[: -len("_mask")] + "_orig", None)
                if isinstance(orig, Tensor):
                    pairs.append((orig, mask))
    return pairs


@torch.no_grad()
def apply_masks(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """Zero the pruned entries of the underlying parameters (a no-op on unpruned ones)."""
    for orig, mask in pairs:
        orig.mul_(mask)


@dataclass
class HooklessMasks:
    """Take the pruning hooks off ``model`` (``engage``) and put them back (``release``).

    While engaged, each pruned layer's ``weight`` is its ``weight_orig`` parameter, whose
    masked entries are zero; call :func:`apply_masks` on :attr:`pairs` after every optimiser
    step to keep them so. Use as a context manager; ``release`` before anything that prunes
    the model (torch's pruning looks for the hook), then ``engage`` again.
    """

    model: nn.Module
    pairs: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    _saved: list[tuple[nn.Module, dict, list[torch_prune.BasePruningMethod]]] = field(
        default_factory=list
    )

    def engage(self) -> None:
        """Remove the hooks; each pruned tensor attribute now is its ``*_orig`` parameter."""
        if self._saved:
            return
        self.pairs = mask_pairs(self.model)
        apply_masks(self.pairs)
        try:
            self._engage()
        except BaseException:
            self.release()
            raise

    def _engage(self) -> None:
        for module in self.model.modules():
            hooks = module._forward_pre_hooks
            keys = [k for k, h in hooks.items() if isinstance(h, torch_prune.BasePruningMethod)]
            if not keys:
                continue
            pruning = [hooks[k] for k in keys]
            self._saved.append((module, dict(hooks), pruning))  # type: ignore[arg-type]
            for key in keys:
                del hooks[key]
            for hook in pruning:
                name = hook._tensor_name  # type: ignore[attr-defined]
                module.__dict__[name] = getattr(module, name + "_orig")

    def release(self) -> None:
        """Put the hooks back (in their order) and recompute ``weight = weight_orig * mask``."""
        for module, hooks, pruning in self._saved:
            module._forward_pre_hooks.clear()
            module._forward_pre_hooks.update(hooks)
            for hook in pruning:
                hook(module, ())
        self._saved = []

    def __enter__(self) -> HooklessMasks:
        self.engage()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def refresh_pruned(module: nn.Module) -> None:
    """Recompute a pruned module's tensors (``weight = weight_orig * mask``) after an update.

    Training that writes ``weight_orig`` without a forward pass leaves the attribute stale
    until the next forward; this runs the pruning hooks once so readers see the new values.
    """
    for hook in list(module._forward_pre_hooks.values()):
        if isinstance(hook, torch_prune.BasePruningMethod):
            hook(module, ())
