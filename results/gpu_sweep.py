"""Issue 24: the paper's protocol on a lent GPU, resumable across device calls (run_fmnist_gpu.sh).

Stages, in order: Conv-6 (Table 2: levels 12-18; MP, LAP, LAP-forward/-backward and their -seq
variants), then VGG-11 (Table 3) and ResNet-18 (Table 6) with MP, LAP, LAP-forward, all on
Fashion-MNIST, seed 0, Adam 3e-4, batch 60, the paper's steps (Conv-6 30k + 20k, VGG-11 and
ResNet-18 35k + 25k). Per stage: one dense model, then the pruned copies retrained together by
the ``vmap`` engine, as one group when it fits in the time left, else in groups of whole methods
(all levels of a method together) that do.

A device call is bounded (10 minutes); the sweep stores per group and a group killed midway
stores nothing, so nothing starts unless it is estimated to end ``MARGIN_S`` before the
deadline: the dense model from a timed probe of its own training steps, a group from a timed
probe of that group (vmap, warm-up first) plus the measured cost of pruning and evaluating one
copy. What would not fit is left for the next call, said in the log and in ``status.json``.

State travels between calls through ``results/gpu-carry/`` (git-ignored; carry it):
``gpu-carry/fashion-mnist/*.gz`` (the data, copied in once) and ``gpu-carry/state/`` (what the
last call left under ``$OUT/sweep``: the database and the dense checkpoints as a tar split
in 15 MiB parts, since ``$OUT`` files must stay under 16 MiB). At the start the newer state
is restored; after each dense model and each group, and at the end, the database (an SQLite
backup, consistent under WAL) and the checkpoints go to ``$OUT/sweep`` again.

Environment: ``OUT`` (where state goes; none: not copied), ``DEADLINE_AT`` (epoch seconds) or
``DEADLINE`` (seconds from now; default 540), ``DEVICE`` (cuda), ``PRECISION`` (fp32: PyTorch's
default, convolutions in TF32; bf16: autocast; auto, the default: see :func:`pick_precision`),
``CHECK_JSON`` (gpu_check.json of this machine, for auto), ``STAGES`` ("conv6 vgg11
resnet18"), ``DB`` (results/fmnist-gpu.sqlite), ``DRY=1`` (a CPU rehearsal of the whole path:
20 + 10 steps, batch 12, two levels, 200 evaluation images, database
runs/fmnist-gpu-dry.sqlite).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import prune as torch_prune

from lookahead_prune.backends import run_sweep
from lookahead_prune.batched import train_batched
from lookahead_prune.data import load_dataset
from lookahead_prune.pipeline import (
    DenseModel,
    Protocol,
    _test_set,
    dense_model,
    new_model,
    prune_and_retrain_many,
)
from lookahead_prune.store import RunStore, config_hash
from lookahead_prune.sweep import Sweep, run_config
from lookahead_prune.train import PAPER_STEPS, evaluate, train
from lookahead_prune.workdir import dense_path, get_dense

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / "results" / "gpu-carry"
MARGIN_S = 20.0
"""Seconds kept free before the deadline: copying the state out, and estimation error."""
SAFETY = 1.05
"""Estimates are multiplied by this (a probe's rate can drift over a long run)."""
PART_BYTES = 15 * 2**20
CKPT_LIMIT = 33 * 2**20
"""Checkpoints sent back at most (with the 31 MB of data, under the 64 MiB a call carries)."""

CONV6_METHODS = ["mp", "lap", "lap-forward", "lap-backward", "lap-forward-seq", "lap-backward-seq"]


@dataclass(frozen=True)
class Stage:
    model: str
    levels: list[int]
    methods: list[str]
    dry_levels: list[int]


STAGES = {
    "conv6": Stage("conv6", list(range(12, 19)), CONV6_METHODS, [12, 18]),
    "vgg11": Stage("vgg11", list(range(11, 26, 2)), ["mp", "lap", "lap-forward"], [11, 25]),
    "resnet18": Stage("resnet18", list(range(14, 36, 3)), ["mp", "lap", "lap-forward"], [14, 35]),
}


class Call:
    """One device call: its deadline, log, status and the copies it sends back."""

    def __init__(self) -> None:
        self.start = time.time()
        if os.environ.get("DEADLINE_AT"):
            self.deadline = float(os.environ["DEADLINE_AT"])
        else:
            self.deadline = self.start + float(os.environ.get("DEADLINE", "540"))
        self.dry = os.environ.get("DRY", "0") == "1"
        default_db = "runs/fmnist-gpu-dry.sqlite" if self.dry else "results/fmnist-gpu.sqlite"
        self.db = ROOT / os.environ.get("DB", default_db)
        self.workdir = self.db.with_name(self.db.stem + "-checkpoints")
        self.device = os.environ.get("DEVICE", "cpu" if self.dry else "cuda")
        self.precision = os.environ.get("PRECISION", "auto")  # per stage: see pick_precision
        self.stages = os.environ.get("STAGES", "conv6 vgg11 resnet18").split()
        out = os.environ.get("OUT")
        self.out = Path(out) / "sweep" if out else None
        self.status: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                       "deadline_in_s": round(self.deadline - self.start),
                                       "dry": self.dry, "device": self.device,
                                       "precision": self.precision, "events": []}  # fmt: skip
        self.lines: list[str] = []

    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, text: str) -> None:
        line = f"[{time.time() - self.start:6.0f}s] {text}"
        print(line, flush=True)
        self.lines.append(line)

    def event(self, **entry: Any) -> None:
        entry["at_s"] = round(time.time() - self.start, 1)
        self.status["events"].append(entry)
        self.log(json.dumps(entry))
        self.save_status()

    def save_status(self) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "status.json").write_text(json.dumps(self.status, indent=1))
        (self.out / "sweep.log").write_text("\n".join(self.lines) + "\n")

    def fits(self, seconds: float) -> bool:
        return time.time() + SAFETY * seconds + MARGIN_S <= self.deadline

    # -- state in and out --------------------------------------------------------------
    def restore(self) -> None:
        """Take the database and checkpoints a previous call left in results/gpu-carry/state."""
        state = CARRY / "state"
        carried = state / self.db.name
        if carried.exists() and runs_in(carried) > runs_in(self.db):
            self.db.parent.mkdir(parents=True, exist_ok=True)
            for suffix in ("-wal", "-shm"):
                Path(str(self.db) + suffix).unlink(missing_ok=True)
            shutil.copyfile(carried, self.db)
            self.log(f"restored {runs_in(self.db)} stored runs from {carried}")
        if self.db.exists():
            with sqlite3.connect(self.db) as conn:  # a killed call's claims are void here
                if conn.execute("SELECT name FROM sqlite_master WHERE name='claims'").fetchone():
                    conn.execute("DELETE FROM claims")
        parts = sorted(state.glob("ckpt.tar.part-*"))
        if parts:
            self.workdir.mkdir(parents=True, exist_ok=True)
            cat = subprocess.Popen(["cat", *map(str, parts)], stdout=subprocess.PIPE)
            # existing (complete) files win: --skip-old-files
            subprocess.run(["tar", "-x", "--skip-old-files", "-C", str(self.workdir)],
                           stdin=cat.stdout, check=True)  # fmt: skip
            cat.wait()
            self.log(f"restored checkpoints {sorted(p.name for p in self.workdir.glob('*.pt'))}")

    def send_back(self) -> None:
        """The database (SQLite backup) and the checkpoints, under $OUT/sweep."""
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if self.db.exists():
            tmp = self.out / (self.db.name + ".tmp")
            with sqlite3.connect(self.db) as src, sqlite3.connect(tmp) as dst:
                src.backup(dst)
            tmp.replace(self.out / self.db.name)
        files, total = [], 0
        for path in sorted(self.workdir.glob("dense-*.pt"), key=lambda p: p.stat().st_mtime):
            if total + path.stat().st_size > CKPT_LIMIT:
                self.log(f"not sent back (too large to carry): {path.name}")
                continue
            files.append(path.name)
            total += path.stat().st_size
        if files and files != self.status.get("checkpoints_sent"):
            for old in self.out.glob("ckpt.tar.part-*"):
                old.unlink()
            tar = subprocess.Popen(["tar", "-c", "-C", str(self.workdir), *files],
                                   stdout=subprocess.PIPE)  # fmt: skip
            prefix = str(self.out / "ckpt.tar.part-")
            subprocess.run(["split", "-b", str(PART_BYTES), "-d", "-", prefix],
                           stdin=tar.stdout, check=True)  # fmt: skip
            tar.wait()
            self.status["checkpoints_sent"] = files
        self.status["stored_runs"] = runs_in(self.db)
        self.save_status()


