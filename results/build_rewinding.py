"""Build the rewinding study's files (issue 19) from its results database.

    python results/build_rewinding.py                          # results/mnist-rewinding.sqlite
    python results/build_rewinding.py /tmp/dry.sqlite --out /tmp/dry-files

Reads the runs that ``results/run_rewinding.sh`` stored and writes, under
``results/mnist-rewinding/``:

- ``grid.csv`` / ``grid.md``: one-shot test error, mean±std over seeds, per retraining mode x
  method x level (weight rewinding to k = 5% of T, the grid's), with the seeds counted;
- ``gain.csv`` / ``gain.md``: LAP's (and LAP-forward-seq's) relative gain over MP per mode;
- ``grid.png``: error vs % kept, one panel per mode, MP vs LAP vs LAP-forward-seq, the dense
  models' error dashed;
- ``iterative.csv`` / ``iterative.md``: iterative pruning, fine-tuning vs LR rewinding;
- ``budget.csv`` / ``budget.png``: error against the retraining budget t at 1.63% and 0.23%
  kept, for fine-tuning, LR rewinding and weight rewinding to k = T - t;
- ``protocol.txt``: seeds, steps, code versions, time.

A part with no runs yet is skipped with a note; cells hold the seeds stored so far (``n``).
Nothing here trains or prunes, and the same database gives the same bytes.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from build_mnist import _stats, _write_csv, dense_accuracy, newest, protocol_note
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from lookahead_prune.report import method_label, method_order
from lookahead_prune.store import RunStore

HERE = Path(__file__).resolve().parent
MODES = ("finetune", "rewind-lr", "lottery", "rewind-weights")
METHODS = ("mp", "lap", "lap-forward-seq")
BUDGET_LEVELS = (6, 9)  # 1.63% and 0.23% kept
BUDGET_MODES = ("finetune", "rewind-lr", "rewind-weights")
RUN_KEYS = ("retrain", "rewind_step", "schedule", "scope", "bn", "graph")
"""What tells the study's runs apart beyond build_mnist's keys (one row per run)."""


def error(row: Mapping[str, Any]) -> float:
    return 100 * (1 - row["test_acc_retrained"])


def mode_label(mode: str, k: int | None = None) -> str:
    return f"{mode} (k = {k})" if mode == "rewind-weights" and k is not None else mode


def _cell(values: Sequence[float]) -> tuple[str, str, int]:
    mean, std = _stats(values)
    return f"{mean:.2f}", f"{std:.2f}", len(values)


def _md_cell(values: Sequence[float], most: int) -> str:
    mean, std, n = _cell(values)
    text = mean + (f"±{std}" if n > 1 else "")
    return text + (f" (n={n})" if n < most else "")


def _keep_of(rows: Iterable[Mapping[str, Any]]) -> dict[int, float]:
    """% kept per level (the mean over runs: every run of a level keeps the same count)."""
    keeps: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        keeps[r["level"]].append(100 * r["keep"])
    return {level: sum(v) / len(v) for level, v in keeps.items()}


def _by(rows: Iterable[Mapping[str, Any]], *names: str) -> dict[tuple[Any, ...], list[float]]:
    groups: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[n] for n in names)].append(error(r))
    return groups


def _seeds(rows: Iterable[Mapping[str, Any]]) -> str:
    return ",".join(str(s) for s in sorted({r["seed"] for r in rows}))


def grid_rows(oneshot: list[dict[str, Any]], T: int, t: int, k: int) -> list[dict[str, Any]]:
    """The grid: every method at levels 4-10, t = T for fine-tuning and LR rewinding, lottery,
    and weight rewinding to step k."""
    wanted = []
    for r in oneshot:
        if r["method"] not in METHODS or not 4 <= r["level"] <= 10:
            continue
        mode = r["retrain"]
        budget = mode in ("finetune", "rewind-lr") and r["retrain_steps"] == t
        rewound = mode == "lottery" or (mode == "rewind-weights" and r["rewind_step"] == k)
        if budget or rewound:
            wanted.append(r)
    return wanted


def grid_tables(out: Path, rows: list[dict[str, Any]], k: int) -> list[str]:
    """grid.csv and grid.md: error per mode x method x level; the modes present."""
    keeps = _keep_of(rows)
    groups = _by(rows, "retrain", "method", "level")
    modes = [m for m in MODES if any(g[0] == m for g in groups)]
    lines = []
    for mode in modes:
        for method in method_order({g[1] for g in groups if g[0] == mode}):
            for level in sorted({g[2] for g in groups if g[:2] == (mode, method)}):
                mean, std, n = _cell(groups[(mode, method, level)])
                lines.append((mode_label(mode, k), method, level, f"{keeps[level]:.2f}", n,
                               mean, std))  # fmt: skip
    header = ["mode", "method", "level", "keep_percent", "n_seeds", "error_mean", "error_std"]
    _write_csv(out / "grid.csv", header, lines)
    most = max(len(v) for v in groups.values())
    levels = sorted(keeps)
    dense_mean, dense_std = dense_accuracy(rows)
    md = [
        f"One-shot FCN on MNIST, test error (%) after retraining, mean±std over seeds "
        f"{_seeds(rows)} ((n=…): cells with fewer seeds so far); dense models "
        f"{100 - dense_mean:.2f}±{dense_std:.2f}%.",
        "",
    ]
    for mode in modes:
        md += [f"**{mode_label(mode, k)}**", ""]
        md += ["| method | " + " | ".join(f"{keeps[lv]:.2f}%" for lv in levels) + " |",
               "|---" + "|---:" * len(levels) + "|"]  # fmt: skip
        for method in method_order({g[1] for g in groups if g[0] == mode}):
            cells = [
                _md_cell(groups[(mode, method, lv)], most) if (mode, method, lv) in groups else "—"
                for lv in levels
            ]
            md.append(f"| {method_label(method)} | " + " | ".join(cells) + " |")
        md.append("")
    (out / "grid.md").write_text("\n".join(md))
    return modes


def _by_seed(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[Any, ...], float]:
    """Error per (mode, method, level, seed): one run each."""
    return {(r["retrain"], r["method"], r["level"], r["seed"]): error(r) for r in rows}


def _wins(per_seed: Mapping[tuple[Any, ...], float], mode: str, method: str,
          level: int) -> tuple[int, int]:  # fmt: skip
    """Seeds where *method* has fewer errors than MP from the same dense model, and the seeds
    both have: the paired comparison (one dense model per seed serves every method)."""
    seeds = [key[3] for key in per_seed if key[:3] == (mode, "mp", level)]
    both = [s for s in seeds if (mode, method, level, s) in per_seed]
    wins = sum(per_seed[(mode, method, level, s)] < per_seed[(mode, "mp", level, s)] for s in both)
    return wins, len(both)


def gain_tables(out: Path, rows: list[dict[str, Any]], k: int) -> None:
    """gain.csv and gain.md: (MP error - method error) / MP error per mode and level, and in how
    many seeds the method beats MP from the same dense model."""
    keeps = _keep_of(rows)
    groups = _by(rows, "retrain", "method", "level")
    per_seed = _by_seed(rows)
    lines, md_rows = [], []
    for mode in MODES:
        for level in sorted(keeps):
            mp = groups.get((mode, "mp", level))
            if not mp:
                continue
            mp_mean = _stats(mp)[0]
            line: list[Any] = [mode_label(mode, k), level, f"{keeps[level]:.2f}", len(mp),
                               f"{mp_mean:.2f}"]  # fmt: skip
            md_cells = []
            for method in METHODS[1:]:
                values = groups.get((mode, method, level))
                if not values:
                    line += ["", "", "", "", ""]
                    md_cells.append("—")
                    continue
                mean = _stats(values)[0]
                gain = 100 * (mp_mean - mean) / mp_mean if mp_mean else float("nan")
                wins, paired = _wins(per_seed, mode, method, level)
                line += [len(values), f"{mean:.2f}", f"{gain:.1f}", wins, paired]
                md_cells.append(f"{mean:.2f} ({gain:+.1f}%, {wins}/{paired})")
            lines.append(line)
            md_rows.append((mode_label(mode, k), f"{keeps[level]:.2f}", f"{mp_mean:.2f}", md_cells))
    header = ["mode", "level", "keep_percent", "mp_n_seeds", "mp_error_mean"]
    for method in METHODS[1:]:
        name = method.replace("-", "_")
        header += [f"{name}_n_seeds", f"{name}_error_mean", f"{name}_gain_over_mp_percent",
                   f"{name}_seeds_beating_mp", f"{name}_seeds_paired"]  # fmt: skip
    _write_csv(out / "gain.csv", header, lines)
    md = [
        "Relative gain over MP, (MP error - error) / MP error, from mean test errors (%) "
        "after retraining; positive: fewer errors than MP. w/n: in w of the n seeds the "
        "method has fewer errors than MP pruned from the same dense model.",
        "",
        "| mode | % kept | MP | " + " | ".join(method_label(m) for m in METHODS[1:]) + " |",
        "|---|---:|---:" + "|---:" * (len(METHODS) - 1) + "|",
    ]
    md += [f"| {m} | {kp} | {mp} | " + " | ".join(c) + " |" for m, kp, mp, c in md_rows]
    (out / "gain.md").write_text("\n".join(md) + "\n")


def _error_axes(ax: Any, rows: list[dict[str, Any]], groups: Mapping[tuple[Any, ...], list[float]],
                mode: str) -> None:  # fmt: skip
    keeps = _keep_of(rows)
    for method in method_order({g[1] for g in groups if g[0] == mode}):
        levels = sorted(lv for m, me, lv in groups if (m, me) == (mode, method))
        xs = [keeps[lv] for lv in levels]
        means = [_stats(groups[(mode, method, lv)])[0] for lv in levels]
        stds = [_stats(groups[(mode, method, lv)])[1] for lv in levels]
        ax.plot(xs, means, marker="o", ms=3, label=method_label(method))
        lo = [max(m - s, 1e-2) for m, s in zip(means, stds, strict=True)]
        hi = [m + s for m, s in zip(means, stds, strict=True)]
        ax.fill_between(xs, lo, hi, alpha=0.2)
    dense = 100 - dense_accuracy(rows)[0]
    ax.axhline(dense, color="grey", ls="--", lw=1, label=f"dense ({dense:.2f}%)")


def grid_figure(out: Path, rows: list[dict[str, Any]], modes: list[str], k: int) -> None:
    """grid.png: error vs % kept, one panel per mode, one shared error scale."""
    groups = _by(rows, "retrain", "method", "level")
    fig = Figure(figsize=(3.6 * len(modes), 3.6))
    first = None
    for i, mode in enumerate(modes):
        ax = fig.add_subplot(1, len(modes), i + 1, sharey=first)
        first = first or ax
        _error_axes(ax, [r for r in rows if r["retrain"] == mode], groups, mode)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("% weights remaining")
        ax.set_ylabel("test error (%)" if i == 0 else "")
        ax.set_title(mode_label(mode, k), fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "grid.png", dpi=110)


def iterative_tables(out: Path, rows: list[dict[str, Any]]) -> None:
    """iterative.csv and iterative.md: error per mode x method x level of the chain."""
    keeps = _keep_of(rows)
    groups = _by(rows, "retrain", "method", "level")
    lines = []
    for mode, method, level in sorted(groups, key=lambda g: (MODES.index(g[0]), g[1], g[2])):
        mean, std, n = _cell(groups[(mode, method, level)])
        lines.append((mode, method, level, f"{keeps[level]:.2f}", n, mean, std))
    _write_csv(out / "iterative.csv", ["mode", "method", "level", "keep_percent", "n_seeds",
                                       "error_mean", "error_std"], lines)  # fmt: skip
    most = max(len(v) for v in groups.values())
    levels = sorted(keeps)
    chain = max((r["path"] for r in rows), key=len)
    md = [
        f"Iterative pruning (levels {','.join(map(str, chain))}, one "
        f"retraining per level), test error (%) after each level's retraining, seeds "
        f"{_seeds(rows)}.",
        "",
        "| mode | method | " + " | ".join(f"{keeps[lv]:.2f}%" for lv in levels) + " |",
        "|---|---" + "|---:" * len(levels) + "|",
    ]
    for mode in (m for m in MODES if any(g[0] == m for g in groups)):
        for method in method_order({g[1] for g in groups if g[0] == mode}):
            cells = [
                _md_cell(groups[(mode, method, lv)], most) if (mode, method, lv) in groups else "—"
                for lv in levels
            ]
            md.append(f"| {mode} | {method_label(method)} | " + " | ".join(cells) + " |")
    (out / "iterative.md").write_text("\n".join(md) + "\n")


def budgets(T: int) -> tuple[int, ...]:
    """The budgets of run_rewinding.sh: 5%, 20%, 50% and 100% of T (2.5k ... 50k of 50k)."""
    return (T // 20, T // 5, T // 2, T)


def budget_rows(oneshot: list[dict[str, Any]], T: int) -> list[dict[str, Any]]:
    """MP and LAP at the budget levels; each row gains ``budget``: t, or T - k when rewinding
    (so the grid's weight rewinding to 5% of T, t = 95% of T, is not a budget point).

    Only the seeds the budget sweep ran (those with a point t < T) count: fine-tuning and LR
    rewinding at t = T are the grid's runs, and a grid seed without the shorter budgets would
    bend the curve."""
    wanted = []
    for r in oneshot:
        if r["level"] in BUDGET_LEVELS and r["method"] in ("mp", "lap"):
            t = None
            if r["retrain"] in ("finetune", "rewind-lr"):
                t = r["retrain_steps"]
            elif r["retrain"] == "rewind-weights":
                t = T - r["rewind_step"]
            if t in budgets(T):
                wanted.append(r | {"budget": t})
    seeds = {r["seed"] for r in wanted if r["budget"] < T}
    return [r for r in wanted if r["seed"] in seeds]


def _steps(t: int) -> str:
    return f"{t / 1000:g}k" if t >= 1000 else str(t)


def budget_files(out: Path, rows: list[dict[str, Any]]) -> None:
    """budget.csv and budget.png: error against the retraining budget t, per level."""
    keeps = _keep_of(rows)
    groups = _by(rows, "level", "method", "retrain", "budget")
    lines = []
    order = sorted(groups, key=lambda g: (g[0], METHODS.index(g[1]), MODES.index(g[2]), g[3]))
    for level, method, mode, t in order:
        mean, std, n = _cell(groups[(level, method, mode, t)])
        lines.append((level, f"{keeps[level]:.2f}", method, mode, t, n, mean, std))
    _write_csv(out / "budget.csv", ["level", "keep_percent", "method", "mode", "retrain_steps",
                                    "n_seeds", "error_mean", "error_std"], lines)  # fmt: skip
    levels = sorted({g[0] for g in groups})
    fig = Figure(figsize=(4.2 * len(levels), 3.6))
    colours = {"finetune": "C0", "rewind-lr": "C1", "rewind-weights": "C2"}
    for i, level in enumerate(levels):
        ax = fig.add_subplot(1, len(levels), i + 1)
        for method, style in (("mp", ("--", "s")), ("lap", ("-", "o"))):
            for mode in BUDGET_MODES:
                ts = sorted(g[3] for g in groups if g[:3] == (level, method, mode))
                if not ts:
                    continue
                means = [_stats(groups[(level, method, mode, t)])[0] for t in ts]
                label = f"{method_label(method)}, {mode}" + (
                    " (k = T - t)" * (mode == BUDGET_MODES[2])
                )
                ax.plot(ts, means, ls=style[0], marker=style[1], ms=3, color=colours[mode],
                        label=label)  # fmt: skip
        ax.set_xscale("log")
        ticks = sorted({g[3] for g in groups})
        ax.set_xticks(ticks, [_steps(t) for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_yscale("log")  # 1.8% and 90% errors share a panel: linear hides the low ones
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 20, not 2x10^1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.set_xlabel("retraining steps t")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"{keeps[level]:.2f}% kept (level {level})", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "budget.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", nargs="?", default=str(HERE / "mnist-rewinding.sqlite"))
    parser.add_argument("--out", default=str(HERE / "mnist-rewinding"), help="output folder")
    args = parser.parse_args()
    with RunStore(args.db, read_only=True) as store:
        every = newest(store.runs(model="fcn", dataset="mnist"), extra=RUN_KEYS)
    if not every:
        raise SystemExit(f"{args.db} holds no FCN runs on MNIST; run results/run_rewinding.sh")
    T = max(r["train_steps"] for r in every)
    every = [r for r in every if r["train_steps"] == T and r["schedule"] == "step"]
    k = T // 20
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    oneshot = [r for r in every if r["mode"] == "oneshot"]
    grid = grid_rows(oneshot, T, T, k)
    if grid:
        modes = grid_tables(out, grid, k)
        gain_tables(out, grid, k)
        grid_figure(out, grid, modes, k)
    else:
        print("no grid runs yet: grid and gain files skipped")
    iterative = [r for r in every if r["mode"] == "iterative"]
    if iterative:
        iterative_tables(out, iterative)
    else:
        print("no iterative runs yet: iterative files skipped")
    budget = budget_rows(oneshot, T)
    if budget:
        budget_files(out, budget)
    else:
        print("no budget runs yet: budget files skipped")
    (out / "protocol.txt").write_text(protocol_note(every))
    print(f"wrote {out}: {len(every)} runs, seeds {_seeds(every)}")


if __name__ == "__main__":
    main()
