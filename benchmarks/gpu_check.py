"""One prepared device check: the CUDA engines agree with the CPU reference, and group throughput.

    python benchmarks/gpu_check.py OUT_DIR               # on the GPU (<= ~3 min on an H200)
    python benchmarks/gpu_check.py OUT_DIR --dry-run     # tiny sizes, any device (CPU test)

Writes ``OUT_DIR/gpu_check.json`` (every measurement, written again after each one, so a
killed run keeps what it measured) and ``OUT_DIR/gpu_check.md`` (the summary tables).

(a) Agreement, on small pruned models after a few steps at batch 60 on Fashion-MNIST-shaped
random data. The verdicts come from float64 with SGD (``*-sgd-f64``): the ``vmap`` engine
against ``train()`` on the device (Conv-6, and VGG-11 for batch norm) and ``train()`` on the
device against the CPU, within :data:`TOL` ``fp64`` (1e-9). In fp32 no verdict is possible
after 20 steps: Adam's step lr * g / (|g| + eps) moves a weight with a near-zero gradient by
~lr whatever the summation order, and a pruned net that does not learn is chaotic (a 1e-7
nudge grows to O(1) in 20 SGD steps); the fp32 Adam, TF32 and bf16 rows are drift, read
against ``device-vs-cpu-fp32`` (the same computation on two devices), with loose bounds. The
measure is the largest logit difference on 500 fixed test inputs in eval mode, relative to the
largest logit of the reference; parameter differences are reported too.

(b) Throughput of retraining groups of Conv-6, VGG-11 and ResNet-18 (1x28x28 inputs, batch
60, Adam, pruned with MP to 10% per layer, the masked path retraining uses), for groups of 1,
8, 32, 42 (Conv-6 only: the sweep's group) and 63 copies: ``sequential`` (``train()``, one model:
the dense-training rate) and ``vmap``. A warm-up call (cuDNN algorithm choice) comes first,
then a timed call, CUDA-synchronised before and after, with ``torch.backends.cudnn.benchmark``
on as the sweep trains (``CUDNN_BENCHMARK=0``: off); model-steps/s = copies x steps / s,
peak memory is ``torch.cuda.max_memory_allocated`` during the timed call (the 200 MB of data
included). Each configuration is capped (``--config-cap`` seconds, steps shrink to fit) and
the whole run too (``--budget``): what does not fit is recorded as ``skipped: time cap``.
Precision: ``fp32`` is PyTorch's default (convolutions in TF32 through cuDNN, matmuls in
IEEE fp32, as the flags recorded in the JSON say); ``bf16`` autocasts forward and loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import prune as torch_prune

import lookahead_prune as lp
from lookahead_prune.batched import train_batched
from lookahead_prune.models import build_model
from lookahead_prune.train import TrainConfig, train

TOL = {"fp64": 1e-9, "fp32": 1e-3, "bf16": 5e-2, "tf32": 2e-2, "adam": 0.2, "none": math.inf}
SGD_LR = 0.05  # plain SGD's step for the exact-path cases
"""Largest logit difference relative to the largest logit. bf16: at most this or twice bf16's
own error (train() bf16 vs train() fp32, measured first), whichever is larger."""
LR = 3e-4
BATCH = 60
SIZES = (1, 8, 32, 42, 63)
PLAN = [  # (precision, model, engine, copies), in order of importance: what runs out of time
    # is skipped; the Conv-6 sweep's choice of precision needs its rows first
    *[("fp32", "conv6", "sequential", 1)] + [("fp32", "conv6", "vmap", k) for k in SIZES],
    ("bf16", "conv6", "sequential", 1),
    ("bf16", "conv6", "vmap", 42),
    *[("fp32", "vgg11", "sequential", 1)] + [("fp32", "vgg11", "vmap", k) for k in (1, 8, 32, 63)],
    *[("fp32", "resnet18", "sequential", 1)]
    + [("fp32", "resnet18", "vmap", k) for k in (1, 8, 32, 63)],
    *[("bf16", "conv6", "vmap", k) for k in (1, 8, 32, 63)],
    *[("bf16", m, "vmap", k) for m in ("vgg11", "resnet18") for k in (32, 63)],
]
DRY_PLAN = [
    ("fp32", m, e, 1) for m in ("conv6", "vgg11", "resnet18") for e in ("sequential", "vmap")
]
DRY_PLAN += [
    ("fp32", "conv6", "vmap", 2),
    ("bf16", "conv6", "vmap", 2),
    ("fp32", "vgg11", "vmap", 2),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for cuDNN convolutions and matmuls on or off, restored after (the legacy flags;
    should this torch refuse them, the case runs with its defaults and says so)."""
    try:
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled
    except Exception as error:  # recorded, the check goes on
        print(f"cannot set TF32 flags: {error}", flush=True)
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def fake_data(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST-shaped inputs with learnable labels (the sign pattern of a few pixels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = x.flatten(1)[:, ::79][:, :10].argmax(1)
    return x.to(device), y.to(device)


def flags() -> dict[str, Any]:
    try:
        return {
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        }
    except Exception as error:  # recorded, the check goes on
        return {"error": str(error)}


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "precision_flags_default": flags(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "gpu": torch.cuda.get_device_name(device),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return env


def pruned_copies(name: str, device: torch.device, jobs: list[tuple[str, float]]) -> list:
    models = []
    for method, keep in jobs:
        model = build_model(name, seed=0)
        lp.prune(model, method, keep)
        models.append(model.to(device))
    return models


def clone_pruned(name: str, base: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A copy of a pruned model (``copy.deepcopy`` refuses the hooks' computed weights)."""
    try:
        with device:  # initialised on the device: 63 VGG-11s in seconds, not a quarter-minute
            model = build_model(name)
    except Exception:  # a model that cannot be built there: on the CPU, then moved
        model = build_model(name).to(device)
    for module_name, module in base.named_modules():
        if hasattr(module, "weight_mask"):
            torch_prune.custom_from_mask(model.get_submodule(module_name), "weight",
                                         module.weight_mask)  # fmt: skip
    model.load_state_dict(base.state_dict())
    return model


@torch.no_grad()
def logits(models: list, x: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for m in models:
        m.eval()
        out.append(m(x).double().cpu())
        m.train()
    return out


def compare(ref: list, other: list, x_ref: torch.Tensor, x_other: torch.Tensor) -> dict:
    """Largest relative logit difference and parameter differences, over the models."""
    la, lb = logits(ref, x_ref), logits(other, x_other)
    rel = max(
        (a - b).abs().max().item() / a.abs().max().item() for a, b in zip(la, lb, strict=True)
    )
    diffs = [
        (p.detach().double().cpu() - q.detach().double().cpu()).abs()
        for a, b in zip(ref, other, strict=True)
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    ]
    flat = torch.cat([d.flatten() for d in diffs])
    return {
        "logit_rel_diff": rel,
        "param_max_abs_diff": flat.max().item(),
        "param_share_above_0.1lr": (flat > 0.1 * LR).double().mean().item(),
    }


def agreement(
    device: torch.device, steps: int, batch: int, record: Callable, copies: int = 4
) -> None:
    """vmap vs train() on the device, the device vs the CPU, bf16, TF32, batch norm."""
    x, y = fake_data(3000, device)
    x_cpu, y_cpu = x.cpu(), y.cpu()
    probe = x[-500:] if device.type == "cuda" else x[-50:]  # eval is slow on a CPU
    jobs = [("mp", 0.1), ("lap", 0.1), ("lap-forward-seq", 0.3), ("lap-backward-seq", 0.2)]
    jobs = jobs[:copies]  # every pruning path the Conv-6 sweep takes, on the device
    config = TrainConfig(steps=steps, lr=LR, batch_size=batch, seed=0)

    tolerance = dict(TOL)

    def case(name, what, model, precision, tol_key, run_ref, run_other, refs, others, xs):
        start = time.perf_counter()
        try:
            run_ref(refs)
            run_other(others)
            result = compare(refs, others, *xs)
            result["pass"] = result["logit_rel_diff"] <= tolerance[tol_key]
            if name == "bf16-vs-fp32":
                tolerance["bf16"] = max(TOL["bf16"], 2 * result["logit_rel_diff"])
        except Exception as error:  # recorded, the check goes on
            result = {"error": f"{type(error).__name__}: {error}", "pass": False,
                      "traceback": traceback.format_exc(limit=4)}  # fmt: skip
        tol = tolerance[tol_key]
        record("agreement", {"case": name, "what": what, "model": model, "precision": precision,
                             "tolerance": None if math.isinf(tol) else tol, "steps": steps,
                             "copies": len(refs), "seconds": round(time.perf_counter() - start, 2)}
               | result)  # fmt: skip

    def seq(cfg, xx, yy):
        return lambda ms: [train(m, xx, yy, cfg) for m in ms]

    def vm(cfg):
        return lambda ms: train_batched(ms, x, y, cfg)

    bf16 = TrainConfig(steps=steps, lr=LR, batch_size=batch, seed=0, precision="bf16")
    # Exact paths first, in float64 with SGD: two correct computations agree to ~1e-12 there
    # (tests/test_batched.py), while in fp32 a pruned net that does not learn is chaotic and
    # parts from itself when nudged by 1e-7 (the H200 run of 4 December 2026: VGG-11 vmap vs
    # train() 1.07 after 20 fp32 SGD steps, train() vs a nudged train() about as far). Adam's
    # g / (|g| + eps) turns noise on near-zero gradients into full-lr steps: the fp32 Adam rows
    # below are drift, read against device-vs-cpu-fp32.
    sgd = TrainConfig(steps=steps, lr=SGD_LR, batch_size=batch, seed=0, optimizer="sgd")
    x64, y64, probe64 = x.double(), y, probe.double()

    def f64(models: list) -> list:
        return [m.double() for m in models]

    case("vmap-vs-sequential-sgd-f64", f"vmap vs train() on {device}, SGD, float64", "conv6",
         "fp64", "fp64", seq(sgd, x64, y64), lambda ms: train_batched(ms, x64, y64, sgd),
         f64(pruned_copies("conv6", device, jobs)), f64(pruned_copies("conv6", device, jobs)),
         (probe64, probe64))  # fmt: skip
    case("device-vs-cpu-sgd-f64", f"train() on {device} vs train() on cpu, SGD, float64",
         "conv6", "fp64", "fp64", seq(sgd, x64.cpu(), y64.cpu()), seq(sgd, x64, y64),
         f64(pruned_copies("conv6", torch.device("cpu"), jobs[:2])),
         f64(pruned_copies("conv6", device, jobs[:2])), (probe64.cpu(), probe64))  # fmt: skip
    case("vmap-vs-sequential-bn-sgd-f64", f"vmap vs train() on {device}, batch norm, SGD, "
         "float64", "vgg11", "fp64", "fp64", seq(sgd, x64, y64),
         lambda ms: train_batched(ms, x64, y64, sgd),
         f64(pruned_copies("vgg11", device, jobs[:2])),
         f64(pruned_copies("vgg11", device, jobs[:2])), (probe64, probe64))  # fmt: skip
    with tf32(False):
        case("vmap-vs-sequential-fp32", f"vmap vs train() on {device}, Adam, TF32 off", "conv6",
             "fp32", "adam", seq(config, x, y), vm(config),
             pruned_copies("conv6", device, jobs), pruned_copies("conv6", device, jobs),
             (probe, probe))  # fmt: skip
        case("device-vs-cpu-fp32", f"train() on {device} vs train() on cpu, Adam, TF32 off",
             "conv6", "fp32", "adam", seq(config, x_cpu, y_cpu), seq(config, x, y),
             pruned_copies("conv6", torch.device("cpu"), jobs[:2]),
             pruned_copies("conv6", device, jobs[:2]), (probe.cpu(), probe))  # fmt: skip
        case("vmap-vs-sequential-bn-fp32", f"vmap vs train() on {device}, batch norm, TF32 off",
             "vgg11", "fp32", "adam", seq(config, x, y), vm(config),
             pruned_copies("vgg11", device, jobs[:2]), pruned_copies("vgg11", device, jobs[:2]),
             (probe, probe))  # fmt: skip
    with tf32(False):
        case("bf16-vs-fp32", f"train() bf16 vs train() fp32 (TF32 off) on {device}: bf16's own "
             "error, which sets the bf16 tolerance", "conv6", "bf16", "none", seq(config, x, y),
             seq(bf16, x, y), pruned_copies("conv6", device, jobs[:2]),
             pruned_copies("conv6", device, jobs[:2]), (probe, probe))  # fmt: skip
    case("vmap-vs-sequential-bf16", f"vmap vs train() on {device}, both bf16 autocast", "conv6",
         "bf16", "bf16", seq(bf16, x, y), vm(bf16), pruned_copies("conv6", device, jobs),
         pruned_copies("conv6", device, jobs), (probe, probe))  # fmt: skip
    with tf32(True):
        case("vmap-vs-sequential-tf32", f"vmap vs train() on {device}, TF32 on (the default for "
             "convolutions)", "conv6", "fp32", "adam", seq(config, x, y), vm(config),
             pruned_copies("conv6", device, jobs), pruned_copies("conv6", device, jobs),
             (probe, probe))  # fmt: skip


def throughput(
    device: torch.device, plan: list, batch: int, max_steps: int, config_cap: float,
    deadline: float, record: Callable,
) -> None:  # fmt: skip
    """Model-steps/s and peak memory per (precision, model, engine, copies)."""
    x, y = fake_data(60_000 if device.type == "cuda" else 600, device)
    base: dict[str, Any] = {}
    for precision, name, engine, copies in plan:
        entry = {"precision": precision, "model": name, "engine": engine, "copies": copies,
                 "batch": batch}  # fmt: skip
        if time.perf_counter() > deadline - 2:
            record("throughput", entry | {"status": "skipped: time cap"})
            continue
        models: list = []
        try:
            if name not in base:
                base[name] = pruned_copies(name, device, [("mp", 0.1)])[0]
            models = [clone_pruned(name, base[name], device) for _ in range(copies)]
            cfg = TrainConfig(steps=3, lr=LR, batch_size=batch, precision=precision)

            def run(steps: int, models: list = models, engine: str = engine,
                    precision: str = precision) -> float:  # fmt: skip
                c = TrainConfig(steps=steps, lr=LR, batch_size=batch, precision=precision)
                sync(device)
                t0 = time.perf_counter()
                if engine == "sequential":
                    train(models[0], x, y, c)
                else:
                    train_batched(models, x, y, c)
                sync(device)
                return time.perf_counter() - t0

            warm = run(cfg.steps)  # cuDNN algorithm choice, allocator warm-up
            per_step = warm / cfg.steps
            left = min(config_cap, deadline - time.perf_counter())
            steps = min(max_steps, int(left / per_step))
            if steps < 2:
                record("throughput", entry | {"status": "skipped: time cap",
                                              "warmup_s_per_step": per_step})  # fmt: skip
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = run(steps)
            peak = (
                torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            )
            record("throughput", entry | {
                "status": "ok", "steps": steps, "seconds": round(seconds, 3),
                "model_steps_per_s": copies * steps / seconds,
                "ms_per_step": 1000 * seconds / steps,
                "peak_memory_gib": None if peak is None else round(peak, 2),
            })  # fmt: skip
        except torch.cuda.OutOfMemoryError as error:
            record("throughput", entry | {"status": f"out of memory: {str(error)[:200]}"})
        except Exception as error:  # recorded, the check goes on
            record("throughput", entry | {"status": f"error: {type(error).__name__}: {error}"[:400],
                                          "traceback": traceback.format_exc(limit=4)})  # fmt: skip
        finally:
            models = []
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _tol(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# GPU check: {env.get('gpu', env['device'])}, torch {env['torch']}"
        + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}" if "cuda" in env else ""),
        "",
        f"Total {report['seconds']:.0f} s{' (dry run: tiny sizes)' if report['dry_run'] else ''}."
        f" Default precision flags: {env['precision_flags_default']}.",
        "",
        "## (a) Agreement",
        "",
        "| case | model | copies | steps | logit rel. diff | tolerance | param max diff | "
        "share > 0.1 lr | pass |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["agreement"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['model']} | {r['copies']} | {r['steps']} | "
                         f"error: {r['error'][:120]} | {r['tolerance']} | | | no |")  # fmt: skip
            continue
        lines.append(
            f"| {r['case']} | {r['model']} | {r['copies']} | {r['steps']} | "
            f"{r['logit_rel_diff']:.2e} | {_tol(r['tolerance'])} | "
            f"{r['param_max_abs_diff']:.2e} | "
            f"{100 * r['param_share_above_0.1lr']:.3f}% | {'yes' if r['pass'] else 'NO'} |"
        )
    lines += ["", "Cases: " + "; ".join(f"{r['case']}: {r['what']}" for r in report["agreement"]),
              "", f"## (b) Throughput, batch {report['batch']}, cuDNN benchmark "
              f"{report.get('cudnn_benchmark_in_throughput')}", "",
              "| precision | model | engine | copies | model-steps/s | ms/step | peak GiB | "
              "steps timed | status |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in report["throughput"]:
        ok = r["status"] == "ok"
        lines.append(
            f"| {r['precision']} | {r['model']} | {r['engine']} | {r['copies']} | "
            + (
                f"{r['model_steps_per_s']:.1f} | {r['ms_per_step']:.2f} | "
                f"{r['peak_memory_gib'] if r['peak_memory_gib'] is not None else '—'} | "
                f"{r['steps']} | ok |"
                if ok
                else f"| | | | {r['status'][:160]} |"
            )
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (CPU testing)")
    parser.add_argument("--no-throughput", action="store_true", help="agreement (a) only")
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds for the whole check")
    parser.add_argument("--config-cap", type=float, default=3.0, help="timed seconds per config")
    parser.add_argument("--max-steps", type=int, default=30, help="timed steps per config, at most")
    args = parser.parse_args()
    start = time.perf_counter()
    deadline = start + args.budget
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan, batch, steps = PLAN, BATCH, 20
    if args.dry_run:
        plan = DRY_PLAN
        batch, steps, args.max_steps = 8, 2, 2
    report: dict[str, Any] = {"environment": environment(device), "dry_run": args.dry_run,
                              "batch": batch, "tolerances": TOL, "agreement": [],
                              "throughput": [], "seconds": 0.0}  # fmt: skip

    def record(section: str, entry: dict[str, Any]) -> None:
        report[section].append(entry)
        report["seconds"] = time.perf_counter() - start
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        shown = {k: v for k, v in entry.items() if k not in ("traceback", "what")}
        print(section, json.dumps(shown, default=str), flush=True)

    agreement(device, steps, batch, record, copies=2 if args.dry_run else 4)
    if args.no_throughput:
        plan = []
    # as results/gpu_sweep.py trains: cuDNN times its algorithms once per shape (CUDNN_BENCHMARK)
    torch.backends.cudnn.benchmark = os.environ.get("CUDNN_BENCHMARK", "1") == "1"
    report["cudnn_benchmark_in_throughput"] = torch.backends.cudnn.benchmark
    throughput(device, plan, batch, args.max_steps, args.config_cap, deadline, record)
    report["seconds"] = time.perf_counter() - start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    failed = [r["case"] for r in report["agreement"] if not r["pass"]]
    print(f"gpu_check: {report['seconds']:.0f} s; agreement failures: {failed or 'none'}")


if __name__ == "__main__":
    main()
