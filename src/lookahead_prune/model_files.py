"""Model files that ``lap train --out`` and ``lap prune --out`` write, read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.utils import prune as torch_prune

from .checkpoint import load_checkpoint
from .data.sources import SOURCES
from .models import build_model


def load_masked_model(
    path: str | Path, model: str | None = None, dataset: str | None = None
) -> tuple[nn.Module, dict[str, Any], tuple[int, ...]]:
    """The model of a `lap prune --out` (or `lap train --out`) checkpoint with its masks
    applied, the protocol it records, and the shape of one input.

    ``model`` and ``dataset`` name them for a checkpoint that does not record them.
    """
    state = load_checkpoint(path, cache=False)
    if "magic" in state:
        raise ValueError(f"{path} is already an export; give a file from "
                         "`lap prune --out`")  # fmt: skip
    if not isinstance(state.get("state"), dict):
        raise ValueError(f"{path} holds no model state; give a file from `lap prune --out`")
    saved = state.get("protocol", {}) or {}
    name = saved.get("model") or model
    dataset = saved.get("dataset") or dataset
    if name is None or dataset is None:
        raise ValueError(f"{path} records no model or dataset; give --model, --dataset")
    source = SOURCES[dataset]
    c, h, _ = source.input_shape
    net = build_model(name, in_channels=c, image_size=h, num_classes=source.num_classes,
                      activation=saved.get("activation", "relu"))  # fmt: skip
    weights = state["state"]
    for key, mask in weights.items():
        if key.endswith("_mask"):
            module_name, _, param = key[: -len("_mask")].rpartition(".")
            try:
                module = net.get_submodule(module_name)
            except AttributeError:
                raise ValueError(f"{path} does not fit model {name!r}: "
                                 f"no layer {module_name!r}") from None  # fmt: skip
            torch_prune.custom_from_mask(module, param, mask.bool())
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise ValueError(f"{path} does not fit model {name!r}: {first}") from None
    return net.eval(), saved, (c, h, h)
