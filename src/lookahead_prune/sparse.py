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
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from .graph.layers import canonical, layer_type, weight_name

__all__ = [
    "FORMATS",
    "SparseExportError",
    "SparseFormat",
    "SparseLinear",
    "SparseReport",
    "copy_pruned",
    "fold_masks",
    "latency",
    "to_sparse",
]

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


def masked_layers(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
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
    if not masked_layers(model):
        raise SparseExportError(
            "to_sparse: the model has no pruned layer (no weight_mask), so a sparse copy has "
            "nothing to gain; prune it first with lp.prune"
        )
    out = copy_pruned(model)
    masks = {name: canonical_mask(m, w) for name, (m, w) in masked_layers(out).items()}
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

    report = convert_layers(out, masks, decide)
    report.batch = batch
    out.sparse_report = report
    return out


def canonical_mask(module: nn.Module, wname: str) -> Tensor:
    return canonical(module, getattr(module, f"{wname}_mask").detach().bool())


Decide = Callable[[str, nn.Module, Tensor, Tensor], tuple[str, str]]


def convert_layers(model: nn.Module, masks: dict[str, Tensor], decide: Decide) -> SparseReport:
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
