"""Pruned models that are really smaller and faster: ``to_sparse`` and compact files.

``to_sparse(model)`` returns an inference copy in which every pruned Linear (token-wise
inputs and Hugging Face ``Conv1D`` included) whose density is below its format's measured
crossover is a :class:`SparseLinear`; every other mask is folded into a plain weight, so no
pruning hook is left. ``save_sparse`` writes only the surviving weights (values plus CSR
indices or a bitmask, whichever is smaller per layer) and ``load_sparse`` gives the
``to_sparse`` module back, loading with ``weights_only=True``.

Sparse layer formats are a registry (:data:`FORMATS`): an entry says which layers it
supports on which device, the density below which it beats the dense kernel (measured by
``benchmarks/sparse_inference.py``, or calibrated on the layer itself) and how to build
the module. A new kernel is one entry; ``tests/test_sparse_export.py`` checks every entry
against the masked model.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .graph.layers import canonical, from_canonical, layer_type, weight_name

__all__ = [
    "FORMATS",
    "SparseExportError",
    "SparseFormat",
    "SparseLinear",
    "SparseReport",
    "copy_pruned",
    "fold_masks",
    "latency",
    "load_sparse",
    "save_sparse",
    "to_sparse",
]

MAGIC = "lookahead-prune/sparse-export"
VERSION = 1
SPARSE_KINDS = ("linear", "conv1d-hf")  # layer types a SparseLinear can replace
DENSE_REASONS = {
    "conv": "convolution: kept dense (im2col + CSR measured 1.7-4.4x slower than dense on CPU)",
    "conv-transpose": "transposed convolution: kept dense (no sparse kernel pays on CPU)",
    "mha-in-proj": "packed attention projection: kept dense (MultiheadAttention reads "
    "in_proj_weight directly)",
}


class SparseExportError(ValueError):
    """A model or file that cannot be made sparse, saved or loaded: one line says why."""


# --------------------------------------------------------------------------- the module


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` [out, in] held as a sparse CSR tensor (surviving weights).

    Inputs may have any number of leading dimensions (tokens); the last is the feature axis.
    For inference: the weight is a buffer, not a parameter.

    For a 2-D input the output is a transposed view (the CSR kernel computes ``W x^T``):
    elementwise ops keep that layout and the next ``SparseLinear`` reads it without a copy,
    which made the FCN 10-50% faster than returning a contiguous copy. ``.reshape`` works on
    it; ``.view`` to another shape raises, so call ``.contiguous()`` first where a model does.
    """

    def __init__(self, weight: Tensor, mask: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.register_buffer("weight", csr_from_mask(weight.detach(), mask))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def density(self) -> float:
        """Share of the weights that are stored."""
        return self.weight._nnz() / max(1, self.in_features * self.out_features)

    def dense_weight(self) -> Tensor:
        """The weight as a dense [out, in] tensor (zeros where pruned)."""
        return self.weight.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        if x.numel() == self.in_features:  # one vector: addmv is ~1.5x faster than addmm
            v = x.reshape(self.in_features)
            y = (
                torch.mv(self.weight, v)
                if self.bias is None
                else torch.addmv(self.bias, self.weight, v)
            )
            return y.reshape(*lead, self.out_features)
        flat = x.reshape(-1, self.in_features).t()  # [in, n]
        if self.bias is None:
            y = torch.mm(self.weight, flat)
        else:
            y = torch.addmm(self.bias.unsqueeze(1), self.weight, flat)
        return y.t().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, density={self.density:.4f}, format=csr"
        )


def csr_from_mask(weight: Tensor, mask: Tensor) -> Tensor:
    """``weight`` [out, in] as CSR whose structure is exactly ``mask`` (kept zeros stay)."""
    mask = mask.to(device=weight.device, dtype=torch.bool)
    crow = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=weight.device)
    crow[1:] = mask.sum(1).cumsum(0)
    col = mask.nonzero()[:, 1].contiguous()
    values = weight[mask].contiguous()
    with warnings.catch_warnings():  # "CSR support is in beta": said once per process
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            crow, col, values, size=tuple(weight.shape), check_invariants=False
        )


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class SparseFormat:
    """One sparse layer format: what it supports, where it pays, how to build it.

    ``supports(module, device)`` says whether the format can hold this layer there;
    ``crossover(shape, batch, device)`` is the measured density below which it beats the
    dense kernel on a [out, in] layer at that batch (None: never measured on that device);
    ``to_module(weight, mask, bias)`` builds the layer from the canonical [out, in] weight.
    """

    name: str
    supports: Callable[[nn.Module, torch.device], bool]
    crossover: Callable[[tuple[int, int], int, torch.device], float | None]
    to_module: Callable[[Tensor, Tensor, Tensor | None], nn.Module]


