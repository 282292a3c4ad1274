"""How fast is pruning? LAP vs MP vs ``torch.nn.utils.prune.l1_unstructured``, in one run.

Two models: VGG-19 (``build_model("vgg19", in_channels=3, image_size=32)``, ~20.0M weights)
and an ImageNet-width ResNet-50 (defined below, ~25.6M parameters, 224x224 inputs). Every
timing prunes a fresh ``copy.deepcopy`` of a prepared dense model (the copy is not timed);
methods are interleaved within each repeat, in an order that rotates from repeat to repeat,
and each cell of the table is the median over the repeats. Rows:

- ``mp`` / ``lap``: ``lookahead_prune.prune(model, method, keep=0.05)`` on a model never seen
  before (the call traces the model and builds its layer graph).
- ``torch l1``: ``torch.nn.utils.prune.l1_unstructured(module, "weight", amount=0.95)`` over
  the same prunable layers.
- ``graph build``: ``lookahead_prune.build_graph`` alone, the one-time cost per model object.
- ``mp (graph cached)`` / ``lap (graph cached)``: ``prune`` on a copy whose graph was built
  (untimed) just before; the graph cache is keyed by model object, so this is what a second
  ``prune``/``compute_masks`` on the same model costs. The cache hit is checked.

Ratios: ``vs MP`` divides by the ``mp`` row in the same graph state (cold rows and
``graph build`` by ``mp``, cached rows by ``mp (graph cached)``); ``vs torch`` by ``torch l1``.

    python benchmarks/prune_speed.py               # 5 repeats, both models
    python benchmarks/prune_speed.py --quick       # 1 repeat, smoke test
    python benchmarks/prune_speed.py --profile     # plus a cProfile of LAP on VGG-19

OpenMP threads busy-wait between parallel regions by default; when other processes share the
CPU (as on a 2-core box running tests beside us) that spinning made every timing 5-15x slower
and erratic. So, unless the environment already says otherwise, this script sets
``OMP_WAIT_POLICY=PASSIVE`` before torch loads: all methods run under the same policy.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see above

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

import lookahead_prune as lp
from lookahead_prune.graph import prunable_layers
from lookahead_prune.models import build_model

KEEP = 0.05
GOAL_RATIO = 1.2  # the project's goal for VGG-19: LAP <= 1.2x MP ...
GOAL_SECONDS = 0.5  # ... and <= 0.5 s on a 2-core CPU

# --------------------------------------------------------------------------- ResNet-50


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride) -> 1x1 (x4 channels), each with BN, plus a shortcut.

    The shortcut is a 1x1 conv + BN projection when the shape changes, the identity otherwise
    (``shortcut is None`` is resolved while tracing, so the traced graph has a plain add).
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the residual block."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + skip)


class ResNet50(nn.Module):
    """ImageNet ResNet-50 (v1.5 strides): 7x7 stem + max pool, [3, 4, 6, 3] Bottlenecks of
    widths 64/128/256/512, adaptive average pooling, Linear(2048, num_classes)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages: list[nn.Module] = []
        in_channels = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(in_channels, width, stride if b == 0 else 1))
                in_channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for [N, 3, H, W] images (any H, W >= 1: the head is adaptive)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """A dense model to prune, and the input shape-propagation should use (None: guess)."""

    name: str
    model: nn.Module
    example_inputs: tuple[Tensor, ...] | None


def make_cases(names: Sequence[str]) -> list[Case]:
    """The benchmark models, built once with fixed seeds, in eval mode."""
    cases = []
    for name in names:
        if name == "vgg19":
            model = build_model("vgg19", in_channels=3, image_size=32, seed=0)
            # 32x32 is the model's real input and the graph builder's first guess.
            cases.append(Case(name, model.eval(), None))
        elif name == "resnet50":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = ResNet50()
            # Real inputs are 3x224x224, but the head is adaptive, so a 32x32 batch of one
            # gives the same layer graph for ~50x less shape-propagation work.
            cases.append(Case(name, model.eval(), (torch.zeros(1, 3, 32, 32),)))
        else:
            raise ValueError(f"unknown model {name!r}")
    return cases


