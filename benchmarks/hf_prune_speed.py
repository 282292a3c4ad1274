"""LAP vs MP pruning time on a GPT-2-small-sized model (124M parameters, from its config).

The model is ``transformers.GPT2LMHeadModel(GPT2Config())``: 12 layers, width 768, vocabulary
50,257, randomly initialised (no download). Every timing prunes a fresh ``copy.deepcopy`` of
it (the copy is not timed) with ``keep=0.05`` per layer, ``exclude=["lm_head"]`` (the head is
tied to the token embedding). Rows, each the median over the repeats, methods interleaved:

- ``mp``: ``lookahead_prune.prune(model, "mp", ...)``: magnitudes, no graph.
- ``lap``: ``prune(model, "lap", ...)`` on a model never seen before: the call captures the
  model with torch.export (fx cannot trace GPT-2) from a guessed batch of 8 token ids, walks
  the graph and scores.
- ``graph build``: ``build_graph`` alone (capture + walks), the one-time cost per model.
- ``lap (graph cached)``: ``prune`` on a copy whose graph was built just before (untimed).

    python benchmarks/hf_prune_speed.py             # 3 repeats
    python benchmarks/hf_prune_speed.py --quick     # 1 repeat
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as prune_speed.py: fair under load

import torch

import lookahead_prune as lp

KEEP = 0.05
EXCLUDE = ["lm_head"]


def gpt2_small() -> torch.nn.Module:
    """GPT-2 small (124M parameters) from its default config, randomly initialised."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).eval()


def _time(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repeat")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    warnings.simplefilter("ignore")
    dense = gpt2_small()
    n_params = sum(p.numel() for p in dense.parameters())
    rows: dict[str, list[float]] = {"mp": [], "lap": [], "graph build": [], "lap (cached)": []}
    for rep in range(repeats):
        order = ["mp", "lap", "graph build", "lap (cached)"]
        order = order[rep % 4 :] + order[: rep % 4]
        for row in order:
            model = copy.deepcopy(dense)
            if row == "mp":
                t = _time(lambda m=model: lp.prune(m, "mp", KEEP, exclude=EXCLUDE))
            elif row == "lap":
                t = _time(lambda m=model: lp.prune(m, "lap", KEEP, exclude=EXCLUDE))
            elif row == "graph build":
                t = _time(lambda m=model: lp.build_graph(m))
            else:
                lp.build_graph(model)
                t = _time(lambda m=model: lp.prune(m, "lap", KEEP, exclude=EXCLUDE))
            rows[row].append(t)
            print(f"repeat {rep}: {row:<14} {t:7.2f} s", flush=True)
            del model
    mp = statistics.median(rows["mp"])
    print(f"\nGPT-2 small, {n_params / 1e6:.1f}M parameters, keep={KEEP}, {repeats} repeats")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads")  # fmt: skip
    print("| row | median s | vs MP |\n|---|---:|---:|")
    for row, ts in rows.items():
        med = statistics.median(ts)
        print(f"| {row} | {med:.2f} | {med / mp:.1f}x |")


if __name__ == "__main__":
    main()
