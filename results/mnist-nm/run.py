"""2:4 sparsity on the FCN (MNIST): MP, LAP and LAP-forward, before and after a short retraining.

For each seed: train the FCN (784-500x4-10) densely for ``--train-steps``, prune every layer
to 2:4 (the best 2 of every 4 consecutive input weights survive) with each method, measure the
test accuracy, retrain the masked model for ``--retrain-steps`` with the same recipe (Adam,
lr 1.2e-3, batch 60) and measure again. Prints a markdown table (mean ± std over seeds).

    OMP_NUM_THREADS=1 python results/mnist-nm/run.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import lookahead_prune as lp
from lookahead_prune.data import load_dataset
from lookahead_prune.models import build_model
from lookahead_prune.store import code_version
from lookahead_prune.train import TrainConfig, evaluate, train

METHODS = ("mp", "lap", "lap-forward")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-steps", type=int, default=3000)
    parser.add_argument("--retrain-steps", type=int, default=1000)
    parser.add_argument("--nm", default="2:4")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    data = load_dataset("mnist")
    rows: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
    dense_acc = []
    start = time.perf_counter()
    for seed in seeds:
        model = build_model("fcn", seed=seed)
        train(model, data.train_x, data.train_y, TrainConfig(args.train_steps, 1.2e-3, seed=seed))
        dense_acc.append(evaluate(model, data.test_x, data.test_y).accuracy)
        for method in METHODS:
            pruned = copy.deepcopy(model)
            report = lp.prune(pruned, method, args.nm)
            assert abs(report.keep - 0.5) < 1e-9 if args.nm == "2:4" else True
            before = evaluate(pruned, data.test_x, data.test_y).accuracy
            config = TrainConfig(args.retrain_steps, 1.2e-3, seed=seed)
            train(pruned, data.train_x, data.train_y, config)
            after = evaluate(pruned, data.test_x, data.test_y).accuracy
            rows[method].append((before, after))
            print(f"seed {seed} {method}: {100 * before:.2f}% -> {100 * after:.2f}%", flush=True)

    def cell(values: list[float]) -> str:
        values = [100 * v for v in values]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f}"

    print()
    print(f"FCN on MNIST, {args.nm} on every layer, {args.train_steps} dense steps, "
          f"{args.retrain_steps} retraining steps, seeds {args.seeds}; test accuracy (%), "
          f"mean ± std; dense: {cell(dense_acc)}")  # fmt: skip
    print()
    print("| method | before retraining | after retraining |")
    print("|---|---:|---:|")
    for method in METHODS:
        print(f"| {method} | {cell([b for b, _ in rows[method]])} | "
              f"{cell([a for _, a in rows[method]])} |")  # fmt: skip
    print(
        f"\nwall time {time.perf_counter() - start:.0f} s, torch {torch.__version__}, "
        f"code {code_version()}"
    )


if __name__ == "__main__":
    main()
