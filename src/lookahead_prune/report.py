"""Paper-style tables (Markdown, CSV) and accuracy plots from results-store rows.

A row is a flat mapping with at least ``model``, ``dataset``, ``method``, ``keep`` (the
overall kept fraction), ``seed`` and the accuracy metrics as fractions in [0, 1], exactly as
:meth:`lookahead_prune.store.RunStore.runs` returns them. One table or plot describes one
(model, dataset): :func:`summarize` takes ``model=``/``dataset=`` filters and raises a clear
error if the rows it is left with still mix several.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .protocol import RETRAIN_MODES, Protocol

__all__ = [
    "DEFAULT_METHOD_ORDER",
    "Cell",
    "Summary",
    "change_column",
    "check_plot_path",
    "method_label",
    "method_order",
    "plot_accuracy",
    "reportable",
    "rows_to_csv",
    "summarize",
    "to_csv",
    "to_markdown",
]

DEFAULT_METHOD_ORDER = (
    "mp",
    "rp",
    "lfp",
    "lbp",
    "lap",
    "lap-forward",
    "lap-backward",
    "lap-forward-seq",
    "lap-backward-seq",
)

# Significant digits of keep fractions when grouping: runs whose keep differs only by float
# noise share a column.
_KEEP_DIGITS = 6


def _round_keep(keep: float) -> float:
    return float(f"{float(keep):.{_KEEP_DIGITS}g}")


_METRIC_TEXT = {
    "test_acc_retrained": "test {quantity} (%) after retraining",
    "test_acc_pruned": "test {quantity} (%) right after pruning, before retraining",
    "test_acc_recalibrated": "test {quantity} (%) before retraining, batch norm recalibrated",
}
_PLOT_TITLES = {
    "test_acc_pruned": "Before retraining",
    "test_acc_recalibrated": "Before retraining, BN recalibrated",
    "test_acc_retrained": "After retraining",
}


@dataclass(frozen=True)
class Cell:
    """Mean and sample standard deviation (ddof=1; 0 for one run) of n runs, in percent."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class Summary:
    """A metric aggregated over seeds per (method, keep) for one model and dataset.

    Values are percentages: error ``100 * (1 - acc)`` when ``as_error`` else ``100 * acc``.
    """

    metric: str
    as_error: bool
    baseline: str
    model: str | None
    dataset: str | None
    cells: Mapping[tuple[str, float], Cell]

    @property
    def methods(self) -> list[str]:
        """Methods present, in the default table order."""
        return method_order({method for method, _ in self.cells})

    @property
    def keeps(self) -> list[float]:
        """Keep fractions present (to 6 significant digits), largest first as in the paper."""
        return sorted({keep for _, keep in self.cells}, reverse=True)

    def cell(self, method: str, keep: float) -> Cell | None:
        """The cell of *method* at *keep*, or None if no run has it."""
        return self.cells.get((method, _round_keep(keep)))

    def gain(self, method: str, keep: float) -> float | None:
        """Relative change in percent vs the baseline's mean at the same keep.

        ``(m - m_base) / m_base * 100``; None for the baseline itself, where either cell is
        missing, or where the baseline mean is 0.
        """
        if method == self.baseline:
            return None
        here, base = self.cell(method, keep), self.cell(self.baseline, keep)
        if here is None or base is None or base.mean == 0:
            return None
        return (here.mean - base.mean) / base.mean * 100.0


def method_order(methods: Iterable[str]) -> list[str]:
    """Sort method names as the paper's tables do: DEFAULT_METHOD_ORDER, then the rest A-Z."""
    rank = {name: i for i, name in enumerate(DEFAULT_METHOD_ORDER)}
    return sorted(set(methods), key=lambda m: (rank.get(m, len(rank)), m))


def method_label(method: str) -> str:
    """Display name as in the paper: family upper-cased, ``lap-forward`` -> ``LAP-forward``."""
    family, sep, variant = method.partition("-")
    return family.upper() + sep + variant


