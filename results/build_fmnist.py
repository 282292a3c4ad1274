"""Build the Fashion-MNIST result files (Tables 2-6 and the residual study) from a database.

    python results/build_fmnist.py [results/fmnist.sqlite]

Reads the runs that ``results/run_fmnist.sh`` stored and writes, per model, under
``results/<db name>-<model>/`` (``fmnist-vgg16/``; ``fmnist-full-vgg16/`` from the full run):
``table.md`` and ``table.csv`` (test error after retraining, the paper's layout: mean±std and
relative change vs MP), ``before_retrain.md`` (error right after pruning; for the batch-norm
nets also with the statistics re-estimated, from the ``BN_RECAL`` runs of run_fmnist.sh),
``accuracy.png`` (against % of weights remaining) and ``protocol.txt``. For ResNet-18 it also writes
``residual.md``/``residual.csv``: module-order vs graph-aware LAP vs MP (docs/residual-lap.md).
Nothing here trains or prunes: every number comes from the database.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from dataclasses import fields
from pathlib import Path
from typing import Any

from build_mnist import _stats, _write_csv, plot_panels, protocol_note

from lookahead_prune.checkpoint import load_checkpoint
from lookahead_prune.pipeline import Protocol
from lookahead_prune.report import method_label, summarize, to_markdown
from lookahead_prune.store import RunStore, config_hash

HERE = Path(__file__).resolve().parent
TABLE_METHODS = {
    "conv6": ["mp", "rp", "lfp", "lbp", "lap", "lap-forward", "lap-backward", "lap-forward-seq",
              "lap-backward-seq"],
    "vgg11": ["mp", "lap", "lap-forward"],
    "vgg16": ["mp", "lap", "lap-forward"],
    "vgg19": ["mp", "lap", "lap-forward"],
    "resnet18": ["mp", "lap", "lap-forward"],
}  # fmt: skip
PAPER_TABLE = {"conv6": 2, "vgg11": 3, "vgg16": 4, "vgg19": 5, "resnet18": 6}
RESIDUAL_VARIANTS = [
    # (label, method, graph, shortcuts excluded)
    ("MP, shortcuts pruned", "mp", "fx", False),
    ("(b) LAP, traced graph, shortcuts pruned", "lap", "fx", False),
    ("LAP-forward, traced graph, shortcuts pruned", "lap-forward", "fx", False),
    ("MP, shortcuts dense", "mp", "fx", True),
    ("(a) LAP, module order, shortcuts dense (official code)", "lap", "sequential", True),
    ("LAP, traced graph, shortcuts dense", "lap", "fx", True),
]


def newest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run (the latest, should a configuration have been stored twice)."""
    latest: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["created_at"]):
        latest[r["key"]] = r
    return list(latest.values())


def _variant(rows: list[dict[str, Any]], graph: str, excluded: bool) -> list[dict[str, Any]]:
    return [r for r in rows if r["graph"] == graph and bool(r.get("exclude")) == excluded]


def _error(r: dict[str, Any], metric: str = "test_acc_retrained") -> float:
    return 100 * (1 - r[metric])