def runs_in(db: Path) -> int:
    if not db.exists():
        return -1
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT count(*) FROM runs").fetchone()[0]
    except sqlite3.Error:
        return 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def probe_dense(protocol: Protocol, data: Any, dry: bool) -> float:
    """Seconds the dense training should take: a timed run of a fresh model, after a warm-up."""
    device = data.train_x.device
    model = new_model(protocol, data).to(device)
    config = protocol.train_config(3)
    train(model, data.train_x, data.train_y, config)
    n = 5 if dry else 300
    per_step = timed(device, lambda: train(model, data.train_x, data.train_y,
                                           replace(config, steps=n))) / n  # fmt: skip
    evals = timed(device, lambda: evaluate(model, *_test_set(protocol, data)))
    return protocol.train_steps * per_step + 2 * evals


def clone_pruned(protocol: Protocol, dense: Any, data: Any, pruned: torch.nn.Module):
    model = dense_model(protocol, dense, data)
    for name, module in pruned.named_modules():
        if hasattr(module, "weight_mask"):
            torch_prune.custom_from_mask(model.get_submodule(name), "weight", module.weight_mask)
    return model


def probe_group(protocol: Protocol, dense: Any, data: Any, level: int, copies: int, dry: bool):
    """Seconds to prune, evaluate and retrain ``copies`` models as one vmap group."""
    device = data.train_x.device
    one = dense_model(protocol, dense, data)
    start = time.perf_counter()  # the slowest method's pruning and the four evaluations
    prune_and_retrain_many(replace(protocol, retrain_steps=0), [one], dense, data,
                           [("lap-backward-seq", level)])  # fmt: skip
    sync(device)
    per_model = time.perf_counter() - start
    models = [clone_pruned(protocol, dense, data, one) for _ in range(copies)]
    config = protocol.train_config(3)
    train_batched(models, data.train_x, data.train_y, config)  # warm-up, cuDNN choices
    n = 2 if dry else 15
    per_step = timed(device, lambda: train_batched(models, data.train_x, data.train_y,
                                                   replace(config, steps=n))) / n  # fmt: skip
    models.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return protocol.retrain_steps * per_step + copies * per_model, per_step