def summarize(
    rows: Iterable[Mapping[str, Any]],
    *,
    metric: str = "test_acc_retrained",
    as_error: bool = True,
    baseline: str = "mp",
    model: str | None = None,
    dataset: str | None = None,
) -> Summary:
    """Group rows by (method, keep) and return mean, sample std and n of *metric* in percent.

    *model* / *dataset* keep only matching rows; if the rest mix several (model, dataset)
    pairs, or one (method, keep, seed) appears twice, a ValueError says how to filter.
    """
    selected = [
        row
        for row in rows
        if (model is None or row.get("model") == model)
        and (dataset is None or row.get("dataset") == dataset)
    ]
    if not selected:
        wanted = f" for model={model!r}, dataset={dataset!r}" if model or dataset else ""
        raise ValueError(f"no rows to summarize{wanted}")
    pairs = sorted({(row.get("model"), row.get("dataset")) for row in selected}, key=str)
    if len(pairs) > 1:
        raise ValueError(
            f"rows mix {len(pairs)} (model, dataset) pairs {pairs}; "
            "pass model= and dataset= to summarize one of them"
        )

    values: dict[tuple[str, float], list[float]] = {}
    seeds: set[tuple[str, float, Any]] = set()
    for row in selected:
        method, keep, acc = _required(row, "method"), _required(row, "keep"), _required(row, metric)
        if not isinstance(method, str):
            raise ValueError(f"row method must be a string, got {method!r}")
        if not _is_number(keep) or not 0 < keep <= 1:
            raise ValueError(f"row keep must be a fraction in (0, 1], got {keep!r}")
        if not _is_number(acc) or not 0 <= acc <= 1:  # NaN and infinities fail this too
            raise ValueError(f"{metric} must be an accuracy fraction in [0, 1], got {acc!r}")
        group = (method, _round_keep(keep))
        seed = row.get("seed")
        if seed is not None:
            if (*group, seed) in seeds:
                raise ValueError(
                    f"two runs of {method} at keep {group[1]} share seed {seed}; "
                    "the rows mix configurations, filter them first"
                )
            seeds.add((*group, seed))
        percent = 100.0 * (1.0 - acc) if as_error else 100.0 * acc
        values.setdefault(group, []).append(percent)

    cells = {group: _cell(xs) for group, xs in values.items()}
    model_name, dataset_name = pairs[0]
    return Summary(metric, as_error, baseline, model_name, dataset_name, cells)


def reportable(
    rows: Iterable[Mapping[str, Any]], metric: str = "test_acc_retrained"
) -> tuple[list[dict[str, Any]], list[str]]:
    """Split rows into those :func:`summarize` can show and one line for each it cannot.

    A table of a hundred good runs should not fail because one stored run has ``keep=0`` or
    lacks the metric; the caller shows the good ones and lists the others.
    """
    good: list[dict[str, Any]] = []
    problems: list[str] = []
    for row in rows:
        keep, acc, method = row.get("keep"), row.get(metric), row.get("method")
        where = f"{method} level {row.get('level')} seed {row.get('seed')} (key {row.get('key')})"
        if not _is_number(keep) or not 0 < keep <= 1:
            problems.append(f"{where}: keep {keep!r} is not a fraction in (0, 1]")
        elif not _is_number(acc) or not 0 <= acc <= 1:  # NaN and infinities fail this too
            problems.append(f"{where}: {metric} {acc!r} is not an accuracy")
        elif not isinstance(method, str):
            problems.append(f"{where}: method {method!r} is not a name")
        else:
            good.append(dict(row))
    return good, problems


def _required(row: Mapping[str, Any], name: str) -> Any:
    if row.get(name) is None:
        where = {k: row.get(k) for k in ("method", "keep", "seed") if k in row}
        raise ValueError(f"a row lacks {name!r} ({where}); only finished runs can be reported")
    return row[name]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _cell(xs: Sequence[float]) -> Cell:
    n = len(xs)
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return Cell(mean, std, n)


def _keep_labels(keeps: Sequence[float]) -> list[str]:
    """Percent labels like the paper's (``6.36%``), with more decimals only if two would clash."""
    for decimals in range(2, _KEEP_DIGITS + 3):
        labels = [f"{100 * k:.{decimals}f}%" for k in keeps]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def _rows_in_order(summary: Summary, methods: Sequence[str] | None) -> list[str]:
    if methods is None:
        return summary.methods
    missing = [m for m in methods if m not in summary.methods]
    if missing:
        raise ValueError(f"methods {missing} have no runs; present: {summary.methods}")
    return list(methods)


