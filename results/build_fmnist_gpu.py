"""Build the GPU sweep's tables (issue 24) from its database, the paper's tables beside them.

    python results/build_fmnist_gpu.py [results/fmnist-gpu.sqlite] [--out results]

Per model found (Conv-6, VGG-11, ResNet-18) it writes under ``results/<db name>-<model>/``
what ``build_fmnist.py`` writes for the CPU runs (``table.md``/``table.csv``: error after
retraining with the relative change vs MP; ``before_retrain.md``; ``accuracy.png``;
``protocol.txt``), using its code, plus ``versus_paper.md``: per method and level, our
test error before and after retraining and our relative gain over MP, beside the paper's
error and gain (Table 2 for Conv-6, 3 for VGG-11, 6 for ResNet-18, CIFAR-10, 5 seeds), and
one line per level saying whether the method beat MP here and there. The paper's column
headers are its % of weights kept at the same level (CIFAR's 32x32x3 inputs); Fashion-MNIST's
1x28x28 inputs shrink the first Linear layer, so our keep fractions differ a little.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from build_fmnist import (
    HERE,
    PAPER_TABLE,
    _error,
    _plain,
    _variant,
    dense_note,
    model_tables,
    newest,
    settings_note,
)
from build_mnist import protocol_note

from lookahead_prune.report import method_label
from lookahead_prune.store import RunStore

PAPER: dict[str, dict[str, Any]] = {  # CIFAR-10 error (%) after retraining, mean over 5 seeds
    "conv6": {
        "dense": 11.97,
        "levels": list(range(12, 19)),
        "keeps": ["10.62", "8.86", "7.39", "6.18", "5.17", "4.32", "3.62"],
        "mp": [11.86, 12.20, 13.30, 15.81, 20.19, 24.43, 28.60],
        "lap": [11.76, 12.16, 13.05, 14.39, 17.10, 21.24, 24.52],
        "lap-forward": [11.82, 12.35, 13.09, 14.42, 17.05, 20.28, 22.80],
        "lap-backward": [11.82, 12.29, 12.93, 14.55, 17.00, 20.00, 23.37],
        "lap-forward-seq": [12.01, 12.47, 13.19, 14.12, 16.73, 19.63, 22.44],
        "lap-backward-seq": [11.81, 12.35, 13.25, 14.17, 16.99, 19.94, 23.15],
        "rp": [26.85, 29.72, 32.98, 35.92, 39.13, 41.20, 43.60],
        "lfp": [11.81, 12.18, 13.27, 15.04, 18.50, 22.86, 26.65],
        "lbp": [12.08, 12.34, 13.26, 14.93, 18.11, 22.57, 26.34],
    },
    "vgg11": {
        "dense": 11.51,
        "levels": list(range(11, 26, 2)),
        "keeps": ["16.74", "12.10", "8.74", "6.32", "4.56", "3.30", "2.38", "1.72"],
        "mp": [11.41, 12.38, 13.54, 16.08, 19.76, 28.12, 45.38, 55.97],
        "lap": [11.19, 11.79, 12.95, 13.95, 15.59, 20.96, 22.00, 28.96],
        "lap-forward": [11.47, 12.33, 13.15, 13.96, 15.42, 18.22, 21.74, 25.85],
    },
    "resnet18": {
        "dense": 8.68,
        "levels": list(range(14, 36, 3)),
        "keeps": ["10.30", "6.33", "3.89", "2.40", "1.48", "0.92", "0.57", "0.36"],
        "mp": [8.18, 8.74, 9.82, 11.28, 14.31, 18.56, 22.93, 26.77],
        "lap": [8.09, 8.97, 9.74, 11.35, 13.73, 16.29, 20.22, 22.45],
        "lap-forward": [8.19, 9.17, 10.32, 12.38, 15.31, 18.56, 21.09, 23.89],
    },
}
"""The paper's Tables 2, 3 and 6 (means; the stds are in docs and the paper)."""


def _mean(runs: list[dict[str, Any]], metric: str) -> float:
    return statistics.fmean(_error(r, metric) for r in runs)