def measured_ms(check: dict[str, Any], model: str, precision: str, engine: str, copies: int):
    """ms per step the check measured for the smallest group of at least ``copies``, or None."""
    rows = [r for r in check.get("throughput", []) if r.get("status") == "ok"
            and (r["model"], r["precision"], r["engine"]) == (model, precision, engine)
            and r["copies"] >= copies]  # fmt: skip
    return min(rows, key=lambda r: r["copies"])["ms_per_step"] if rows else None


def pick_precision(call: Call, stage: Stage, templates: dict[str, Protocol], levels) -> str:
    """``PRECISION=auto``: the precision a stage already started with (its dense checkpoint or
    stored runs), else fp32 when the check (``CHECK_JSON``) says that dense training and one
    group of all copies end in the time left, else bf16 (faster); fp32 without measurements."""
    for precision, template in templates.items():
        protocol = template
        if dense_path(call.workdir, protocol).exists():
            return precision
        with RunStore(call.db) as store:
            if any(store.has(config_hash(run_config(protocol, m, lv, levels)))
                   for m in stage.methods for lv in levels):  # fmt: skip
                return precision
    path = os.environ.get("CHECK_JSON", "")
    if not path or not Path(path).is_file():
        return "fp32"
    check = json.loads(Path(path).read_text())
    copies = len(levels) * len(stage.methods)
    template = templates["fp32"]
    measured = False
    for precision in ("fp32", "bf16"):
        dense = measured_ms(check, stage.model, precision, "sequential", 1) or measured_ms(
            check, stage.model, "fp32", "sequential", 1)  # fmt: skip
        group = measured_ms(check, stage.model, precision, "vmap", copies)
        if dense is None or group is None:
            continue
        measured = True
        estimate = (template.train_steps * dense + template.retrain_steps * group) / 1000
        estimate += copies + 30  # pruning and evaluation, probes
        call.event(
            stage=stage.model,
            what="precision estimate from the check",
            precision=precision,
            estimate_s=round(estimate),
            left_s=round(call.left()),
        )
        if call.fits(estimate):
            return precision
    return "bf16" if measured else "fp32"