def _caption(summary: Summary, label: Callable[[str], str] = method_label) -> str:
    quantity = "error" if summary.as_error else "accuracy"
    text = _METRIC_TEXT.get(summary.metric, f"{quantity} (%) from `{summary.metric}`")
    text = text.format(quantity=quantity)
    subject = " of ".join(filter(None, [text, summary.model]))
    subject += f" on {summary.dataset}" if summary.dataset else ""
    ns = sorted({cell.n for cell in summary.cells.values()})
    if ns == [1]:
        spread = "1 seed"
    else:
        seeds = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
        spread = f"mean±std over {seeds} seeds (one seed: no ±)"
    quantity = "error" if summary.as_error else "accuracy"
    better = "fewer errors" if summary.as_error else "higher accuracy"
    sign = "negative" if summary.as_error else "positive"
    return (
        f"{subject[0].upper()}{subject[1:]}; {spread}. Columns are % of weights remaining; "
        f"bracketed numbers are the relative change in {quantity} vs "
        f"{label(summary.baseline)} at the same keep fraction ({sign}: {better})."
    )


def to_markdown(
    summary: Summary,
    *,
    title: str | None = None,
    methods: Sequence[str] | None = None,
    decimals: int = 2,
    label: Callable[[str], str] = method_label,
) -> str:
    """Render a summary as a Markdown table shaped like the paper's Tables 1-6.

    Rows are methods (*methods* order, else the default one), columns % weights remaining
    (descending); cells ``mean±std (gain%)`` with the gain omitted on the baseline row.
    ``label`` names a row (rows that are not methods, such as retraining modes: ``str``).
    """
    keeps = summary.keeps
    header = ["Method", *_keep_labels(keeps)]
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(keeps)]
    for method in _rows_in_order(summary, methods):
        cells = [label(method) + (" (baseline)" if method == summary.baseline else "")]
        for keep in keeps:
            cell = summary.cell(method, keep)
            if cell is None:
                cells.append("—")
                continue
            text = f"{cell.mean:.{decimals}f}"
            if cell.n > 1:
                text += f"±{cell.std:.{decimals}f}"
            gain = summary.gain(method, keep)
            if gain is not None:
                text += f" ({gain:+.{decimals}f}%)"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _caption(summary, label)]
    return "\n".join(lines) + "\n"


CSV_DECIMALS = 4
"""Decimals of the percentages in :func:`to_csv` (far below any seed-to-seed spread)."""


def change_column(summary: Summary) -> str:
    """CSV name of the relative-change column; it says what a positive value means."""
    quantity = "error" if summary.as_error else "accuracy"
    return f"{quantity}_change_vs_{summary.baseline}_percent"


def to_csv(summary: Summary, *, methods: Sequence[str] | None = None) -> str:
    """Long-format CSV of a summary, one line per (method, keep), for spreadsheets and plots.

    Columns: method, keep_percent, n_seeds, mean, std (empty for one seed), and the relative
    change vs the baseline, named by :func:`change_column` (``error_change_vs_mp_percent``:
    positive means more errors than MP; empty when undefined). Rounded to 4 decimals.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", "keep_percent", "n_seeds", "mean", "std", change_column(summary)])
    rounded = lambda value: round(value, CSV_DECIMALS)  # noqa: E731
    for method in _rows_in_order(summary, methods):
        for keep in summary.keeps:
            cell = summary.cell(method, keep)
            if cell is None:
                continue
            gain = summary.gain(method, keep)
            writer.writerow(
                [
                    method,
                    float(f"{100 * keep:.{_KEEP_DIGITS}g}"),
                    cell.n,
                    rounded(cell.mean),
                    rounded(cell.std) if cell.n > 1 else "",
                    "" if gain is None else rounded(gain),
                ]
            )
    return out.getvalue()


def rows_to_csv(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Raw runs as CSV with the given columns; missing values are empty, nested ones JSON."""
    columns = list(columns)
    if not columns:
        raise ValueError("rows_to_csv needs at least one column")
    if len(set(columns)) != len(columns):
        raise ValueError(f"duplicate columns in {columns}")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_value(row.get(name)) for name in columns])
    return out.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, sort_keys=True)
    return value


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def check_plot_path(path: str | Path) -> None:
    """Refuse a plot file name whose format matplotlib is not asked to write here."""
    if Path(path).suffix.lower() not in PLOT_SUFFIXES:
        raise ValueError(f"plot path must end in .png, .svg or .pdf, got {Path(path).name!r}")


