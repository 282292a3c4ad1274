"""Minibatches drawn straight from tensors on the training device (no DataLoader).

As in airbench, the whole split already sits on the device as one tensor; a batch is
one index operation, and CIFAR augmentation (random crop with zero padding and
random horizontal flip) runs batched on the device with one gather. Random draws
come from seeded CPU generators, so a stream is reproducible on any device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BatchStream", "crop_flip", "iterate_eval"]


def _check_pair(x: Tensor, y: Tensor, batch_size: int) -> None:
    """Validate inputs shared by :class:`BatchStream` and :func:`iterate_eval`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device} but y is on {y.device}")


def crop_flip(
    x: Tensor,
    dy: Tensor,
    dx: Tensor,
    flip: Tensor,
    *,
    pad: int,
    fill: Sequence[float] = (),
) -> Tensor:
    """Crop each padded image of ``x`` at its own offset, then mirror the flagged ones.

    ``x`` is ``[B, C, H, W]``; output ``b`` is ``pad(x[b])[:, dy[b]:dy[b]+H, dx[b]:dx[b]+W]``,
    flipped left-right where ``flip[b]``, so offsets ``dy = dx = pad`` with no flip
    give back ``x``. Offsets lie in ``0..2*pad``. The border is ``fill`` per channel (a
    black pixel once standardised; zeros when empty). Fully vectorised.
    """
    if x.ndim != 4:
        raise ValueError(f"crop_flip expects images [B, C, H, W], got shape {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    if fill and len(fill) != channels:
        raise ValueError(f"fill has {len(fill)} values for {channels} channels")
    if fill:
        value = torch.tensor(fill, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        padded = value.expand(batch, channels, height + 2 * pad, width + 2 * pad).clone()
        padded[:, :, pad : pad + height, pad : pad + width] = x
    else:
        padded = F.pad(x, (pad, pad, pad, pad))
    padded_width = width + 2 * pad
    rows = dy.to(x.device)[:, None] + torch.arange(height, device=x.device)  # [B, H]
    cols = torch.arange(width, device=x.device).expand(batch, width)
    cols = torch.where(flip.to(x.device)[:, None], width - 1 - cols, cols)
    cols = cols + dx.to(x.device)[:, None]  # [B, W]
    flat = (rows[:, :, None] * padded_width + cols[:, None, :]).reshape(batch, 1, -1)
    out = padded.reshape(batch, channels, -1).gather(2, flat.expand(-1, channels, -1))
    return out.reshape(batch, channels, height, width)


class BatchStream:
    """Endless stream of random minibatches drawn from tensors already on the training device.

    Each epoch is a fresh permutation (drawn on CPU from a generator seeded with
    ``seed``), so every example appears exactly once per epoch; with ``drop_last``
    the incomplete final batch of an epoch is skipped, otherwise it is yielded short.
    ``augment=True`` applies random crop (padding ``pad`` pixels of ``fill``, per channel:
    pass the dataset's ``pad_value``, a black pixel; zeros, the channel mean, when empty) and
    horizontal flip per example.
    Augmentation uses its own generator, so the order of examples does not depend
    on it. The same arguments always give the same batches.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        seed: int,
        augment: bool = False,
        drop_last: bool = True,
        pad: int = 4,
        fill: Sequence[float] = (),
    ) -> None:
        _check_pair(x, y, batch_size)
        if x.shape[0] == 0:
            raise ValueError("cannot draw batches from an empty dataset")
        if drop_last and batch_size > x.shape[0]:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {x.shape[0]} examples; with "
                "drop_last=True no batch could ever be drawn"
            )
        if augment and x.ndim != 4:
            raise ValueError(f"augment=True needs images [N, C, H, W], got {tuple(x.shape)}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.augment = augment
        self.drop_last = drop_last
        self.pad = pad
        self.fill = tuple(fill)
        self.epoch = 0  # number of epochs begun so far
        self._order = torch.Generator().manual_seed(seed)
        self._aug = torch.Generator().manual_seed(seed ^ 0x5DEECE66D)
        count = x.shape[0]
        self._end = count - count % batch_size if drop_last else count
        self._perm = torch.empty(0, dtype=torch.long, device=x.device)
        self._pos = self._end  # start a new epoch on the first call

    @property
    def batches_per_epoch(self) -> int:
        """Number of batches before the stream starts the next permutation."""
        return -(-self._end // self.batch_size)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self._pos >= self._end:
            perm = torch.randperm(self.x.shape[0], generator=self._order)
            self._perm = perm.to(self.x.device)
            self._pos = 0
            self.epoch += 1
        stop = min(self._pos + self.batch_size, self._end)
        index = self._perm[self._pos : stop]
        self._pos = stop
        xb, yb = self.x[index], self.y[index]
        if self.augment:
            size = index.shape[0]
            offsets = torch.randint(0, 2 * self.pad + 1, (2, size), generator=self._aug)
            flip = torch.randint(0, 2, (size,), generator=self._aug).bool()
            xb = crop_flip(xb, offsets[0], offsets[1], flip, pad=self.pad, fill=self.fill)
        return xb, yb


def iterate_eval(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` batches in order, the last one possibly short (views, no copies)."""
    _check_pair(x, y, batch_size)
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]