def run_stage(call: Call, stage: Stage) -> bool:
    """Do what fits of one stage; True when the stage is complete."""
    levels = stage.dry_levels if call.dry else stage.levels
    train_steps, retrain_steps = (20, 10) if call.dry else PAPER_STEPS[stage.model]
    templates = {
        precision: Protocol(
            model=stage.model,
            dataset="fashion-mnist",
            seed=0,
            train_steps=train_steps,
            retrain_steps=retrain_steps,
            precision=precision,
            engine="vmap",
            batch_size=12 if call.dry else 60,
            eval_examples=200 if call.dry else None,
        )
        for precision in ("fp32", "bf16")
    }
    precision = call.precision
    if precision == "auto":
        precision = pick_precision(call, stage, templates, levels)
    call.event(stage=stage.model, what="precision", precision=precision, asked=call.precision)
    template = templates[precision]
    sweep = Sweep(template, [stage.model], ["fashion-mnist"], stage.methods, levels, [0])
    protocol = sweep.protocols()[0]

    def missing() -> list[str]:
        with RunStore(call.db) as store:
            return [m for m in stage.methods
                    if any(not store.has(config_hash(run_config(protocol, m, lv, levels)))
                           for lv in levels)]  # fmt: skip

    todo = missing()
    if not todo:
        call.event(stage=stage.model, what="complete", runs=len(levels) * len(stage.methods))
        return True
    data = load_dataset("fashion-mnist", device=call.device)
    probes: dict[int, tuple[float, float]] = {}  # copies -> (estimated s, s per step)
    if not dense_path(call.workdir, protocol).exists():
        estimate = probe_dense(protocol, data, call.dry)
        model = new_model(protocol, data)
        size = 3 * 4 * sum(p.numel() for p in model.parameters())  # state, init, rewind
        if size > CKPT_LIMIT:  # its checkpoint cannot travel: dense and groups in this call
            untrained = DenseModel(*[{k: v.cpu() for k, v in model.state_dict().items()}] * 3,
                                   0.0, 0.0, 0.0, 0.0)  # fmt: skip
            copies = len(levels) * len(todo)
            probes[copies] = probe_group(protocol, untrained, data, max(levels), copies, call.dry)
            group = probes[copies][0]
            call.event(stage=stage.model, what="checkpoint too large to carry: dense and all "
                       "groups must fit in this call", dense_s=round(estimate),
                       group_s=round(group), copies=copies)  # fmt: skip
            estimate += group
        if not call.fits(estimate):
            call.event(stage=stage.model, what="dense: does not fit, left for the next call",
                       estimate_s=round(estimate), left_s=round(call.left()))  # fmt: skip
            return False
        t = time.perf_counter()
        dense, _ = get_dense(protocol, data, call.workdir)
        call.event(stage=stage.model, what="dense trained", seconds=round(time.perf_counter() - t),
                   estimate_s=round(estimate), test_acc=dense.test_acc)  # fmt: skip
        call.send_back()
    dense, _ = get_dense(protocol, data, call.workdir)
    while todo := missing():
        chosen = None
        for n in range(len(todo), 0, -1):  # the largest group of whole methods that fits
            copies = n * len(levels)
            if copies not in probes:
                scaled = [(e * copies / k, s) for k, (e, s) in probes.items() if k > copies]
                if scaled and not call.fits(max(scaled)[0]):
                    continue  # a lower bound already says no: smaller groups are less efficient
                probes[copies] = probe_group(protocol, dense, data, max(levels), copies, call.dry)
                call.event(stage=stage.model, what="group probe", copies=copies,
                           estimate_s=round(probes[copies][0]),
                           ms_per_step=round(1000 * probes[copies][1], 2))  # fmt: skip
            if call.fits(probes[copies][0]):
                chosen = todo[:n]
                break
        if chosen is None:
            call.event(stage=stage.model, what="no group fits, left for the next call",
                       methods_left=todo, left_s=round(call.left()))  # fmt: skip
            return False
        copies = len(chosen) * len(levels)
        t = time.perf_counter()
        part = Sweep(template, [stage.model], ["fashion-mnist"], chosen, levels, [0])
        stats = run_sweep(part, call.db, workdir=call.workdir, device=call.device,
                          progress=False, log=call.log, batch_models=copies)  # fmt: skip
        call.event(stage=stage.model, what="group retrained", methods=chosen, copies=copies,
                   stored=stats.done, seconds=round(time.perf_counter() - t),
                   estimate_s=round(probes[copies][0]))  # fmt: skip
        call.send_back()
    call.event(stage=stage.model, what="complete", runs=len(levels) * len(stage.methods))
    return True


