"""Compact files of pruned models: only the surviving weights, and the sparse module back.

``save_sparse`` writes each pruned layer's surviving values with CSR indices or a bitmask,
whichever is smaller, plus the rest of the state dict; ``load_sparse`` rebuilds the model
(from the recipe the project's models carry, or the module the user passes) and gives the
:func:`~lookahead_prune.sparse.to_sparse` copy back, loading with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .graph.layers import canonical, from_canonical, layer_type, weight_name
from .sparse import (
    FORMATS,
    SPARSE_KINDS,
    SparseExportError,
    SparseLinear,
    SparseReport,
    canonical_mask,
    convert_layers,
    copy_pruned,
    fold_masks,
    masked_layers,
    to_sparse,
)

__all__ = ["load_sparse", "save_sparse"]

MAGIC = "lookahead-prune/sparse-export"
VERSION = 1


def _pack_bits(mask: Tensor) -> Tensor:
    flat = mask.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (flat * weights).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, numel: int) -> Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    return ((packed.unsqueeze(1) >> shifts) & 1).flatten()[:numel].bool()


def _index_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= 2**15 - 1 else torch.int32 if n <= 2**31 - 1 else torch.int64


def _encode(weight: Tensor, mask: Tensor) -> dict[str, Any]:
    """Surviving weights of a canonical [out, ...] layer: values and the smaller structure."""
    w2 = weight.reshape(weight.shape[0], -1).cpu()
    m2 = mask.reshape(mask.shape[0], -1).cpu().bool()
    values = w2[m2].contiguous()
    rows, cols = m2.shape
    nnz = values.numel()
    csr_bytes = (rows + 1) * 4 + nnz * torch.empty(0, dtype=_index_dtype(cols)).element_size()
    entry: dict[str, Any] = {"values": values}
    if csr_bytes < (m2.numel() + 7) // 8:
        entry["crow"] = torch.cat([torch.zeros(1, dtype=torch.int64), m2.sum(1).cumsum(0)]).to(
            torch.int32 if nnz <= 2**31 - 1 else torch.int64
        )
        entry["col"] = m2.nonzero()[:, 1].to(_index_dtype(cols))
    else:
        entry["bitmask"] = _pack_bits(m2)
    return entry


def _decode(entry: dict[str, Any], shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Back to a canonical dense weight and bool mask of ``shape``."""
    rows = shape[0]
    cols = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
    values = entry["values"]
    if "bitmask" in entry:
        mask = _unpack_bits(entry["bitmask"], rows * cols).view(rows, cols)
    else:
        crow, col = entry["crow"].long(), entry["col"].long()
        counts = crow[1:] - crow[:-1]
        if crow.numel() != rows + 1 or int(crow[-1]) != values.numel() or (counts < 0).any():
            raise SparseExportError("inconsistent CSR indices")
        if col.numel() and (int(col.min()) < 0 or int(col.max()) >= cols):
            raise SparseExportError("column index out of range")
        mask = torch.zeros(rows, cols, dtype=torch.bool)
        mask[torch.repeat_interleave(torch.arange(rows), counts), col] = True
    if int(mask.sum()) != values.numel():
        raise SparseExportError("values and structure disagree")
    weight = torch.zeros(rows, cols, dtype=values.dtype)
    weight[mask] = values
    return weight.view(shape), mask.view(shape)


def _layer_state(model: nn.Module) -> tuple[dict[str, tuple[nn.Module, Tensor, Tensor]], set[str]]:
    """Pruned layers of a masked or ``to_sparse`` model: name -> (module, canonical weight,
    canonical mask), and the state-dict keys they account for."""
    layers: dict[str, tuple[nn.Module, Tensor, Tensor]] = {}
    keys: set[str] = set()
    for name, (module, wname) in masked_layers(model).items():
        weight = getattr(module, f"{wname}_orig").detach() * getattr(module, f"{wname}_mask")
        layers[name] = (module, canonical(module, weight), canonical_mask(module, wname))
        keys |= {f"{name}.{wname}_orig", f"{name}.{wname}_mask"}
    report = getattr(model, "sparse_report", None)
    sparse_names = {r.name for r in report.rows} if isinstance(report, SparseReport) else set()
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            w = module.weight
            crow = w.crow_indices()
            rows = torch.repeat_interleave(torch.arange(w.shape[0]), (crow[1:] - crow[:-1]).cpu())
            mask = torch.zeros(w.shape, dtype=torch.bool)
            mask[rows, w.col_indices().cpu()] = True
            layers[name] = (module, w.to_dense().cpu(), mask)
            keys.add(f"{name}.weight")
        elif name in sparse_names and name not in layers:  # folded dense by to_sparse
            wname = weight_name(module)
            w = canonical(module, getattr(module, wname).detach())
            layers[name] = (module, w, w != 0)
            keys.add(f"{name}.{wname}")
    return layers, keys


