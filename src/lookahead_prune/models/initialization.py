"""The paper's initialisation: Glorot & Bengio (2010) normal weights, zero biases."""

from __future__ import annotations

import torch
from torch import nn

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def glorot_init(model: nn.Module) -> nn.Module:
    """Re-initialise ``model`` in place as the paper does and return it.

    Every Linear/Conv weight gets ``xavier_normal_``, every bias zero; batch norms
    get weight 1, bias 0 and fresh running statistics.
    """
    for module in model.modules():
        if isinstance(module, _WEIGHTED):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, _NORMS):
            module.reset_parameters()
    return model
