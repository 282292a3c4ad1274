"""The common shape of what every reader returns before standardisation."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["RawSplits"]


class RawSplits(NamedTuple):
    """Train and test splits as read from disk: uint8 images ``[N, C, H, W]``, integer labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