def save_sparse(
    model: nn.Module,
    path: str | Path,
    *,
    architecture: dict[str, Any] | None = None,
    max_density: float | None = None,
    batch: int = 60,
) -> None:
    """Write a pruned (masked) model or a ``to_sparse`` copy compactly to ``path``.

    Each pruned layer keeps only its surviving weights (dtype kept) and either CSR indices
    or a bitmask, whichever is smaller; everything else of the state dict is stored as is.
    ``architecture`` (``{"name": ..., **build_model kwargs}``) lets ``load_sparse`` rebuild
    the model alone; models made by ``lookahead_prune.models.build_model`` record it
    themselves. For a masked model, the layers ``load_sparse`` makes sparse are those
    ``to_sparse(model, max_density, batch=batch)`` picks. The file loads with
    ``torch.load(weights_only=True)``.
    """
    layers, skip = _layer_state(model)
    if not layers:
        raise SparseExportError(
            "save_sparse: the model has no pruned layer, so a compact file has nothing to "
            "gain; prune it first with lp.prune (or save its state_dict)"
        )
    report = getattr(model, "sparse_report", None)
    if not isinstance(report, SparseReport):  # a masked model: record what to_sparse picks
        report = to_sparse(model, max_density, batch=batch).sparse_report
    formats = report.formats
    entries = {}
    for name, (module, weight, mask) in layers.items():
        if isinstance(module, SparseLinear):
            kind, wname, layout = "sparse-linear", "weight", list(weight.shape)
        else:
            t = layer_type(module)
            assert t is not None
            kind, wname = t.name, t.weight
            layout = list(from_canonical(module, weight).shape)
        entries[name] = _encode(weight, mask) | {
            "kind": kind, "param": wname, "shape": list(weight.shape), "layout": layout,
            "format": formats.get(name, "csr" if kind == "sparse-linear" else "dense"),
        }  # fmt: skip
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in skip}
    arch = architecture if architecture is not None else getattr(model, "lap_architecture", None)
    save_checkpoint(path, {
        "magic": MAGIC, "version": VERSION, "architecture": arch, "layers": entries,
        "state": state, "batch": report.batch, "torch": str(torch.__version__),
    })  # fmt: skip


def _fail(path: Path, why: str) -> SparseExportError:
    return SparseExportError(f"{path}: {why}")


def _mismatch(path: Path, why: str) -> SparseExportError:
    return SparseExportError(f"{path}: the model does not match the file: {why}")


def load_sparse(
    path: str | Path,
    model: nn.Module | None = None,
    *,
    masked: bool = False,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """The ``to_sparse`` module saved by :func:`save_sparse` (``masked=True``: the pruned
    model with ``weight_orig``/``weight_mask`` instead, e.g. to retrain it).

    ``model``: an instance of the saved architecture (its weights are not used); needed
    when the file records no architecture (models not built by the project's registry).
    Raises :class:`SparseExportError` with one line for a file that is not a sparse export
    or a model that does not match it, and ``CheckpointError`` for a truncated/corrupt file.
    """
    path = Path(path)
    try:
        data = load_checkpoint(path, map_location="cpu", cache=False)
    except CheckpointError as err:
        raise type(err)(
            str(err).replace(
                "`lap train --out FILE` or `lap prune --out FILE`",
                "lp.save_sparse or `lap export --format sparse`",
            )
        ) from err
    if data.get("magic") != MAGIC:
        raise _fail(path, "not a sparse export (write one with lp.save_sparse or "
                    "`lap export --format sparse`)")  # fmt: skip
    if data.get("version") != VERSION:
        raise _fail(path, f"sparse export version {data.get('version')!r}; this lookahead-prune "
                    f"reads version {VERSION}")  # fmt: skip
    if model is None:
        arch = data.get("architecture")
        if not arch:
            raise _fail(path, "the file records no architecture (not one of the project's "
                        "models); pass the module: load_sparse(path, model=...)")  # fmt: skip
        from .models import build_model

        kwargs = dict(arch)
        model = build_model(kwargs.pop("name"), **kwargs)
    else:
        model = fold_masks(copy_pruned(model))
    model = model.cpu()
    entries: dict[str, dict[str, Any]] = data["layers"]
    state: dict[str, Tensor] = dict(data["state"])
    masks: dict[str, Tensor] = {}
    for name, entry in entries.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise _mismatch(path, f"it has no layer {name!r}") from None
        t = layer_type(module)
        kind = entry["kind"]
        linear = kind == "sparse-linear" and t is not None and t.name in SPARSE_KINDS
        if t is None or (kind != t.name and not linear):
            got = type(module).__name__
            raise _mismatch(path, f"layer {name!r} is {got}, the file holds a {kind} layer")
        current = canonical(module, getattr(module, t.weight))
        if list(current.shape) != list(entry["shape"]):
            got = list(current.shape)
            raise _mismatch(path, f"layer {name!r} has weight {got}, the file {entry['shape']}")
        try:
            weight, mask = _decode(entry, tuple(entry["shape"]))
        except (SparseExportError, RuntimeError, KeyError, IndexError) as err:
            raise _fail(path, f"layer {name!r} is damaged ({err})") from None
        state[f"{name}.{t.weight}"] = from_canonical(module, weight).contiguous()
        masks[name] = mask
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise _mismatch(path, f"{what} in the state dict")
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)]
    if bad:
        got, saved = list(expected[bad[0]].shape), list(state[bad[0]].shape)
        raise _mismatch(path, f"{bad[0]} is {got}, the file {saved}")
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:  # the file's dtype wins (load_state_dict would cast to the model's)
        model.to(dtypes.pop())
    model.load_state_dict(state)
    if masked:
        for name, mask in masks.items():
            module = model.get_submodule(name)
            t = layer_type(module)
            torch_prune.custom_from_mask(module, t.weight, from_canonical(module, mask))  # type: ignore[union-attr]
        return model.to(map_location)
    formats = {name: entry.get("format", "dense") for name, entry in entries.items()}

    def decide(name: str, module: nn.Module, weight: Tensor, mask: Tensor) -> tuple[str, str]:
        fmt = formats[name]
        if fmt != "dense" and fmt not in FORMATS:
            return "dense", f"format {fmt!r} unknown to this version"
        return fmt, "" if fmt != "dense" else "dense in the saved copy"

    model = model.to(map_location)
    masks = {k: v.to(map_location) for k, v in masks.items()}
    report = convert_layers(model, masks, decide)
    report.batch = int(data.get("batch", 60))
    model.sparse_report = report
    return model


# --------------------------------------------------------------------------- latency