def _recalibrated(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs that re-estimated batch-norm statistics after pruning (``--bn-recalibrate``)."""
    return [r for r in rows if r.get("bn_recalibrate")]


def _plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get("bn_recalibrate")]


def recalibrated_table(model: str, rows: list[dict[str, Any]], methods: list[str]) -> str:
    """Error before retraining of the same pruned models without -> with the batch-norm
    statistics re-estimated (mean over seeds), one row per method, one column per keep."""
    batches = ", ".join(str(n) for n in sorted({r["bn_recalibrate"] for r in rows}))
    cells: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["method"], round(100 * r["keep"], 2))].append(r)
    keeps = sorted({k for _, k in cells}, reverse=True)
    lines = [
        f"**{model} on Fashion-MNIST: test error (%) before retraining, without → with the "
        f"batch-norm statistics re-estimated on {batches} training batches of "
        f"{rows[0]['batch_size']}**",
        "",
        "| Method | " + " | ".join(f"{k:.2f}%" for k in keeps) + " |",
        "|---|" + "---:|" * len(keeps),
    ]
    for method in [m for m in methods if any(m == c for c, _ in cells)]:
        row = [method_label(method)]
        for keep in keeps:
            runs = cells.get((method, keep))
            if not runs:
                row.append("—")
                continue
            before = _stats([_error(r, "test_acc_pruned") for r in runs])[0]
            after = _stats([_error(r, "test_acc_recalibrated") for r in runs])[0]
            row.append(f"{before:.2f} → {after:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    seeds = sorted({r["seed"] for r in rows})
    lines += [
        "",
        f"Same pruned models on both sides of the arrow; seeds {seeds} (mean). Recalibration "
        "changes only the running statistics of the batch norms (`lap sweep --retrain-steps 0 "
        "--bn-recalibrate N`; library: `lookahead_prune.recalibrate_batchnorm`).",
    ]
    return "\n".join(lines) + "\n"


def _agreement(rows: list[dict[str, Any]], recal: list[dict[str, Any]]) -> str:
    """One line: were the recalibration runs pruned from the dense model of the first table?"""
    dense = {r["seed"]: _error(r, "dense_test_acc") for r in rows}
    here = {r["seed"]: _error(r, "dense_test_acc") for r in recal}
    moved = {s: e for s, e in sorted(here.items()) if dense.get(s) != e}
    if not moved:
        return "Both tables prune the same dense model(s).\n"
    errors = "; ".join(
        f"seed {s}: {e:.2f}% here, {dense.get(s, math.nan):.2f}% above" for s, e in moved.items()
    )
    return (
        "The recalibration runs pruned a dense model trained again (the first one's checkpoint was "
        f"not kept, and the new one came out different); dense test error {errors}. "
        "Compare within this table.\n"
    )


def model_tables(
    out: Path, model: str, rows: list[dict[str, Any]], recal: list[dict[str, Any]]
) -> None:
    """The paper-shaped table (after and before retraining), its CSV and the accuracy plot;
    ``recal`` adds the error before retraining with batch-norm statistics re-estimated."""
    methods = [m for m in TABLE_METHODS[model] if any(r["method"] == m for r in rows)]
    dense = statistics.fmean(_error(r, "dense_test_acc") for r in rows)
    title = (
        f"Table {PAPER_TABLE[model]} on Fashion-MNIST: {model}, test error (%) after "
        f"retraining; dense model {dense:.2f}%"
    )
    after = summarize(rows, metric="test_acc_retrained")
    before = summarize(rows, metric="test_acc_pruned")
    (out / "table.md").write_text(to_markdown(after, title=title, methods=methods))
    title = f"{model} on Fashion-MNIST: test error (%) right after pruning, before retraining"
    text = to_markdown(before, title=title, methods=methods)
    if recal:
        text += "\n" + recalibrated_table(model, recal, methods) + "\n" + _agreement(rows, recal)
    (out / "before_retrain.md").write_text(text)
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], round(100 * r["keep"], 2))].append(r)
    lines = []
    for method in methods:
        for keep in sorted({k for m, k in groups if m == method}, reverse=True):
            runs = groups[(method, keep)]
            mean, std = _stats([_error(r) for r in runs])
            pmean, pstd = _stats([_error(r, "test_acc_pruned") for r in runs])
            lines.append((method, f"{keep:.2f}", runs[0]["level"], len(runs), f"{mean:.2f}",
                          f"{std:.2f}", f"{pmean:.2f}", f"{pstd:.2f}"))  # fmt: skip
    header = ["method", "keep_percent", "level", "n_seeds", "error_mean", "error_std",
              "error_pruned_mean", "error_pruned_std"]  # fmt: skip
    _write_csv(out / "table.csv", header, lines)
    panels = [
        ("before retraining", rows, "test_acc_pruned"),
        *([("before retraining, BN recalibrated", recal, "test_acc_recalibrated")] * bool(recal)),
        ("after retraining", rows, "test_acc_retrained"),
    ]
    plot_panels(out / "accuracy.png", panels)


def residual_table(out: Path, rows: list[dict[str, Any]], recal: list[dict[str, Any]]) -> None:
    """ResNet-18: module-order vs graph-aware LAP vs MP, per level, with shortcuts pruned or
    not; relative change vs the MP row under the same shortcut rule. ``recal``: runs with
    batch-norm statistics re-estimated before retraining, shown beside the plain error."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    recal_cells: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for label, method, graph, excluded in RESIDUAL_VARIANTS:
        for target, source in ((cells, rows), (recal_cells, recal)):
            for r in _variant(source, graph, excluded):
                if r["method"] == method:
                    target[(label, r["level"])].append(r)
    levels = sorted({lv for _, lv in cells})
    md = ["| variant | " + " | ".join(f"level {lv}" for lv in levels) + " |",
          "|---|" + "---:|" * len(levels)]  # fmt: skip
    lines = []
    for label, method, _, excluded in RESIDUAL_VARIANTS:
        base = "MP, shortcuts dense" if excluded else "MP, shortcuts pruned"
        row = [label]
        for lv in levels:
            runs = cells.get((label, lv))
            if not runs:
                row.append("—")
                continue
            mean, std = _stats([_error(r) for r in runs])
            pmean, _ = _stats([_error(r, "test_acc_pruned") for r in runs])
            recalibrated = recal_cells.get((label, lv))
            rmean = _stats([_error(r, "test_acc_recalibrated") for r in recalibrated])[0] if (
                recalibrated) else None  # fmt: skip
            keep = 100 * runs[0]["keep"]
            text = f"{mean:.2f}±{std:.2f}"
            if method != "mp" and cells.get((base, lv)):
                ref = _stats([_error(r) for r in cells[(base, lv)]])[0]
                text += f" ({(mean - ref) / ref * 100:+.1f}%)"
            pruned = f"pruned: {pmean:.1f}" + (
                f" ({rmean:.1f} BN recal.)" if rmean is not None else ""
            )
            row.append(f"{text}<br>{pruned}; kept {keep:.2f}%; n={len(runs)}")
            lines.append((label, lv, f"{keep:.3f}", len(runs), f"{mean:.2f}", f"{std:.2f}",
                          f"{pmean:.2f}", "" if rmean is None else f"{rmean:.2f}"))  # fmt: skip
        md.append("| " + " | ".join(row) + " |")
    seeds = sorted({r["seed"] for r in rows})
    md += [
        "",
        "Test error (%) after retraining, mean±std over seeds "
        f"{seeds} (n per cell); in brackets the relative change vs MP under the same shortcut "
        "rule; then the error right after pruning (in brackets with batch-norm statistics "
        "re-estimated, where those runs exist) and the overall % of weights kept. "
        "Definitions: docs/residual-lap.md.",
    ]
    (out / "residual.md").write_text("\n".join(md) + "\n")
    header = ["variant", "level", "keep_percent", "n_seeds", "error_mean", "error_std",
              "error_pruned_mean", "error_recalibrated_mean"]  # fmt: skip
    _write_csv(out / "residual.csv", header, lines)


def dense_note(db: Path, rows: list[dict[str, Any]]) -> str:
    """Training time and test error of the dense models behind ``rows``, from their checkpoints
    (``<db>-checkpoints/``, kept beside the database; absent in a fresh clone)."""
    names = {f.name for f in fields(Protocol)}
    dense: dict[str, dict[str, Any]] = {}  # dense-model key -> one of its rows
    for r in rows:
        protocol = Protocol(**{k: r[k] for k in names if k in r})
        dense.setdefault(config_hash(protocol.dense_config()), r)
    lines = []
    for key, r in dense.items():
        path = db.with_name(db.stem + "-checkpoints") / f"dense-{key}.pt"
        if path.exists():
            seconds = load_checkpoint(path)["wall_time"]
            lines.append(
                f"- dense model, seed {r['seed']}: {seconds / 60:.1f} min of training, test error "
                f"{_error(r, 'dense_test_acc'):.2f}%"
            )
    return "\n".join(lines) + "\n" if lines else ""


def settings_note(rows: list[dict[str, Any]]) -> str:
    """The protocol settings beyond steps and seeds that these rows share."""
    r = rows[0]
    evaluated = r.get("eval_examples") or "all 10,000"
    return (
        f"- one-shot, {r['retrain']} retraining, (p, q) = ({r['p']}, {r['q']}), batch-norm "
        f"factors {'on' if r['bn'] else 'off'}, precision {r.get('precision', 'fp32')}, accuracy "
        f"on the first {evaluated} test images; levels {sorted({x['level'] for x in rows})}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", nargs="?", default=str(HERE / "fmnist.sqlite"))
    args = parser.parse_args()
    with RunStore(args.db) as store:
        every = newest(store.runs(dataset="fashion-mnist"))
    if not every:
        raise SystemExit(f"{args.db} holds no Fashion-MNIST runs; run results/run_fmnist.sh")
    for model in TABLE_METHODS:
        rows = [r for r in every if r["model"] == model]
        if not rows:
            continue
        out = HERE / f"{Path(args.db).stem}-{model}"  # fmnist-vgg16, fmnist-full-vgg16
        out.mkdir(exist_ok=True)
        table_rows = _variant(_plain(rows), "fx", False)
        model_tables(out, model, table_rows, _variant(_recalibrated(rows), "fx", False))
        note = protocol_note(table_rows) + settings_note(table_rows)
        note += dense_note(Path(args.db), table_rows)
        if _recalibrated(rows):
            note += "batch-norm recalibration runs (no retraining):\n"
            note += protocol_note(_recalibrated(rows))
        if model == "resnet18":
            residual_table(out, _plain(rows), _recalibrated(rows))
            note += "residual study (all variants):\n" + protocol_note(rows)
        (out / "protocol.txt").write_text(note)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
