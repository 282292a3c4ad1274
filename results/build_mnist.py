"""Build the MNIST result files (Fig. 2, Fig. 3, Table 1, Appendix B) from a results database.

    python results/build_mnist.py                       # full protocol: results/mnist-full.sqlite
    python results/build_mnist.py results/mnist-reduced.sqlite --out mnist-reduced

Reads the runs that ``results/run_mnist.sh`` stored and writes CSV, Markdown and PNG files under
``results/<out>-linear/`` and ``results/<out>-fcn/`` (``<out>`` is ``mnist`` by default, the
paper's full protocol; the reduced protocol's files go to ``mnist-reduced-*``). A part
whose runs are not (yet) in the database is skipped with a note, so a sweep still in progress
can be tabulated seed by seed. Nothing here trains or prunes: every number comes from the
database.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lookahead_prune.report import method_label, method_order, summarize, to_markdown
from lookahead_prune.store import RunStore

HERE = Path(__file__).resolve().parent
TABLE1_METHODS = [
    "mp", "rp", "lfp", "lbp", "lap", "lap-forward", "lap-backward", "lap-forward-seq",
    "lap-backward-seq",
]  # fmt: skip


def newest(rows: Iterable[Mapping[str, Any]], extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per run: configurations written by older code hash differently, so a rerun with
    newer code can store a run twice; keep the latest. ``extra``: more fields that tell runs
    apart (another study's, such as the retraining mode)."""
    keys = ("model", "activation", "method", "level", "seed", "mode", "train_steps",
            "retrain_steps")  # fmt: skip
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["created_at"]):
        latest[(*(r.get(k) for k in keys), r.get("scope", "layer"), *map(r.get, extra))] = dict(r)
    return list(latest.values())