def check_failures() -> list[str]:
    """Agreement cases of the check (``CHECK_JSON``) that the sweep relies on and that failed."""
    path = os.environ.get("CHECK_JSON", "")
    if not path or not Path(path).is_file():
        return []
    cases = json.loads(Path(path).read_text()).get("agreement", [])
    relied = ("vmap-vs-sequential-sgd-f64", "vmap-vs-sequential-bn-sgd-f64")  # the exact paths
    return [c["case"] for c in cases if c["case"] in relied and not c["pass"]]


def main() -> int:
    call = Call()
    os.environ.setdefault("LAP_DATA", str(CARRY if (CARRY / "fashion-mnist").is_dir()
                                          else ROOT.parent / "shared" / "data"))  # fmt: skip
    call.log(f"deadline in {call.left():.0f} s; device {call.device}; precision "
             f"{call.precision}; db {call.db}; data {os.environ['LAP_DATA']}")  # fmt: skip
    if call.device.startswith("cuda"):
        # fixed shapes (batch 60, evaluation batches of 1000): cuDNN's timed choice pays, most
        # for the grouped convolutions vmap makes; a runtime choice, never part of a run's key
        torch.backends.cudnn.benchmark = os.environ.get("CUDNN_BENCHMARK", "1") == "1"
        call.status["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        call.status["gpu"] = torch.cuda.get_device_name()
        call.status["torch"] = torch.__version__
    call.restore()
    failed = check_failures()
    if failed:
        call.event(what="the check says vmap disagrees with train() here: no sweep", cases=failed)
        call.send_back()
        return 1
    try:
        for name in call.stages:
            if not run_stage(call, STAGES[name]):
                break  # later stages are larger: they do not fit either
    finally:
        call.status["seconds"] = round(time.time() - call.start)
        call.send_back()
        call.log(f"stored runs: {runs_in(call.db)}; {call.left():.0f} s before the deadline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