CSR_CROSSOVER_CPU = ((1, 0.07), (8, 0.14), (60, 0.16))
"""Measured (``benchmarks/sparse_inference.py``, 1 thread, FCN layer shapes): the density
below which ``torch.addmm`` with a CSR weight beats dense ``F.linear``, by batch size. Larger
batches use the last entry; in between, the entry of the largest batch not above it."""


def _csr_supports(module: nn.Module, device: torch.device) -> bool:
    t = layer_type(module)
    if t is None or t.name not in SPARSE_KINDS:
        return False
    dtype = getattr(module, f"{t.weight}_orig", getattr(module, t.weight, None)).dtype
    if device.type == "cpu":
        return dtype in (torch.float32, torch.float64)
    return device.type == "cuda" and dtype in (torch.float32, torch.float64, torch.float16)


def _csr_crossover(shape: tuple[int, int], batch: int, device: torch.device) -> float | None:
    if device.type != "cpu":
        return None
    density = CSR_CROSSOVER_CPU[0][1]
    for b, d in CSR_CROSSOVER_CPU:
        if batch >= b:
            density = d
    return density


FORMATS: dict[str, SparseFormat] = {
    "csr": SparseFormat("csr", _csr_supports, _csr_crossover, SparseLinear),
}
"""Sparse formats, tried in order; the first that supports a layer and pays is used."""


# --------------------------------------------------------------------------- the report


@dataclass
class SparseRow:
    """What ``to_sparse`` did with one pruned layer."""

    name: str
    kind: str
    shape: tuple[int, ...]
    density: float
    format: str  # a FORMATS key, or "dense"
    reason: str = ""


@dataclass
class SparseReport:
    """Per pruned layer: density, the format chosen and, when kept dense, why."""

    rows: list[SparseRow] = field(default_factory=list)
    batch: int = 60

    @property
    def formats(self) -> dict[str, str]:
        """Layer name -> format chosen ("dense" when folded)."""
        return {r.name: r.format for r in self.rows}

    def table(self) -> str:
        lines = ["| layer | kind | shape | density | format | note |", "|---|---|---|---:|---|---|"]
        for r in self.rows:
            shape = "x".join(str(s) for s in r.shape)
            lines.append(
                f"| {r.name} | {r.kind} | {shape} | {100 * r.density:.2f}% | {r.format} | "
                f"{r.reason} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------- to_sparse


def _masked_layers(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Prunable modules that carry a mask on their pruned weight: name -> (module, param)."""
    out = {}
    for name, module in model.named_modules():
        if layer_type(module) is None:
            continue
        wname = weight_name(module)
        if hasattr(module, f"{wname}_mask"):
            out[name] = (module, wname)
    return out


def fold_masks(model: nn.Module) -> nn.Module:
    """Remove every pruning hook in place, folding each mask into its plain weight."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                torch_prune.remove(module, hook._tensor_name)
    return model


def copy_pruned(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copes with pruned modules, whose ``weight`` attribute is
    a computed (non-leaf) tensor that deepcopy refuses: it is copied detached (the pruning
    hook recomputes it on the next forward anyway)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod):
                value = getattr(module, hook._tensor_name, None)
                if isinstance(value, Tensor) and not value.is_leaf:
                    memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _bias(module: nn.Module) -> Tensor | None:
    bias = getattr(module, "bias", None)
    return bias.detach() if isinstance(bias, Tensor) else None


def _time(fn: Callable[[], Any], repeats: int = 5, inner: int = 3) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - start) / inner)
    return out


def calibrate(fmt: SparseFormat, module: nn.Module, weight: Tensor, mask: Tensor,
              batch: int) -> bool:  # fmt: skip
    """Whether ``fmt`` beats the dense kernel on this layer at ``batch``, timed here
    (interleaved, medians; a few milliseconds per layer on CPU)."""
    x = torch.randn(batch, weight.shape[1], dtype=weight.dtype, device=weight.device)
    sparse = fmt.to_module(weight, mask, _bias(module))
    dense_w = weight * mask
    bias = _bias(module)
    sync = torch.cuda.synchronize if weight.is_cuda else (lambda: None)

    def run_dense() -> None:
        torch.nn.functional.linear(x, dense_w, bias)
        sync()

    def run_sparse() -> None:
        sparse(x)
        sync()

    with torch.inference_mode():
        run_dense(), run_sparse()  # warm up
        d, s = [], []
        for _ in range(3):
            d += _time(run_dense)
            s += _time(run_sparse)
    return statistics.median(s) < statistics.median(d)


