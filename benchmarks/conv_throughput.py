"""Conv-net training throughput (images/s): eager vs compiled, fp32 vs bf16, NCHW vs NHWC.

Conv-6 and VGG-16 on Fashion-MNIST-shaped data (1x28x28, random when the dataset is
missing), pruned to 10% with LAP so that every step goes through the masked-training path
that retraining uses, at the paper's batch size 60 with Adam. Each row is
:func:`lookahead_prune.train.train` with one :class:`TrainConfig`:

- ``eager``: the default (fp32, NCHW, no compilation);
- ``eager channels_last``: NHWC memory layout;
- ``eager bf16``: bfloat16 autocast for forward and loss (weights and Adam stay fp32);
- ``compiled``: ``torch.compile`` of the forward+loss (inductor), fp32 NCHW;
- ``compiled bf16 channels_last``: all three (the GPU configuration of ``FULL=1`` runs).

Every row runs on the CPU and, when there is one, on the GPU; compilation and warm-up happen
in an untimed first call, then ``--steps`` steps are timed ``--repeats`` times with the rows
interleaved, and the median is reported. The device and torch version are printed with the
table. Fashion-MNIST is read from ``$LAP_DATA`` (random data of its shape if missing).

    python benchmarks/conv_throughput.py                  # 20 timed steps x 3 repeats
    python benchmarks/conv_throughput.py --quick          # 3 steps, 1 repeat, Conv-6 only
    python benchmarks/conv_throughput.py --devices cuda --steps 200
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from dataclasses import replace

import torch
from torch import Tensor

import lookahead_prune as lp
from lookahead_prune.data import DatasetError, load_dataset
from lookahead_prune.models import build_model
from lookahead_prune.train import TrainConfig, train

BATCH = 60
ROWS: dict[str, dict[str, object]] = {
    "eager": {},
    "eager channels_last": {"channels_last": True},
    "eager bf16": {"precision": "bf16"},
    "compiled": {"compile": True},
    "compiled bf16 channels_last": {"compile": True, "precision": "bf16", "channels_last": True},
}


def fashion_mnist(device: torch.device) -> tuple[Tensor, Tensor, str]:
    """Fashion-MNIST's training split on ``device``, or random tensors of its shape."""
    try:
        data = load_dataset("fashion-mnist", download=False, device=device)
        return data.train_x, data.train_y, "Fashion-MNIST"
    except DatasetError:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(10_000, 1, 28, 28, generator=g)
        return x.to(device), torch.randint(0, 10, (10_000,), generator=g).to(device), "random"


def images_per_second(
    model_name: str, configs: dict[str, TrainConfig], x: Tensor, y: Tensor, repeats: int
) -> dict[str, float]:
    """Median images/s per row, rows interleaved within each repeat (so load from other
    processes hits them alike), after one untimed warm-up call per row (compilation)."""
    models = {}
    for row, config in configs.items():
        model = build_model(model_name, seed=0)
        lp.prune(model, "lap", 0.1)
        models[row] = model.to(x.device)
        train(model, x, y, replace(config, steps=max(3, config.steps // 4)))
    rates: dict[str, list[float]] = {row: [] for row in configs}
    for _ in range(repeats):
        for row, config in configs.items():
            result = train(models[row], x, y, config)
            rates[row].append(config.steps * config.batch_size / result.wall_time)
    return {row: statistics.median(r) for row, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="conv6,vgg16")
    parser.add_argument("--devices", default="cpu,cuda", help="those missing here are skipped")
    parser.add_argument("--rows", default=",".join(ROWS), help="subset of: " + ", ".join(ROWS))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.quick:
        args.steps, args.repeats, args.models = 3, 1, "conv6"
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {threads} CPU threads, "
          f"batch {BATCH}, Adam, LAP-pruned to 10%")  # fmt: skip
    print()
    print("| device | model | row | images/s | vs eager |")
    print("|---|---|---|---:|---:|")
    for device_name in devices:
        device = torch.device(device_name)
        cuda = device.type == "cuda"
        label = torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})"
        x, y, source = fashion_mnist(device)
        for model_name in args.models.split(","):
            configs = {
                row: TrainConfig(steps=args.steps, lr=3e-4, batch_size=BATCH, **ROWS[row])
                for row in rows
            }
            rates = images_per_second(model_name, configs, x, y, args.repeats)
            base = rates[rows[0]]
            for row, rate in rates.items():
                print(f"| {label} | {model_name} | {row} | {rate:.0f} | {rate / base:.2f}x |",
                      flush=True)  # fmt: skip
        print(f"\n(data: {source} on {device_name})")


if __name__ == "__main__":
    main()