def _select(rows: Iterable[Mapping[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [dict(r) for r in rows if all(r.get(k) == v for k, v in match.items())]


def _stats(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _write_csv(path: Path, header: Sequence[str], lines: Iterable[Sequence[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(lines)
    path.write_text(buf.getvalue())


def dense_accuracy(rows: Iterable[Mapping[str, Any]]) -> tuple[float, float]:
    """Test accuracy (%) of the dense models the rows were pruned from: mean, std over seeds."""
    per_seed = {r["seed"]: 100 * r["dense_test_acc"] for r in rows}
    return _stats(list(per_seed.values()))


def dense_line(ax: Any, rows: Iterable[Mapping[str, Any]]) -> None:
    """The dense models' mean test accuracy as a dashed line: where every curve starts."""
    mean = dense_accuracy(rows)[0]
    ax.axhline(mean, color="grey", ls="--", lw=1, label=f"dense ({mean:.2f}%)")


def accuracy_csv(path: Path, rows: list[dict[str, Any]], metric: str) -> None:
    """``method,keep_percent,acc_mean,acc_std`` (accuracy in %) over seeds; the first line is
    the dense models (``dense,100.00``), the point every curve starts from."""
    groups: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], round(100 * r["keep"], 2))].append(100 * r[metric])
    mean, std = dense_accuracy(rows)
    lines = [("dense", "100.00", f"{mean:.2f}", f"{std:.2f}")]
    for method in method_order({m for m, _ in groups}):
        for keep in sorted({k for m, k in groups if m == method}, reverse=True):
            mean, std = _stats(groups[(method, keep)])
            lines.append((method, f"{keep:.2f}", f"{mean:.2f}", f"{std:.2f}"))
    _write_csv(path, ["method", "keep_percent", "acc_mean", "acc_std"], lines)


def plot_panels(path: Path, panels: Sequence[tuple[str, list[dict[str, Any]], str]]) -> None:
    """One accuracy-vs-% remaining panel per (title, rows, metric), mean ± std over seeds."""
    fig = Figure(figsize=(4.2 * len(panels), 3.6))
    for i, (title, rows, metric) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for method in method_order({r["method"] for r in rows}):
            groups: dict[float, list[float]] = defaultdict(list)
            for r in rows:
                if r["method"] == method:
                    groups[100 * r["keep"]].append(100 * r[metric])
            keeps = sorted(groups, reverse=True)
            means = [_stats(groups[k])[0] for k in keeps]
            stds = [_stats(groups[k])[1] for k in keeps]
            ax.plot(keeps, means, marker="o", ms=3, label=method_label(method))
            lo = [m - s for m, s in zip(means, stds, strict=True)]
            hi = [m + s for m, s in zip(means, stds, strict=True)]
            ax.fill_between(keeps, lo, hi, alpha=0.2)
        dense_line(ax, rows)
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("% weights remaining")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


KEEPS = ("6.36", "3.21", "1.63", "0.84", "0.43", "0.23", "0.12")
PAPER_TABLE1 = {  # Table 1 of the paper (5 seeds, 50k + 50k): error mean, std per keep
    "mp": "1.75 .11 2.11 .14 2.53 .09 3.32 .27 4.77 .22 19.85 8.67 67.62 9.91",
    "rp": "2.36 .13 2.72 .16 3.64 .17 17.54 7.07 82.48 4.03 88.65 0 88.65 0",
    "lfp": "1.63 .08 1.89 .11 2.43 .10 3.32 .13 4.23 .38 9.59 1.70 50.11 12.99",
    "lbp": "1.75 .17 2.04 .12 2.61 .15 3.62 .17 4.19 .31 9.09 1.41 28.51 14.85",
    "lap": "1.67 .11 1.89 .12 2.48 .13 3.29 .06 3.93 .26 6.72 .44 16.45 5.61",
    "lap-forward": "1.60 .08 1.93 .15 2.51 .11 3.56 .19 4.47 .20 6.58 .33 12.00 .73",
    "lap-backward": "1.63 .11 1.88 .07 2.35 .02 3.12 .08 3.87 .18 5.62 .17 13.00 3.30",
    "lap-forward-seq": "1.68 .11 1.92 .10 2.49 .14 3.39 .24 4.21 .06 6.20 .32 10.98 1.03",
    "lap-backward-seq": "1.57 .08 1.84 .10 2.20 .10 3.13 .16 3.62 .14 5.42 .27 11.92 4.61",
}


def paper_cell(method: str, keep: str) -> tuple[float, float]:
    """The paper's (mean, std) of Table 1's cell."""
    numbers = [float(v) for v in PAPER_TABLE1[method].split()]
    i = KEEPS.index(keep)
    return numbers[2 * i], numbers[2 * i + 1]


def versus_paper(out: Path, lines: list[tuple[Any, ...]]) -> str:
    """Each cell beside the paper's; a cell agrees when the two mean±std intervals overlap.

    Writes ``table1_vs_paper.csv`` and returns a one-line count for the README.
    """
    rows, overlap, one_std = [], 0, 0
    for method, keep, n, _, _, mean, std in lines:
        if keep not in KEEPS:
            continue
        p_mean, p_std = paper_cell(method, keep)
        diff = float(mean) - p_mean
        agrees = abs(diff) <= p_std + float(std)
        overlap += agrees
        one_std += abs(diff) <= p_std
        rows.append((method, keep, n, mean, std, p_mean, p_std, f"{diff:+.2f}", int(agrees)))
    header = ["method", "keep_percent", "n_seeds", "error_mean", "error_std", "paper_mean",
              "paper_std", "difference", "intervals_overlap"]  # fmt: skip
    _write_csv(out / "table1_vs_paper.csv", header, rows)
    cells = {(r[0], r[1]): r for r in rows}
    md = ["| method | " + " | ".join(f"{k}%" for k in KEEPS) + " |", "|---" * 8 + "|"]
    for method in TABLE1_METHODS:
        line = [method_label(method)]
        for keep in KEEPS:
            r = cells.get((method, keep))
            if r is None:
                line.append("—")
                continue
            ours = r[3] + (f"±{r[4]}" if int(r[2]) > 1 else "")
            mark = "" if r[8] else " ✗"
            line.append(f"{r[5]:.2f}±{r[6]:.2f} / **{ours}**{mark}")
        md.append("| " + " | ".join(line) + " |")
    (out / "table1_vs_paper.md").write_text(
        "Paper (5 seeds) / **ours**, test error (%); ✗: the mean±std intervals do not "
        "overlap.\n\n" + "\n".join(md) + "\n"
    )
    return (
        f"{overlap} of {len(rows)} cells have mean±std intervals that overlap the paper's; "
        f"{one_std} lie within one of the paper's standard deviations of its mean"
    )


def table1(out: Path, rows: list[dict[str, Any]]) -> None:
    """Table 1: test error after retraining, CSV in the issue's columns plus the paper's layout."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], round(100 * r["keep"], 2))].append(r)
    lines = []
    for method in TABLE1_METHODS:
        for keep in sorted({k for m, k in groups if m == method}, reverse=True):
            runs = groups[(method, keep)]
            mean, std = _stats([100 * (1 - r["test_acc_retrained"]) for r in runs])
            lines.append((method, f"{keep:.2f}", len(runs), runs[0]["train_steps"],
                          runs[0]["retrain_steps"], f"{mean:.2f}", f"{std:.2f}"))  # fmt: skip
    header = ["method", "keep_percent", "n_seeds", "train_steps", "retrain_steps", "error_mean",
              "error_std"]  # fmt: skip
    _write_csv(out / "table1.csv", header, lines)
    summary = summarize(rows, metric="test_acc_retrained", model="fcn", dataset="mnist")
    dense = statistics.fmean(100 * (1 - r["dense_test_acc"]) for r in rows)
    steps = sorted({(r["train_steps"], r["retrain_steps"]) for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    full = steps == [(50_000, 50_000)]
    protocol = "the paper's protocol" if full else "reduced protocol"
    title = (
        f"Table 1 ({protocol}: {'+'.join(map(str, steps[0]))} steps, seeds {seeds}): FCN on "
        f"MNIST, test error (%); dense model {dense:.2f}%"
    )
    agreement = versus_paper(out, lines)
    text = to_markdown(summary, title=title, methods=TABLE1_METHODS)
    note = f"\nAgainst the paper (table1_vs_paper.csv): {agreement}.\n"
    (out / "table1.md").write_text(text + note)
    print(agreement)


def appendix_b(out: Path, rows: list[dict[str, Any]]) -> None:
    """Appendix B: train accuracy and generalisation gap (train - test) after retraining."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["method"] in ("mp", "lap"):
            groups[(r["method"], round(100 * r["keep"], 2))].append(r)
    lines = []
    for (method, keep), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        train_m, _ = _stats([100 * r["train_acc_retrained"] for r in runs])
        test_m, _ = _stats([100 * r["test_acc_retrained"] for r in runs])
        gap_m, gap_s = _stats(
            [100 * (r["train_acc_retrained"] - r["test_acc_retrained"]) for r in runs]
        )
        lines.append((method, f"{keep:.2f}", len(runs), f"{train_m:.2f}", f"{test_m:.2f}",
                      f"{gap_m:.2f}", f"{gap_s:.2f}"))  # fmt: skip
    header = ["method", "keep_percent", "n_seeds", "train_acc_mean", "test_acc_mean", "gap_mean",
              "gap_std"]  # fmt: skip
    _write_csv(out / "appendix_b.csv", header, lines)
    sub = [r for r in rows if r["method"] in ("mp", "lap")]
    for r in sub:
        r["gap"] = r["train_acc_retrained"] - r["test_acc_retrained"] + 0.0
    fig = Figure(figsize=(8.4, 3.6))
    for i, (metric, label) in enumerate(
        [("test_acc_retrained", "test accuracy (%)"), ("gap", "train - test accuracy (%)")]
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        for method in ("mp", "lap"):
            pts: dict[float, list[float]] = defaultdict(list)
            for r in sub:
                if r["method"] == method:
                    pts[100 * r["keep"]].append(100 * r[metric])
            keeps = sorted(pts, reverse=True)
            ax.plot(keeps, [_stats(pts[k])[0] for k in keeps], marker="o", ms=3,
                    label=method_label(method))  # fmt: skip
        if metric == "test_acc_retrained":
            dense_line(ax, rows)
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("% weights remaining")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "appendix_b.png", dpi=110)


def beyond(out: Path, rows: list[dict[str, Any]]) -> None:
    """Recipes at the sparsest level (level 10): one-shot rows of Table 1, global budgets and
    iterative pruning, as test error after the last retraining."""
    recipes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["level"] != 10:
            continue
        scope = r.get("scope", "layer")
        if r["mode"] == "iterative":
            name = f"iterative {r['method']} (levels 2,4,6,8,10; 5 retrainings)"
        elif scope == "global":
            name = f"global {r['method']}" + (
                " (normalised scores)" if r["method"] != "lamp" else ""
            )
        elif r["method"] in ("mp", "lap", "lap-forward-seq", "lap-backward-seq"):
            name = f"one-shot {r['method']} (Table 1 row)"
        else:
            continue
        recipes[name].append(r)
    lines = []
    for name, runs in sorted(recipes.items(), key=lambda kv: _stats(
            [100 * (1 - r["test_acc_retrained"]) for r in kv[1]])[0]):  # fmt: skip
        mean, std = _stats([100 * (1 - r["test_acc_retrained"]) for r in runs])
        keep = statistics.fmean(100 * r["keep"] for r in runs)
        lines.append((name, f"{keep:.3f}", len(runs), f"{mean:.2f}", f"{std:.2f}"))
    _write_csv(out / "beyond.csv", ["recipe", "keep_percent", "n_seeds", "error_mean",
                                    "error_std"], lines)  # fmt: skip
    md = ["| recipe | % kept | seeds | test error (%) |", "|---|---:|---:|---:|"]
    md += [f"| {n} | {k} | {c} | {m}±{sd} |" for n, k, c, m, sd in lines]
    (out / "beyond.md").write_text("\n".join(md) + "\n")


def protocol_note(rows: list[dict[str, Any]]) -> str:
    """Seeds, steps, code versions and run time of a set of rows, for the README beside them."""
    seeds = sorted({r["seed"] for r in rows})
    versions = sorted({r["code_version"] for r in rows})
    steps = sorted({(r["train_steps"], r["retrain_steps"]) for r in rows})
    wall = sum(r["wall_time"] for r in rows)
    engines = sorted({r.get("engine") or "sequential" for r in rows})
    return (
        f"- runs: {len(rows)}; seeds: {seeds}; (train, retrain) steps: {steps}; "
        f"Adam, lr {rows[0]['lr']}, batch {rows[0]['batch_size']}\n"
        f"- code version(s): {', '.join(versions)}\n"
        f"- time in prune+retrain+evaluate, summed over runs: {wall / 60:.1f} min "
        f"(dense training not included; a grouped run counts its share of the group); "
        f"device: {rows[0]['device']}; retraining engine(s): {', '.join(engines)}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", nargs="?", default=str(HERE / "mnist-full.sqlite"))
    parser.add_argument("--out", default="mnist", help="folder prefix under results/")
    parser.add_argument(
        "--extra", action="append", default=None,
        help="database of runs that only Appendix B and the beyond rows read (default: "
        "mnist-full-extra.sqlite beside the full protocol's, where it exists)",
    )  # fmt: skip
    args = parser.parse_args()
    with RunStore(args.db) as store:
        every = newest(store.runs(dataset="mnist", retrain="finetune"))
    extra_dbs = args.extra
    if extra_dbs is None:
        default = HERE / "mnist-full-extra.sqlite"
        extra_dbs = [str(default)] if args.db == str(HERE / "mnist-full.sqlite") else []
        extra_dbs = [d for d in extra_dbs if Path(d).exists()]
    extra: list[dict[str, Any]] = []
    for db in extra_dbs:  # Appendix B's retrained levels 1-3 and the iterative rows (issue 19)
        with RunStore(db) as store:
            extra += newest(store.runs(dataset="mnist", retrain="finetune"))
    oneshot = [r for r in every if r["mode"] == "oneshot" and r.get("scope", "layer") == "layer"]
    rows = [r for r in oneshot if r["retrain_steps"] > 0]
    # runs with --retrain-steps 0 measure only the accuracy right after pruning (Fig. 3d)
    pruned_only = [r for r in oneshot if r["retrain_steps"] == 0]

    linear = _select(rows, model="linear")
    fcn = _select(rows, model="fcn")
    if not linear and not fcn:
        raise SystemExit(f"{args.db} holds no linear or FCN runs; run results/run_mnist.sh")
    if linear:
        out = HERE / f"{args.out}-linear"
        out.mkdir(exist_ok=True)
        accuracy_csv(out / "before_retrain.csv", linear, "test_acc_pruned")
        accuracy_csv(out / "after_retrain.csv", linear, "test_acc_retrained")
        panels = [
            ("(a) before retraining", linear, "test_acc_pruned"),
            ("(b) after retraining", linear, "test_acc_retrained"),
        ]
        plot_panels(out / "fig2.png", panels)
        (out / "protocol.txt").write_text(protocol_note(linear))
        print(f"wrote {out}")
    else:
        print("no linear-network runs yet: Fig. 2 skipped")
    if fcn:
        fcn_files(HERE / f"{args.out}-fcn", fcn, every, _select(pruned_only, model="fcn"), extra)
    else:
        print("no FCN runs yet: Fig. 3, Table 1 and Appendix B skipped")


def fcn_files(
    out: Path, fcn: list[dict[str, Any]], every: list[dict[str, Any]],
    pruned_only: list[dict[str, Any]], extra: list[dict[str, Any]] | None = None,
) -> None:  # fmt: skip
    """Fig. 3, Table 1, Appendix B and the beyond-the-paper rows, from whatever FCN runs exist.

    ``pruned_only`` (runs without retraining) add levels to Fig. 3d, before retraining only.
    ``extra`` (another database's runs) feed only Appendix B and the beyond rows, so that the
    Table 1 and Fig. 3 files depend on the main database alone.
    """
    out.mkdir(exist_ok=True)
    relu = _select(fcn, activation="relu")
    panels = []
    for act, tag in (("sigmoid", "a"), ("tanh", "b"), ("relu", "c")):
        sub = [r for r in _select(fcn, activation=act) if r["method"] in ("mp", "lap")]
        if sub:
            accuracy_csv(out / f"fig3_{act}_after_retrain.csv", sub, "test_acc_retrained")
            panels.append((f"({tag}) {act}, after retraining", sub, "test_acc_retrained"))
    before = {  # one row per pruning: a retrained run and a prune-only one agree before retraining
        (r["method"], r["level"], r["seed"]): r
        for r in [*_select(pruned_only, activation="relu"), *relu]
    }
    relu_mp_lap = [r for r in before.values() if r["method"] in ("mp", "lap")]
    if relu_mp_lap:
        accuracy_csv(out / "before_retrain.csv", relu_mp_lap, "test_acc_pruned")
        panels.append(("(d) relu, before retraining", relu_mp_lap, "test_acc_pruned"))
    if panels:
        plot_panels(out / "fig3.png", panels)
    table_rows = [r for r in relu if 4 <= r["level"] <= 10 and r["method"] in TABLE1_METHODS]
    if table_rows:
        table1(out, table_rows)
    extra_fcn = [r for r in extra or [] if r["model"] == "fcn" and r["activation"] == "relu"]
    extra_oneshot = [
        r for r in extra_fcn
        if r["mode"] == "oneshot" and r.get("scope", "layer") == "layer" and r["retrain_steps"] > 0
    ]  # fmt: skip
    if relu:
        appendix_b(out, relu + extra_oneshot)
    (out / "protocol.txt").write_text(protocol_note(fcn + pruned_only))
    if extra_fcn:
        (out / "protocol_extra.txt").write_text(
            "Runs of the second database (Appendix B's levels 1-3, the iterative rows):\n"
            + protocol_note(extra_fcn)
        )
    beyond_rows = [
        r for r in every + extra_fcn
        if r["model"] == "fcn" and r["activation"] == "relu" and r["retrain_steps"] > 0
    ]  # fmt: skip
    if any(r["mode"] == "iterative" or r.get("scope") == "global" for r in beyond_rows):
        beyond(out, beyond_rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
