"""Batch-norm recalibration: re-estimate running statistics after pruning.

Pruning changes every activation, but a batch norm's ``running_mean``/``running_var`` still
describe the dense network, so a pruned batch-norm network evaluates near chance before it is
retrained. :func:`recalibrate_batchnorm` forgets those statistics and estimates them again on
a few training batches (drawn like training draws them, :class:`~.data.BatchStream`), without
touching a weight: pruning masks stay applied and pruned weights stay zero.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .data import BatchStream

__all__ = ["batchnorm_modules", "recalibrate_batchnorm"]


def batchnorm_modules(model: nn.Module) -> list[_BatchNorm]:
    """The batch norms of ``model`` that keep running statistics (the ones evaluation reads)."""
    return [
        m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
    ]  # fmt: skip


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    x: Tensor,
    *,
    batches: int,
    batch_size: int = 60,
    seed: int = 0,
) -> int:
    """Reset the running statistics of every batch norm and re-estimate them on ``batches``
    minibatches of ``x``; returns how many batch norms were recalibrated (0: no-op).

    The estimate is the plain average over the batches (``momentum=None``) of each batch's
    mean and unbiased variance, as ``torch.optim.swa_utils.update_bn`` does. Only the batch
    norms run in train mode; every other module runs in eval mode (no dropout), so the
    statistics describe the network as evaluation runs it. Modes and momenta are restored.
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be an integer >= 1, not {batches!r}")
    norms = batchnorm_modules(model)
    if not norms:
        return 0
    device = norms[0].running_mean.device
    if x.device != device:
        raise ValueError(f"recalibration data is on {x.device} but the model is on {device}")
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # BatchStream wants y
    stream = BatchStream(x, labels, batch_size, seed=seed)
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch counts the same
            m.train()
        for _ in range(batches):
            model(next(stream)[0])
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in modes:  # type: ignore[assignment]
            m.training = training
    return len(norms)