def versus_paper(model: str, rows: list[dict[str, Any]]) -> str:
    """Ours (before -> after retraining, gain vs MP) beside the paper's (after, gain vs MP)."""
    paper = PAPER[model]
    cells: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["method"], r["level"])].append(r)
    levels = [lv for lv in paper["levels"] if any(lv == c[1] for c in cells)]
    levels += sorted({lv for _, lv in cells} - set(levels))
    methods = [m for m in paper if m in {c[0] for c in cells}]
    methods += sorted({m for m, _ in cells} - set(methods))
    dense = statistics.fmean(_error(r, "dense_test_acc") for r in rows)
    seeds = sorted({r["seed"] for r in rows})
    header = []
    for lv in levels:
        ours = cells.get(("mp", lv)) or next(c for (m, v), c in cells.items() if v == lv)
        theirs = paper["keeps"][paper["levels"].index(lv)] if lv in paper["levels"] else "—"
        header.append(f"level {lv}: {100 * ours[0]['keep']:.2f}% here, {theirs}% paper")
    lines = [
        f"**{model} on Fashion-MNIST (the GPU sweep) beside Table {PAPER_TABLE[model]} "
        f"(CIFAR-10): test error (%)**",
        "",
        f"Here: dense {dense:.2f}%, seeds {seeds}; each cell: error before → after retraining "
        "(relative change of the after-retraining error vs MP). Paper: dense "
        f"{paper['dense']:.2f}%, 5 seeds; error after retraining (relative change vs MP).",
        "",
        "| Method | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(levels),
    ]
    wins: dict[str, list[str]] = {}
    for method in methods:
        row = [method_label(method)]
        for lv in levels:
            runs = cells.get((method, lv))
            mp = cells.get(("mp", lv))
            if not runs:
                row.append("—")
                continue
            before, after = _mean(runs, "test_acc_pruned"), _mean(runs, "test_acc_retrained")
            text = f"{before:.2f} → {after:.2f}"
            gain = None
            if mp and method != "mp":
                ref = _mean(mp, "test_acc_retrained")
                gain = (after - ref) / ref * 100
                text += f" ({gain:+.1f}%)"
            paper_text = "—"
            if lv in paper["levels"] and method in paper:
                i = paper["levels"].index(lv)
                value, ref = paper[method][i], paper["mp"][i]
                paper_text = f"{value:.2f}"
                if method != "mp":
                    paper_gain = (value - ref) / ref * 100
                    paper_text += f" ({paper_gain:+.1f}%)"
                    if gain is not None:
                        same = (gain < 0) == (paper_gain < 0)
                        mark = "·" if gain == 0 else "=" if same else "≠"
                        wins.setdefault(method, []).append(mark)
            row.append(f"{text}<br>paper {paper_text}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Does the method's sign vs MP (better or worse after retraining) agree with the "
              "paper's, level by level (= agrees, ≠ differs, · a tie here)?", ""]  # fmt: skip
    for method, marks in wins.items():
        agree = marks.count("=")
        lines.append(f"- {method_label(method)}: {' '.join(marks)} ({agree}/{len(marks)})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", nargs="?", default=str(HERE / "fmnist-gpu.sqlite"))
    parser.add_argument("--out", default=str(HERE), help="folder for the <db name>-<model> folders")
    args = parser.parse_args()
    with RunStore(args.db, read_only=True) as store:
        every = newest(store.runs(dataset="fashion-mnist"))
    if not every:
        raise SystemExit(f"{args.db} holds no Fashion-MNIST runs; run results/run_fmnist_gpu.sh")
    for model in PAPER:
        rows = _variant(_plain([r for r in every if r["model"] == model]), "fx", False)
        if not rows:
            continue
        out = Path(args.out) / f"{Path(args.db).stem}-{model}"
        out.mkdir(parents=True, exist_ok=True)
        model_tables(out, model, rows, [])
        (out / "versus_paper.md").write_text(versus_paper(model, rows))
        note = protocol_note(rows) + settings_note(rows) + dense_note(Path(args.db), rows)
        (out / "protocol.txt").write_text(note)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
