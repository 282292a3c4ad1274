"""Training throughput: a naive DataLoader loop vs ``lookahead_prune.train``, in one run.

The model is the paper's FCN (784-500x4-10, ~1.2M weights) on MNIST at batch size 60 with
Adam (lr 1.2e-3), as in Appendix C. Rows, interleaved within each repeat so that load
from other processes hits them alike; each is timed after a short warm-up:

- ``DataLoader loop``: ``DataLoader(TensorDataset(x, y), batch_size=60, shuffle=True)``,
  ``torch.optim.Adam`` with its defaults, ``zero_grad()``, a ``loss.item()`` per step.
- ``DataLoader per-item``: the official code's pattern, a dataset that turns each uint8
  image into a normalised float tensor in ``__getitem__`` (ToTensor + Normalize), batched by
  the DataLoader's default collate.
- ``lap train``: :func:`lookahead_prune.train.train` on the same tensors.
- ``lap train, pruned``: the same after ``lp.prune(model, "lap", keep=0.05)`` (retraining).
- ``lap batched xK``: :func:`lookahead_prune.batched.train_batched` retraining K pruned copies
  at once (as a sweep does), in model-steps per second (K x steps / time); it runs
  ``max(50, steps // 8)`` steps.

Ratios divide by the DataLoader row. The median over repeats is the headline; the best
repeat is printed too, since a 2-core machine shared with other jobs is noisy.

    python benchmarks/train_throughput.py               # 500 steps, 5 repeats
    python benchmarks/train_throughput.py --quick       # 100 steps, 1 repeat
    python benchmarks/train_throughput.py --threads 1   # torch.set_num_threads(1)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lookahead_prune as lp
from lookahead_prune.batched import train_batched
from lookahead_prune.data import DatasetError, load_dataset
from lookahead_prune.models import build_model
from lookahead_prune.train import TrainConfig, paper_lr, train

BATCH = 60
WARMUP = 20


def mnist() -> tuple[Tensor, Tensor, str]:
    """Bundled MNIST training split, or random tensors of the same shape when it is missing."""
    try:
        data = load_dataset("mnist", download=False)
        return data.train_x, data.train_y, "MNIST"
    except DatasetError:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(60_000, 1, 28, 28, generator=generator)
        return x, torch.randint(0, 10, (60_000,), generator=generator), "random (MNIST missing)"


def dataloader_loop(x: Tensor, y: Tensor, steps: int) -> float:
    """Steps per second of the textbook loop."""
    model = build_model("fcn", seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=paper_lr("fcn"))
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)

    def run(count: int) -> None:
        done, total = 0, 0.0
        while done < count:
            for xb, yb in loader:
                loss = F.cross_entropy(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
                done += 1
                if done == count:
                    break

    run(WARMUP)
    start = time.perf_counter()
    run(steps)
    return steps / (time.perf_counter() - start)


class PerItemMNIST(torch.utils.data.Dataset):
    """Like torchvision's MNIST with ToTensor + Normalize: uint8 image -> float per item."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.images = (x * 0.3081 + 0.1307).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
        self.labels = y.numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img = torch.from_numpy(self.images[i]).float().div(255.0)
        return img.sub(0.1307).div(0.3081), int(self.labels[i])


def official_style_loop(x: Tensor, y: Tensor, steps: int) -> float:
    """Steps per second with per-item decoding and normalisation, as the official code does."""
    model = build_model("fcn", seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=paper_lr("fcn"))
    loader = DataLoader(PerItemMNIST(x, y), batch_size=BATCH, shuffle=True)
    done = 0
    start = 0.0
    while done < steps + WARMUP:
        for xb, yb in loader:
            if done == WARMUP:
                start = time.perf_counter()
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()
            done += 1
            if done == steps + WARMUP:
                break
    return steps / (time.perf_counter() - start)


def lap_train(x: Tensor, y: Tensor, steps: int, *, pruned: bool = False) -> float:
    """Steps per second of :func:`lookahead_prune.train.train` (after a warm-up call)."""
    model: nn.Module = build_model("fcn", seed=0)
    if pruned:
        lp.prune(model, method="lap", keep=0.05)
    train(model, x, y, TrainConfig(steps=WARMUP, lr=paper_lr("fcn")))
    return train(model, x, y, TrainConfig(steps=steps, lr=paper_lr("fcn"))).steps_per_second


def lap_batched(x: Tensor, y: Tensor, steps: int, count: int) -> float:
    """Model-steps per second of :func:`train_batched` on ``count`` pruned FCN copies."""
    models = []
    for i in range(count):
        model = build_model("fcn", seed=0)
        lp.prune(model, method="lap" if i % 2 else "mp", keep=0.05 * (1 + i % 4))
        models.append(model)
    train_batched(models, x, y, TrainConfig(steps=5, lr=paper_lr("fcn")))
    start = time.perf_counter()
    train_batched(models, x, y, TrainConfig(steps=steps, lr=paper_lr("fcn")))
    return count * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--quick", action="store_true", help="100 steps, 1 repeat")
    args = parser.parse_args()
    steps, repeats = (100, 1) if args.quick else (args.steps, args.repeats)
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y, source = mnist()
    rows: dict[str, Callable[[], float]] = {
        "DataLoader loop": lambda: dataloader_loop(x, y, steps),
        "DataLoader per-item": lambda: official_style_loop(x, y, steps),
        "lap train": lambda: lap_train(x, y, steps),
        "lap train, pruned": lambda: lap_train(x, y, steps, pruned=True),
    }
    for count in (8, 32, 64):
        rows[f"lap batched x{count}"] = lambda c=count: lap_batched(x, y, max(50, steps // 8), c)
    timings: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(repeats):
        for name, measure in rows.items():
            timings[name].append(measure())
    print(
        f"FCN 784-500x4-10, batch {BATCH}, Adam, {steps} steps x {repeats} repeats, data: "
        f"{source}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    base = statistics.median(timings["DataLoader loop"])
    print(f"{'':20} {'median (model-)steps/s':>22} {'best':>8} {'vs DataLoader':>14}")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"{name:20} {median:22.1f} {max(values):8.1f} {median / base:13.2f}x")


if __name__ == "__main__":
    main()