def plot_accuracy(
    rows: Iterable[Mapping[str, Any]],
    path: str | Path,
    *,
    metrics: Sequence[str] = ("test_acc_pruned", "test_acc_retrained"),
    title: str | None = None,
    model: str | None = None,
    dataset: str | None = None,
    methods: Sequence[str] | None = None,
) -> None:
    """Plot test accuracy vs % weights remaining, one subplot per metric, to a PNG or SVG.

    The x axis is logarithmic and decreasing to the right as in the paper; each method is a
    line of means with a ±std band. The format follows the suffix of *path*.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or state
    from matplotlib.ticker import NullLocator

    path = Path(path)
    check_plot_path(path)
    metrics = list(metrics)
    if not metrics:
        raise ValueError("plot_accuracy needs at least one metric")
    rows = list(rows)
    summaries = [
        summarize(rows, metric=m, as_error=False, model=model, dataset=dataset) for m in metrics
    ]

    fig = Figure(figsize=(5.0 * len(metrics), 4.0), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric, summary in zip(axes, metrics, summaries, strict=True):
        for method in _rows_in_order(summary, methods):
            keeps = [k for k in summary.keeps if summary.cell(method, k) is not None]
            cells = [summary.cell(method, k) for k in keeps]
            x = [100 * k for k in keeps]
            mean = [c.mean for c in cells]
            (line,) = ax.plot(x, mean, marker="o", markersize=3, label=method_label(method))
            ax.fill_between(
                x,
                [c.mean - c.std for c in cells],
                [c.mean + c.std for c in cells],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
        ax.set_xscale("log")
        ticks = [100 * k for k in summary.keeps]
        ax.set_xticks(ticks, labels=[label[:-1] for label in _keep_labels(summary.keeps)])
        ax.xaxis.set_minor_locator(NullLocator())
        if len(ticks) > 6:
            ax.tick_params(axis="x", labelrotation=45)
        ax.set_xlim(max(ticks) * 1.15, min(ticks) / 1.15)  # decreasing to the right
        ax.set_xlabel("% weights remaining")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(_PLOT_TITLES.get(metric, metric))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    subject = " on ".join(filter(None, [summaries[0].model, summaries[0].dataset]))
    if title or subject:
        fig.suptitle(title or subject)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


PROTOCOL_FIELDS = [
    f.name for f in fields(Protocol) if f.name != "seed" and not f.metadata.get("runtime")
]
"""What makes two rows one experiment: everything but the seed and how it was computed."""


RETRAIN_FIELDS = ("retrain", "retrain_steps", "rewind_step")
"""What tells retraining modes apart: ``lap report --by retrain`` compares them in one table."""


def protocol_groups(
    rows: list[dict[str, Any]], *, ignore: Sequence[str] = ()
) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """Rows grouped by everything in their protocol but the seed (and ``ignore``): one table
    per group."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        key = tuple(repr(r.get(name)) for name in PROTOCOL_FIELDS if name not in ignore)
        groups.setdefault(key, []).append(r)
    return groups


def retrain_label(row: dict[str, Any]) -> str:
    """A retraining mode as a table row: ``rewind-weights k=2500, 47500 steps``."""
    mode = row.get("retrain") or "finetune"
    k = f" k={row.get('rewind_step')}" if mode == "rewind-weights" else ""
    return f"{mode}{k}, {row.get('retrain_steps')} steps"


def by_retrain(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]], list[str]]]:
    """Per protocol (but its retraining) and method: (method, rows whose ``method`` is their
    retraining mode, the modes in order: finetune, rewind-weights, rewind-lr, lottery, each
    from the longest retraining down). The first, fine-tuning's longest, is the baseline."""
    tables = []
    for group in protocol_groups(rows, ignore=RETRAIN_FIELDS).values():
        for method in method_order({r["method"] for r in group}):
            runs = [r | {"method": retrain_label(r)} for r in group if r["method"] == method]
            rank = {mode: i for i, mode in enumerate(RETRAIN_MODES)}
            order = sorted({(rank[r.get("retrain") or "finetune"], -(r.get("retrain_steps") or 0),
                             r["method"]) for r in runs})  # fmt: skip
            tables.append((method, runs, list(dict.fromkeys(o[-1] for o in order))))
    return tables