def count_weights(model: nn.Module) -> int:
    """Number of weights in the prunable (Linear/Conv) layers."""
    return sum(m.weight.numel() for m in prunable_layers(model).values())


# --------------------------------------------------------------------------- methods

# A method gets a fresh dense copy (and its case) and returns a callable to time.
Method = Callable[[nn.Module, Case], Callable[[], object]]


def _lp_prune(method: str, cached: bool) -> Method:
    def prepare(model: nn.Module, case: Case) -> Callable[[], object]:
        if cached:
            graph = lp.build_graph(model, example_inputs=case.example_inputs)

            def run() -> object:
                report = lp.prune(model, method, keep=KEEP, example_inputs=case.example_inputs)
                if lp.build_graph(model, example_inputs=case.example_inputs) is not graph:
                    raise RuntimeError("graph cache missed: the 'cached' timing rebuilt the graph")
                return report

            return run
        return lambda: lp.prune(model, method, keep=KEEP, example_inputs=case.example_inputs)

    return prepare


def _torch_l1(model: nn.Module, case: Case) -> Callable[[], object]:
    modules = list(prunable_layers(model).values())

    def run() -> object:
        for module in modules:
            torch_prune.l1_unstructured(module, "weight", amount=1.0 - KEEP)
        return None

    return run


def _graph_build(model: nn.Module, case: Case) -> Callable[[], object]:
    return lambda: lp.build_graph(model, example_inputs=case.example_inputs)


METHODS: dict[str, Method] = {
    "mp": _lp_prune("mp", cached=False),
    "lap": _lp_prune("lap", cached=False),
    "torch l1": _torch_l1,
    "graph build": _graph_build,
    "mp (graph cached)": _lp_prune("mp", cached=True),
    "lap (graph cached)": _lp_prune("lap", cached=True),
}
BASELINE_MP = {
    "mp": "mp",
    "lap": "mp",
    "torch l1": "mp",
    "graph build": "mp",
    "mp (graph cached)": "mp (graph cached)",
    "lap (graph cached)": "mp (graph cached)",
}


def time_once(case: Case, method: str) -> float:
    """Seconds for one call of ``method`` on a fresh dense copy (copy and set-up untimed)."""
    model = copy.deepcopy(case.model)
    run = METHODS[method](model, case)
    gc.collect()
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    del run, model
    return elapsed


