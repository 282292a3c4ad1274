"""Retraining throughput of Table 1's group: the sparse engine against today's ``train``.

The group is one seed's 63 pruned FCNs (784-500x4-10) of Table 1: nine methods x levels
4..10 with the paper's layerwise keep fractions ((p, q) = (0, 0.5): 6.36% ... 0.12% kept;
about 1.3M surviving weights in all), on MNIST at batch 60 with Adam. Rows, interleaved
within each repeat:

- ``train``: :func:`lookahead_prune.train.train` per model (the sequential engine); its cost
  does not depend on the keep fraction, so three of the 63 models stand for all of them.
- ``sparse x63``: :func:`lookahead_prune.sparse_group.train_sparse_group` on all 63.

Each row runs at 1 thread (CPU time per model-step, robust to load from other processes),
at 2 threads (wall time) and as 2 processes x 1 thread (two groups at once, wall time; the
way to use a 2-core machine for a sweep over seeds). ``--crossover`` adds the density
sweep behind :data:`lookahead_prune.engines.SPARSE_MAX_DENSITY`: per model-step cost of a
group of 8 copies at one keep fraction, sparse vs ``train``.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/group_retrain.py            # 3 repeats
    OMP_WAIT_POLICY=PASSIVE python benchmarks/group_retrain.py --quick    # 1 repeat, short
    OMP_WAIT_POLICY=PASSIVE python benchmarks/group_retrain.py --crossover
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from train_throughput import mnist  # same data helper (the script's folder is on sys.path)

import lookahead_prune as lp
from lookahead_prune.models import build_model
from lookahead_prune.schedule import level_keep
from lookahead_prune.sparse_group import train_sparse_group
from lookahead_prune.train import TrainConfig, train

METHODS = ("mp", "rp", "lfp", "lbp", "lap", "lap-forward", "lap-backward", "lap-forward-seq",
           "lap-backward-seq")  # fmt: skip
LEVELS = range(4, 11)
LR = 1.2e-3


def cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table1_group() -> list[nn.Module]:
    """The 63 pruned copies of one (Glorot-initialised) dense FCN, as Table 1 prunes them."""
    models = []
    for method in METHODS:
        for level in LEVELS:
            model = build_model("fcn", seed=0)
            lp.prune(model, method, level_keep(model, level, 0.0, 0.5), seed=0)
            models.append(model)
    return models


def uniform_group(keep: float, copies: int) -> list[nn.Module]:
    """``copies`` FCNs pruned to ``keep`` per layer (MP and LAP alternating)."""
    models = []
    for i in range(copies):
        model = build_model("fcn", seed=i)
        lp.prune(model, "lap" if i % 2 else "mp", keep)
        models.append(model)
    return models


def run_train(models: list[nn.Module], x: Tensor, y: Tensor, steps: int) -> int:
    """Sequential engine; returns the model-steps made."""
    for model in models:
        train(model, x, y, TrainConfig(steps=steps, lr=LR))
    return steps * len(models)


def run_sparse(models: list[nn.Module], x: Tensor, y: Tensor, steps: int) -> int:
    """Sparse engine; returns the model-steps made."""
    train_sparse_group(models, x, y, TrainConfig(steps=steps, lr=LR))
    return steps * len(models)


def measure(run: Callable[..., int], models, x, y, steps: int, clock) -> float:
    """Steady-state model-steps per second of ``run`` by ``clock``.

    Runs ``steps`` and ``2 * steps`` updates and divides the extra updates by the extra
    time, so the one-off cost of a call (the sparse engine's index build, the write-back)
    drops out as it does over a 50k-step retraining.
    """
    run(models, x, y, 2)  # warm-up: allocator, first-call dispatch
    start = clock()
    run(models, x, y, steps)
    middle = clock()
    done = run(models, x, y, 2 * steps)
    return (done / 2) / ((clock() - middle) - (middle - start))


def _worker(kind: str, steps: int, barrier, queue) -> None:
    """One process of the 2 x 1-thread row: build its own group, wait, run, report."""
    torch.set_num_threads(1)
    x, y, _ = mnist()
    models = table1_group() if kind == "sparse" else table1_group()[::21]
    run = run_sparse if kind == "sparse" else run_train
    run(models, x, y, 2)
    barrier.wait()
    start = time.perf_counter()
    done = run(models, x, y, steps)
    queue.put((done, time.perf_counter() - start))


def two_processes(kind: str, steps: int) -> float:
    """Summed model-steps/s of two 1-thread processes running at once."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(kind, steps, barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(done / wall for done, wall in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, fewer steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crossover", action="store_true", help="also the density sweep")
    parser.add_argument("--only-crossover", action="store_true", help="just the density sweep")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    group_steps, train_steps = (20, 50) if args.quick else (100, 200)
    x, y, source = mnist()
    group = table1_group()
    survivors = sum(int(b.sum()) for m in group for n, b in m.named_buffers() if "mask" in n)
    print(f"machine: {cpu_name()}, torch {torch.__version__}, "
          f"data: {source}; group: {len(group)} FCNs, {survivors:,} surviving weights")  # fmt: skip
    if args.only_crossover:
        repeats, args.crossover = 0, True
    rows: dict[str, list[float]] = {}
    for _ in range(repeats):  # interleaved: every row once per repeat
        for threads, clock, tag in ((1, time.process_time, "1 thread, CPU time"),
                                    (2, time.perf_counter, "2 threads, wall")):  # fmt: skip
            torch.set_num_threads(threads)
            rows.setdefault(f"train ({tag})", []).append(
                measure(run_train, group[::21], x, y, train_steps, clock)
            )
            rows.setdefault(f"sparse x63 ({tag})", []).append(
                measure(run_sparse, group, x, y, group_steps, clock)
            )
        rows.setdefault("train (2 processes x 1 thread, wall)", []).append(
            two_processes("train", train_steps)
        )
        rows.setdefault("sparse x63 (2 processes x 1 thread, wall)", []).append(
            two_processes("sparse", group_steps)
        )
    if rows:
        base = statistics.median(rows["train (1 thread, CPU time)"])
        print(f"\n| row | model-steps/s (median of {repeats}) | vs train, 1 thread |")
        print("|---|---:|---:|")
        for name, values in rows.items():
            med = statistics.median(values)
            print(f"| {name} | {med:.0f} | {med / base:.1f}x |")
    if args.crossover:
        torch.set_num_threads(1)
        print("\n| keep per layer | train (model-steps/s) | sparse x8 | ratio |")
        print("|---:|---:|---:|---:|")
        for keep in (0.5, 0.35, 0.25, 0.2, 0.15, 0.1, 0.05, 0.01):
            models = uniform_group(keep, 8)
            dense = measure(run_train, models[:1], x, y, train_steps // 2, time.process_time)
            sparse = measure(run_sparse, models, x, y, group_steps, time.process_time)
            print(f"| {keep:.2f} | {dense:.0f} | {sparse:.0f} | {sparse / dense:.2f}x |")


if __name__ == "__main__":
    main()