METRIC_WORDS = {
    "test_acc_retrained": "test error (%) after retraining",
    "test_acc_pruned": "test error (%) right after pruning, before retraining",
    "test_acc_recalibrated": "test error (%) before retraining, batch norm recalibrated",
    "train_acc_retrained": "training error (%) after retraining",
}


BEFORE_RETRAINING = ("test_acc_pruned", "test_acc_recalibrated")
OPTIONAL_METRICS = ("test_acc_recalibrated",)
"""Metrics only some runs have (``--bn-recalibrate``): runs without them are left out quietly."""


def table_title(rows: list[dict[str, Any]], metric: str) -> str:
    """A table's title in words: model, data, how it was pruned and what the cells show."""
    r = rows[0]
    steps = f"{r.get('train_steps')} training steps"
    how = f"{r.get('mode')} pruning"
    if metric not in BEFORE_RETRAINING:  # retraining has not happened yet for that table
        how += f", {r.get('retrain')} retraining"
        steps += f" + {r.get('retrain_steps')} retraining steps"
    what = METRIC_WORDS.get(metric, metric)
    return f"{r['model']} ({r.get('activation')}) on {r['dataset']}, {how}, {steps}: {what}"


def retrain_table_title(runs: list[dict[str, Any]], method: str, metric: str) -> str:
    """The title of one ``--by retrain`` table: the protocol, the method, what cells show."""
    r = runs[0]
    return (f"{r['model']} ({r.get('activation')}) on {r['dataset']}, {r.get('mode')} "
            f"pruning with {method_label(method)}, {r.get('train_steps')} training "
            f"steps ({r.get('schedule')} rate), by retraining mode: "
            f"{METRIC_WORDS.get(metric, metric)}")  # fmt: skip


CSV_COLUMNS = [
    "model",
    "dataset",
    "method",
    "level",
    "keep",
    "seed",
    "test_acc_pruned",
    "test_acc_recalibrated",
    "test_acc_retrained",
    "train_acc_pruned",
    "train_acc_retrained",
    "retrain",
    "rewind_step",
    "mode",
    "train_steps",
    "retrain_steps",
    "schedule",
    "activation",
    "scope",
    "bn",
    "bn_recalibrate",
    "graph",
    "wall_time",
]
"""The columns of ``lap report --format csv``: one row per run."""


def print_tables(rows: list[dict[str, Any]], metric: str, by: str = "method") -> None:
    """Print ``rows`` as markdown tables of ``metric``: one per protocol (``by="method"``),
    or per protocol but its retraining and per method (``by="retrain"``); runs that cannot
    be shown are named on stderr."""
    if metric in OPTIONAL_METRICS:
        rows = [r for r in rows if r.get(metric) is not None]
        if not rows:
            print(f"lap report: no run has {metric} (sweep with --bn-recalibrate N)",
                  file=sys.stderr)  # fmt: skip
    good, problems = reportable(rows, metric)
    for problem in problems:
        print(f"lap report: skipped a run: {problem}", file=sys.stderr)
    if by == "retrain":
        for method, runs, modes in by_retrain(good):
            summary = summarize(runs, metric=metric, baseline=modes[0])
            title = retrain_table_title(runs, method, metric)
            print(to_markdown(summary, title=title, methods=modes, label=str))
            print()
        return
    for group in protocol_groups(good).values():
        summary = summarize(group, metric=metric)
        print(to_markdown(summary, title=table_title(group, metric)))
        print()


def summary_csv(rows: list[dict[str, Any]], metric: str, by: str = "method") -> str:
    """The cells of :func:`print_tables`' tables as CSV (problems named on stderr)."""
    good, problems = reportable(rows, metric)
    for problem in problems:
        print(f"lap report: skipped a run: {problem}", file=sys.stderr)
    out = []
    if by == "retrain":  # the method column: "lap: rewind-lr, 50000 steps"
        for method, runs, modes in by_retrain(good):
            runs = [r | {"method": f"{method}: {r['method']}"} for r in runs]
            modes = [f"{method}: {m}" for m in modes]
            summary = summarize(runs, metric=metric, baseline=modes[0])
            out.append(to_csv(summary, methods=modes))
    else:
        for group in protocol_groups(good).values():
            out.append(to_csv(summarize(group, metric=metric)))
    return "".join(out)