def to_sparse(
    model: nn.Module,
    max_density: float | None = None,
    *,
    batch: int = 60,
    calibrate_layers: bool = False,
) -> nn.Module:
    """An inference copy of a pruned ``model`` with sparse layers where they pay.

    Every pruned Linear / HF ``Conv1D`` whose density is below the crossover of the first
    format in :data:`FORMATS` that supports it becomes that format's module (``SparseLinear``:
    CSR); all other masks are folded into plain weights, and no pruning hook remains. The
    crossover is the measured table of the format for ``batch`` (the batch you will run at),
    or, with ``calibrate_layers=True``, a short timing of each layer's own shape at ``batch``
    on its device. ``max_density`` overrides both: layers at or below it become sparse.
    The copy is in eval mode without gradients; ``copy.sparse_report`` says what was done.
    """
    if max_density is not None and not 0.0 <= max_density <= 1.0:
        raise SparseExportError(f"max_density must be in [0, 1], not {max_density!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise SparseExportError(f"batch must be a positive int, not {batch!r}")
    if not _masked_layers(model):
        raise SparseExportError(
            "to_sparse: the model has no pruned layer (no weight_mask), so a sparse copy has "
            "nothing to gain; prune it first with lp.prune"
        )
    out = copy_pruned(model)
    masks = {name: _canonical_mask(m, w) for name, (m, w) in _masked_layers(out).items()}
    fold_masks(out)

    def decide(name: str, module: nn.Module, weight: Tensor, mask: Tensor) -> tuple[str, str]:
        """The first format that supports the layer and pays, else dense and why not."""
        density = float(mask.float().mean())
        device = weight.device
        kind = layer_type(module).name  # type: ignore[union-attr]
        why = DENSE_REASONS.get(kind, f"no sparse format supports it on {device.type}")
        for fmt in FORMATS.values():
            if not fmt.supports(module, device):
                continue
            if max_density is not None:
                if density <= max_density:
                    return fmt.name, ""
                return "dense", f"density above max_density={max_density:g}"
            if calibrate_layers:
                if calibrate(fmt, module, weight, mask, batch):
                    return fmt.name, f"calibrated at batch {batch}"
                why = f"{fmt.name} measured slower here at batch {batch}"
                continue
            cross = fmt.crossover(tuple(weight.shape), batch, device)
            if cross is not None and density < cross:
                return fmt.name, ""
            why = (
                f"above the {fmt.name} crossover {100 * cross:.0f}% at batch {batch}"
                if cross is not None
                else f"no {fmt.name} crossover measured on {device.type}; pass max_density= "
                "or calibrate_layers=True"
            )
        return "dense", why

    report = _convert(out, masks, decide)
    report.batch = batch
    out.sparse_report = report
    return out


def _canonical_mask(module: nn.Module, wname: str) -> Tensor:
    return canonical(module, getattr(module, f"{wname}_mask").detach().bool())


Decide = Callable[[str, nn.Module, Tensor, Tensor], tuple[str, str]]


def _convert(model: nn.Module, masks: dict[str, Tensor], decide: Decide) -> SparseReport:
    """Replace layers of a hook-free ``model`` in place by sparse modules as ``decide`` says."""
    report = SparseReport()
    for name, mask in masks.items():
        module = model.get_submodule(name)
        t = layer_type(module)
        assert t is not None
        weight = canonical(module, getattr(module, t.weight).detach())
        mask2 = mask.reshape(mask.shape[0], -1)
        density = float(mask.float().mean())
        fmt_name, reason = decide(name, module, weight, mask2) if weight.dim() == 2 else (
            "dense", DENSE_REASONS.get(t.name, "not a matrix"))  # fmt: skip
        if fmt_name != "dense":
            new = FORMATS[fmt_name].to_module(weight, mask2, _bias(module))
            _set_module(model, name, new.to(weight.device))
        report.rows.append(SparseRow(name, t.name, tuple(weight.shape), density, fmt_name, reason))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return report


# --------------------------------------------------------------------------- files


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
    for name, (module, wname) in _masked_layers(model).items():
        weight = getattr(module, f"{wname}_orig").detach() * getattr(module, f"{wname}_mask")
        layers[name] = (module, canonical(module, weight), _canonical_mask(module, wname))
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
    report = _convert(model, masks, decide)
    report.batch = int(data.get("batch", 60))
    model.sparse_report = report
    return model


# --------------------------------------------------------------------------- latency


def latency(models: dict[str, nn.Module], example: Tensor, repeats: int = 15) -> dict[str, float]:
    """Median seconds per forward of each model on ``example`` under ``inference_mode``,
    the models interleaved within each repeat so that a busy machine slows all alike."""
    sync = torch.cuda.synchronize if example.is_cuda else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        calls = {}
        for key, model in models.items():
            model(example)  # warm up

            def call(model: nn.Module = model) -> None:
                model(example)
                sync()

            start = time.perf_counter()
            call()
            once = max(time.perf_counter() - start, 1e-6)
            calls[key] = (call, max(1, min(100, int(0.005 / once))))
        for _ in range(repeats):
            for key, (call, n) in calls.items():
                times[key].append(statistics.median(_time(call, repeats=1, inner=n)))
    return {k: statistics.median(v) for k, v in times.items()}