def run_benchmark(
    cases: Sequence[Case], repeats: int, warmup: bool = True
) -> dict[tuple[str, str], list[float]]:
    """All (model, method) timings, interleaved, the method order rotating every repeat.

    With ``warmup`` every (model, method) runs once untimed first: first calls pay for lazy
    imports, fx code generation and allocator growth.
    """
    methods = list(METHODS)
    times: dict[tuple[str, str], list[float]] = {(c.name, m): [] for c in cases for m in methods}
    if warmup:
        for case in cases:
            for method in methods:
                time_once(case, method)
    for r in range(repeats):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for case in cases:
            for method in order:
                times[(case.name, method)].append(time_once(case, method))
        print(f"  repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return times


def table(cases: Sequence[Case], times: dict[tuple[str, str], list[float]]) -> str:
    """Markdown table: model, method, median seconds, ratios to MP and to torch l1."""
    lines = [
        "| model | method | median s | min s | vs MP | vs torch l1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for case in cases:
        med = {m: statistics.median(times[(case.name, m)]) for m in METHODS}
        for m in METHODS:
            lo = min(times[(case.name, m)])
            lines.append(
                f"| {case.name} | {m} | {med[m]:.3f} | {lo:.3f} | "
                f"{med[m] / med[BASELINE_MP[m]]:.2f}x | {med[m] / med['torch l1']:.2f}x |"
            )
    return "\n".join(lines)


def goal_line(times: dict[tuple[str, str], list[float]]) -> str:
    """Whether VGG-19 meets the project's goal: LAP <= 1.2x MP and <= 0.5 s."""
    if ("vgg19", "lap") not in times:
        return "goal: not checked (vgg19 not benchmarked)"
    lap = statistics.median(times[("vgg19", "lap")])
    mp = statistics.median(times[("vgg19", "mp")])
    ok = lap <= GOAL_RATIO * mp and lap <= GOAL_SECONDS
    return (
        f"goal (VGG-19: LAP <= {GOAL_RATIO}x MP and <= {GOAL_SECONDS} s): "
        f"LAP {lap:.3f} s = {lap / mp:.2f}x MP -> {'MET' if ok else 'NOT MET'}"
    )


# --------------------------------------------------------------------------- profile

# Engine functions whose cumulative time splits one prune() call into phases.
PHASES: tuple[tuple[str, str], ...] = (
    ("graph/__init__.py", "build_graph"),
    ("masks.py", "effective_weight"),
    ("prune.py", "_check_finite"),
    ("masks.py", "current_mask"),
    ("prune.py", "_score_layers"),
    ("masks.py", "top_k_mask"),
    ("masks.py", "apply_mask"),
)


def profile_lap(case: Case, top: int = 15) -> str:
    """cProfile of one cold ``prune(copy, 'lap')``: per-phase time and the top functions."""
    time_once(case, "lap")  # warm-up
    model = copy.deepcopy(case.model)
    gc.collect()
    prof = cProfile.Profile()
    prof.enable()
    lp.prune(model, "lap", keep=KEEP, example_inputs=case.example_inputs)
    prof.disable()
    stats = pstats.Stats(prof)
    raw = stats.stats  # type: ignore[attr-defined]
    total = max(ct for (_, _, _), (_, _, _, ct, _) in raw.items())
    out = [f"cProfile of prune({case.name}, 'lap', keep={KEEP}) cold: {total:.3f} s", ""]
    out.append("| phase (cumulative) | calls | s | share |")
    out.append("|---|---:|---:|---:|")
    for file, func in PHASES:
        for (path, _, name), (_, ncalls, _, ct, _) in raw.items():
            if name == func and path.endswith(os.path.join("lookahead_prune", file)):
                out.append(f"| {file}:{func} | {ncalls} | {ct:.3f} | {100 * ct / total:.0f}% |")
    out += ["", f"top {top} by own time:", "", "| function | calls | own s | cum s |"]
    out.append("|---|---:|---:|---:|")
    ranked = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    for (path, line, name), (_, ncalls, tt, ct, _) in ranked:
        where = name if path == "~" else f"{os.path.basename(path)}:{line}({name})"
        out.append(f"| {where} | {ncalls} | {tt:.3f} | {ct:.3f} |")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def machine() -> str:
    """nproc, CPU model, torch version and threads, for the results file."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"nproc={os.cpu_count()}, CPU: {cpu}, torch {torch.__version__}, "
        f"torch threads={torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, Python {platform.python_version()}, "
        f"load avg (1 min) at start={load:.2f}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, run the interleaved benchmark, print the table (and profile)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument(
        "--quick", action="store_true", help="1 repeat and no warm-up, for smoke tests"
    )
    parser.add_argument(
        "--models", nargs="+", default=["vgg19", "resnet50"], choices=["vgg19", "resnet50"]
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--profile", action="store_true", help="cProfile LAP on VGG-19 too")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    print(machine())
    cases = make_cases(args.models)
    for case in cases:
        params = sum(p.numel() for p in case.model.parameters()) / 1e6
        weights = count_weights(case.model) / 1e6
        print(f"{case.name}: {params:.2f}M parameters, {weights:.2f}M prunable weights")
    print(f"keep={KEEP}, repeats={repeats} (median), methods interleaved\n")
    times = run_benchmark(cases, repeats, warmup=not args.quick)
    print(table(cases, times))
    print()
    print(
        goal_line(times)
        + (" (--quick: no warm-up, one sample; not a verdict)" if args.quick else "")
    )
    if hasattr(os, "getloadavg"):
        print(f"load avg (1 min) at end={os.getloadavg()[0]:.2f} (other processes share the CPU)")
    if args.profile:
        vgg = next((c for c in cases if c.name == "vgg19"), None) or make_cases(["vgg19"])[0]
        print()
        print(profile_lap(vgg))


if __name__ == "__main__":
    main()
