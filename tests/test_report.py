"""Tests for paper-style tables, CSV and plots."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

import pytest

from lookahead_prune.report import (
    method_label,
    method_order,
    plot_accuracy,
    reportable,
    rows_to_csv,
    summarize,
    to_csv,
    to_markdown,
)

# Hand-made runs: error % = 100 * (1 - acc).
# keep 0.0636: mp errors 2.0, 3.0 (mean 2.5, std 0.7071); lap 1.0, 2.0, 3.0 (mean 2, std 1)
# keep 0.0321: mp 4.0 (n=1, std 0); lap 5.0 (gain +25%)
# keep 0.0321 (float noise): rp 10.0; lap-forward-seq only at 0.0636: 2.5 (gain 0)
RAW = [
    ("mp", 0.0636, 0, 0.98),
    ("mp", 0.0636, 1, 0.97),
    ("lap", 0.0636, 0, 0.99),
    ("lap", 0.0636, 1, 0.98),
    ("lap", 0.0636, 2, 0.97),
    ("mp", 0.0321, 0, 0.96),
    ("lap", 0.0321, 0, 0.95),
    ("rp", 0.0321 + 1e-12, 0, 0.90),
    ("lap-forward-seq", 0.0636, 0, 0.975),
    ("zeta", 0.0636, 0, 0.975),
    ("alpha", 0.0636, 0, 0.975),
]


def make_rows() -> list[dict]:
    return [
        {
            "model": "fcn",
            "dataset": "mnist",
            "method": method,
            "keep": keep,
            "seed": seed,
            "level": 4,
            "test_acc_pruned": acc - 0.1,
            "test_acc_retrained": acc,
        }
        for method, keep, seed, acc in RAW
    ]


def test_summary_numbers() -> None:
    s = summarize(make_rows())
    mp = s.cell("mp", 0.0636)
    lap = s.cell("lap", 0.0636)
    assert mp is not None and lap is not None
    assert (mp.n, lap.n) == (2, 3)
    assert mp.mean == pytest.approx(2.5)
    assert mp.std == pytest.approx(statistics.stdev([2.0, 3.0]))  # sample std, ddof=1
    assert lap.mean == pytest.approx(2.0)
    assert lap.std == pytest.approx(1.0)
    single = s.cell("mp", 0.0321)
    assert single is not None and single.n == 1 and single.std == 0.0
    # Relative gain vs MP at the same keep, in percent; lower error -> negative gain.
    assert s.gain("lap", 0.0636) == pytest.approx(-20.0)
    assert s.gain("lap", 0.0321) == pytest.approx(25.0)
    assert s.gain("lap-forward-seq", 0.0636) == pytest.approx(0.0)
    assert s.gain("mp", 0.0636) is None
    assert s.gain("lap-forward-seq", 0.0321) is None  # no such cell
    # Float noise in keep falls in the same column.
    assert s.keeps == [0.0636, 0.0321]
    assert s.cell("rp", 0.0321) is not None


def test_summary_as_accuracy_and_other_metric() -> None:
    s = summarize(make_rows(), metric="test_acc_pruned", as_error=False, baseline="lap")
    lap = s.cell("lap", 0.0636)
    assert lap is not None
    assert lap.mean == pytest.approx(88.0)
    assert s.gain("mp", 0.0636) == pytest.approx((87.5 - 88.0) / 88.0 * 100)
    assert s.gain("lap", 0.0636) is None


def test_method_order_and_labels() -> None:
    assert method_order(["zeta", "lap", "alpha", "lap-backward-seq", "mp", "rp", "lfp"]) == [
        "mp",
        "rp",
        "lfp",
        "lap",
        "lap-backward-seq",
        "alpha",
        "zeta",
    ]
    assert method_label("lap-forward-seq") == "LAP-forward-seq"
    assert method_label("mp") == "MP"


def test_markdown_table() -> None:
    md = to_markdown(summarize(make_rows()), title="FCN on MNIST")
    lines = md.splitlines()
    assert lines[0] == "**FCN on MNIST**"
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| Method | 6.36% | 3.21% |"
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [r[0] for r in body] == [
        "MP (baseline)",
        "RP",
        "LAP",
        "LAP-forward-seq",
        "ALPHA",
        "ZETA",
    ]
    rows = {r[0]: r[1:] for r in body}
    assert rows["MP (baseline)"] == ["2.50±0.71", "4.00"]
    assert rows["LAP"] == ["2.00±1.00 (-20.00%)", "5.00 (+25.00%)"]
    assert rows["RP"] == ["—", "10.00 (+150.00%)"]
    assert rows["LAP-forward-seq"] == ["2.50 (+0.00%)", "—"]
    assert "over 1-3 seeds" in md
    assert "test error (%) after retraining of fcn on mnist" in md.lower()


def test_markdown_explicit_methods_and_clashing_columns() -> None:
    rows = [
        {"model": "m", "dataset": "d", "method": "lap", "keep": k, "seed": 0, "acc": 0.5}
        for k in (0.00123, 0.00124)
    ]
    s = summarize(rows, metric="acc")
    md = to_markdown(s, methods=["lap"])
    assert "| Method | 0.124% | 0.123% |" in md  # more decimals only where 2 would clash
    with pytest.raises(ValueError, match="no runs"):
        to_markdown(s, methods=["lap", "mp"])


def test_summary_csv_parses() -> None:
    text = to_csv(summarize(make_rows()))
    records = list(csv.DictReader(io.StringIO(text)))
    assert list(records[0]) == [
        "method",
        "keep_percent",
        "n_seeds",
        "mean",
        "std",
        "error_change_vs_mp_percent",
    ]
    by_key = {(r["method"], float(r["keep_percent"])): r for r in records}
    assert len(records) == 8
    lap = by_key[("lap", 6.36)]
    assert int(lap["n_seeds"]) == 3
    assert float(lap["mean"]) == pytest.approx(2.0)
    assert float(lap["std"]) == pytest.approx(1.0)
    assert float(lap["error_change_vs_mp_percent"]) == pytest.approx(-20.0)
    assert by_key[("mp", 6.36)]["error_change_vs_mp_percent"] == ""
    assert [r["method"] for r in records][:3] == ["mp", "mp", "rp"]


def test_rows_to_csv() -> None:
    rows = [
        {"method": "lap", "keep": 0.5, "seed": 1, "keep_dict": {"0": 0.5}},
        {"method": "mp", "keep": 0.25},
    ]
    text = rows_to_csv(rows, ["method", "keep", "seed", "keep_dict"])
    records = list(csv.DictReader(io.StringIO(text)))
    assert records == [
        {"method": "lap", "keep": "0.5", "seed": "1", "keep_dict": '{"0": 0.5}'},
        {"method": "mp", "keep": "0.25", "seed": "", "keep_dict": ""},
    ]
    with pytest.raises(ValueError, match="at least one"):
        rows_to_csv(rows, [])
    with pytest.raises(ValueError, match="duplicate"):
        rows_to_csv(rows, ["seed", "seed"])


def test_summarize_rejects_bad_rows() -> None:
    rows = make_rows()
    mixed = [*rows, {**rows[0], "model": "conv6", "dataset": "cifar10"}]
    with pytest.raises(ValueError, match="mix 2"):
        summarize(mixed)
    assert summarize(mixed, model="fcn").model == "fcn"
    assert summarize(mixed, model="conv6", dataset="cifar10").cell("mp", 0.0636).n == 1
    with pytest.raises(ValueError, match="no rows"):
        summarize(mixed, model="vgg11")
    with pytest.raises(ValueError, match="share seed"):
        summarize([*rows, rows[0]])
    with pytest.raises(ValueError, match="lacks 'test_acc_retrained'"):
        summarize([{**rows[0], "test_acc_retrained": None}])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        summarize([{**rows[0], "test_acc_retrained": 98.0}])  # percent, not fraction
    with pytest.raises(ValueError, match="keep"):
        summarize([{**rows[0], "keep": 0}])
    for bad in (math.nan, math.inf):  # never nan±nan: reportable() lists such a run instead
        with pytest.raises(ValueError, match=r"\[0, 1\], got (nan|inf)"):
            summarize([{**rows[0], "test_acc_retrained": bad}])


def test_reportable_skips_nan_and_infinite_accuracies_with_a_line_each() -> None:
    rows = make_rows()
    bad = [
        {**rows[0], "test_acc_retrained": math.nan},
        {**rows[1], "test_acc_retrained": -math.inf},
    ]
    good, problems = reportable([*bad, *rows[2:]])
    assert len(good) == len(rows) - 2 and len(problems) == 2
    assert "test_acc_retrained nan is not an accuracy" in problems[0]
    assert "test_acc_retrained -inf is not an accuracy" in problems[1]
    assert "nan" not in to_markdown(summarize(good))


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_writes_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / "plots" / f"fcn{suffix}"
    plot_accuracy(make_rows(), path, title="FCN on MNIST")
    data = path.read_bytes()
    assert len(data) > 1000
    if suffix == ".png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    else:
        assert b"<svg" in data[:2000]
        assert b"LAP-forward-seq" in data or b"LAP" in data


def test_plot_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.png, \.svg or \.pdf"):
        plot_accuracy(make_rows(), tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="at least one metric"):
        plot_accuracy(make_rows(), tmp_path / "x.png", metrics=())
    assert not (tmp_path / "x.png").exists()


def test_one_seed_has_no_spread_and_csv_numbers_are_rounded() -> None:
    rows = [
        {"model": "fcn", "dataset": "mnist", "method": m, "keep": 0.0636, "seed": 0,
         "test_acc_retrained": acc}
        for m, acc in (("mp", 1 - 0.0483), ("lap", 1 - 0.0321))
    ]  # fmt: skip
    summary = summarize(rows)
    md = to_markdown(summary)
    assert "±" not in md.split("\n\n")[0] and "1 seed" in md and "1 seeds" not in md
    assert "negative: fewer errors" in md
    records = list(csv.DictReader(io.StringIO(to_csv(summary))))
    assert records[0]["mean"] == "4.83" and records[0]["std"] == ""  # not 4.830000000000001
    assert records[1]["error_change_vs_mp_percent"] == str(round((3.21 - 4.83) / 4.83 * 100, 4))
