"""Is a pruned model faster once made sparse? Dense vs CSR (``lp.to_sparse``), in one run.

Three parts, each printed as a markdown table:

1. **Crossover**: one layer, dense ``F.linear`` against ``lp.SparseLinear`` (CSR ``addmm``) at
   densities from 2% to 30%, for the FCN's layer shapes (500x784, 500x500) and GPT-2-small's
   MLP (3072x768, 768x3072), at batch 1, 8 and 60. The last column is the largest density at
   which CSR is still faster; ``CSR_CROSSOVER_CPU`` in ``src/lookahead_prune/sparse.py`` is
   the smallest of these per batch, rounded down.
2. **FCN** (784-500x4-10, the paper's MNIST model) pruned with LAP at the paper's levels
   (hidden layers keep 0.5^level, the last 0.75^level): the masked model (what ``lp.prune``
   leaves), the masks folded into dense weights, and ``lp.to_sparse(model, batch=b)``, at
   batch 1 and 60; outputs are checked equal (float32, 1e-5). File sizes: the dense state
   dict, the masked checkpoint ``lap prune --out`` writes, and ``lp.save_sparse``.
3. **GPT-2-small MLP block** (Linear 768->3072, GELU, Linear 3072->768) on 128 tokens at 50%
   and 10% kept.

Timing: ``time.process_time`` (CPU time of this process, which a busy neighbour disturbs less
than wall time) at ``--threads`` torch threads; the variants compared run interleaved within
each repeat; cells are medians over ``--repeats``. ``OMP_WAIT_POLICY=PASSIVE`` is set before
torch loads unless the environment says otherwise.

    python benchmarks/sparse_inference.py              # everything, 1 thread
    python benchmarks/sparse_inference.py --quick      # 3 repeats, fewer densities
    python benchmarks/sparse_inference.py --threads 2 --parts fcn
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

import lookahead_prune as lp
from lookahead_prune.models import build_model
from lookahead_prune.schedule import level_keep
from lookahead_prune.sparse import SparseLinear, fold_masks

SHAPES = ((500, 784), (500, 500), (3072, 768), (768, 3072))
BATCHES = (1, 8, 60)
DENSITIES = (0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.14, 0.16, 0.18, 0.20, 0.25, 0.30)
LEVELS = (2, 3, 4, 5, 6, 7, 8, 9, 10)


def per_call(fn: Callable[[], object], budget: float = 0.004) -> Callable[[], float]:
    """A timer of ``fn``: CPU seconds per call, looping enough calls to fill ``budget``."""
    fn()
    start = time.process_time()
    fn()
    once = max(time.process_time() - start, 1e-6)
    n = max(1, int(budget / once))

    def timer() -> float:
        start = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - start) / n

    return timer


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median CPU seconds per call of each function, the functions interleaved per repeat."""
    timers = {k: per_call(f) for k, f in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            times[k].append(timers[k]())
    return {k: statistics.median(v) for k, v in times.items()}


def random_layer(out_f: int, in_f: int, density: float, gen: torch.Generator) -> SparseLinear:
    weight = torch.randn(out_f, in_f, generator=gen)
    k = max(1, round(density * weight.numel()))
    mask = torch.zeros(weight.numel(), dtype=torch.bool)
    mask[torch.randperm(weight.numel(), generator=gen)[:k]] = True
    return SparseLinear(weight, mask.view_as(weight), torch.randn(out_f, generator=gen))


def part_crossover(repeats: int, densities: tuple[float, ...]) -> None:
    print("### One layer: dense vs CSR (time ratio dense / CSR; > 1: CSR faster)\n")
    head = " | ".join(f"{100 * d:g}%" for d in densities)
    print(f"| shape (out x in) | batch | {head} | CSR pays below |")
    print("|---|---:|" + "---:|" * len(densities) + "---:|")
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in SHAPES:
        for batch in BATCHES:
            x = torch.randn(batch, in_f, generator=gen)
            ratios = []
            for d in densities:
                sparse = random_layer(out_f, in_f, d, gen)
                w, b = sparse.dense_weight(), sparse.bias
                with torch.inference_mode():
                    dense = partial(nn.functional.linear, x, w, b)
                    t = interleaved({"dense": dense, "csr": partial(sparse, x)}, repeats)
                ratios.append(t["dense"] / t["csr"])
            pays = [d for d, r in zip(densities, ratios, strict=True) if r > 1.0]
            cross = f"{100 * max(pays):g}%" if pays else "never"
            cells = " | ".join(f"{r:.2f}" for r in ratios)
            print(f"| {out_f}x{in_f} | {batch} | {cells} | {cross} |")
    print()


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def part_fcn(repeats: int, levels: tuple[int, ...], tmp: str) -> None:
    print("### FCN pruned with LAP: masked vs dense vs `lp.to_sparse` (ms per batch)\n")
    print("| level | kept | batch | masked ms | dense ms | to_sparse ms | masked / sparse "
          "| dense / sparse | sparse layers | max abs diff |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    sizes = []
    dense_model = build_model("fcn", seed=0)
    dense_bytes = state_bytes(dense_model.state_dict())
    for level in levels:
        model = build_model("fcn", seed=0)
        report = lp.prune(model, "lap", level_keep(model, level, 0.0, 0.5))
        kept = report.keep
        folded = fold_masks(lp.sparse.copy_pruned(model)).eval()
        for batch in (1, 60):
            x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
            sparse = lp.to_sparse(model, batch=batch)
            with torch.inference_mode():
                diff = float((model(x) - sparse(x)).abs().max())
                t = interleaved(
                    {
                        "masked": partial(model, x),
                        "dense": partial(folded, x),
                        "sparse": partial(sparse, x),
                    },
                    repeats,
                )
            n_sparse = sum(isinstance(m, SparseLinear) for m in sparse.modules())
            print(
                f"| {level} | {100 * kept:.2f}% | {batch} | {1e3 * t['masked']:.3f} | "
                f"{1e3 * t['dense']:.3f} | {1e3 * t['sparse']:.3f} | "
                f"{t['masked'] / t['sparse']:.2f}x | {t['dense'] / t['sparse']:.2f}x | "
                f"{n_sparse}/5 | {diff:.1e} |"
            )
        path = os.path.join(tmp, f"fcn-{level}.lap")
        lp.save_sparse(model, path)
        masked_bytes = state_bytes({k: v.detach() for k, v in model.state_dict().items()})
        sizes.append((level, kept, masked_bytes, os.path.getsize(path)))
        back = lp.load_sparse(path)
        with torch.inference_mode():
            x = torch.randn(60, 1, 28, 28)
            assert torch.allclose(back(x), model(x), atol=1e-5), "round trip changed outputs"
    print()
    print(f"### FCN file sizes (dense state dict: {dense_bytes / 1e3:.0f} kB)\n")
    print("| level | kept | masked checkpoint kB | `save_sparse` kB | sparse / dense |")
    print("|---:|---:|---:|---:|---:|")
    for level, kept, masked_bytes, sparse_bytes in sizes:
        print(
            f"| {level} | {100 * kept:.2f}% | {masked_bytes / 1e3:.0f} | {sparse_bytes / 1e3:.1f} "
            f"| {100 * sparse_bytes / dense_bytes:.2f}% |"
        )
    print()


def part_gpt2_mlp(repeats: int) -> None:
    print("### GPT-2-small MLP block, 128 tokens: masked vs `lp.to_sparse` (ms)\n")
    print("| kept | masked ms | dense ms | to_sparse ms | masked / sparse | dense / sparse "
          "| sparse layers |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---|")
    for keep in (0.5, 0.1):
        torch.manual_seed(0)
        block = nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768))
        lp.prune(block, "mp", keep)
        x = torch.randn(1, 128, 768)
        sparse = lp.to_sparse(block, batch=128)
        folded = fold_masks(lp.sparse.copy_pruned(block)).eval()
        with torch.inference_mode():
            assert torch.allclose(block(x), sparse(x), atol=1e-4)
            t = interleaved(
                {"masked": partial(block, x), "dense": partial(folded, x),
                 "sparse": partial(sparse, x)},
                repeats,
            )  # fmt: skip
        n_sparse = sum(isinstance(m, SparseLinear) for m in sparse.modules())
        print(
            f"| {100 * keep:g}% | {1e3 * t['masked']:.2f} | {1e3 * t['dense']:.2f} | "
            f"{1e3 * t['sparse']:.2f} | {t['masked'] / t['sparse']:.2f}x | "
            f"{t['dense'] / t['sparse']:.2f}x | {n_sparse}/2 |"
        )
    print()


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
            platform.processor() or "unknown",
        )
    except OSError:
        cpu = platform.processor() or "unknown"
    return (
        f'CPU "{cpu}", nproc {os.cpu_count()}, torch {torch.__version__}, '
        f"{torch.get_num_threads()} torch thread(s), Python {platform.python_version()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 repeats, fewer points")
    parser.add_argument("--parts", default="crossover,fcn,gpt2",
                        help="comma-separated: crossover, fcn, gpt2")  # fmt: skip
    parser.add_argument("--tmp", default="/tmp", help="folder for the files written")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    densities = (0.02, 0.06, 0.1, 0.16, 0.25) if args.quick else DENSITIES
    levels = (2, 4, 6, 8) if args.quick else LEVELS
    parts = args.parts.split(",")
    print(f"Machine: {machine()}; medians of {repeats}.\n")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if "crossover" in parts:
            part_crossover(repeats, densities)
        if "fcn" in parts:
            part_fcn(repeats, levels, args.tmp)
        if "gpt2" in parts:
            part_gpt2_mlp(repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
