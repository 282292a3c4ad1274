"""The tables that docs/rewinding.md quotes equal the files build_rewinding.py writes.

The page's numbers are copied by hand as seeds land; this keeps a stale cell from surviving a
rebuild. A docs row names its mode and method (or inherits them from the rows above, as the
tables leave repeated names blank); every "mean±std" cell must be the built file's value.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "rewinding.md"
BUILT = ROOT / "results" / "mnist-rewinding"
METHOD_NAMES = {"MP": "mp", "LAP": "lap", "LAP-forward-seq": "lap-forward-seq"}
CELL = re.compile(r"^(\d+\.\d+)±(\d+\.\d+)$")


def _tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of the page, as rows of stripped cells (separator rows dropped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _table_with(tables: list[list[list[str]]], header: list[str]) -> list[list[str]]:
    """The one table whose header row starts with ``header``."""
    found = [t for t in tables if t[0][: len(header)] == header]
    assert len(found) == 1, f"expected one table headed {header} in {DOC.name}, found {len(found)}"
    return found[0]


def _csv(name: str) -> list[dict[str, str]]:
    with open(BUILT / name, newline="") as f:
        return list(csv.DictReader(f))


def _cells_by_name(table: list[list[str]], n_names: int) -> list[tuple[tuple[str, ...], str, str]]:
    """(names, column header, cell) for every numeric cell; blank names repeat the row above."""
    header, rows = table[0], table[1:]
    names: list[str] = [""] * n_names
    out = []
    for row in rows:
        for i in range(n_names):
            names[i] = row[i] or names[i]
        for column, cell in zip(header[n_names:], row[n_names:], strict=True):
            out.append((tuple(names), column, cell))
    return out


def _mean_std(row: dict[str, str]) -> str:
    """A built CSV row's cell as the tables print it."""
    return f"{row['error_mean']}±{row['error_std']}"


def _mode(label: str) -> str:
    """'rewind-weights (k = 2.5k)' -> 'rewind-weights'."""
    return label.split(" (")[0]


def _check(cells, expected: dict[tuple[str, ...], str]) -> None:
    checked = 0
    for key, cell in cells:
        assert CELL.match(cell), f"{key}: {cell!r} is not a mean±std cell"
        assert key in expected, f"{DOC.name} quotes {key}, which the built files do not have"
        assert cell == expected[key], (
            f"{DOC.name} says {cell} for {key}; the built file says {expected[key]}"
        )
        checked += 1
    assert checked > 0


@pytest.fixture(scope="module")
def tables() -> list[list[list[str]]]:
    return _tables(DOC.read_text())


def _check_mode_method_table(tables: list[list[list[str]]], first: str, built: str) -> None:
    """A table headed mode | method | <first level> ... against a CSV of the same cells."""
    table = _table_with(tables, ["mode", "method", first])
    expected = {
        (_mode(r["mode"]), r["method"], f"{r['keep_percent']}%"): _mean_std(r) for r in _csv(built)
    }
    cells = [
        ((_mode(mode), METHOD_NAMES[method], column), cell)
        for (mode, method), column, cell in _cells_by_name(table, 2)
    ]
    _check(cells, expected)
    assert len(cells) == len(expected), f"{DOC.name} quotes {len(cells)} of {built}'s cells"


@pytest.mark.parametrize(("first", "built"), [("6.36%", "grid.csv"), ("25.14%", "iterative.csv")])
def test_the_grid_and_iterative_tables_are_the_built_csvs(
    tables: list[list[list[str]]], first: str, built: str
) -> None:
    _check_mode_method_table(tables, first, built)


def test_the_budget_table_is_budget_csv(tables: list[list[list[str]]]) -> None:
    table = _table_with(tables, ["% kept", "method", "mode"])
    budgets = {"2.5k": "2500", "10k": "10000", "25k": "25000", "50k": "50000"}
    expected = {
        (
            r["keep_percent"],
            r["method"],
            _mode(r["mode"]),
            r["retrain_steps"],
        ): _mean_std(r)
        for r in _csv("budget.csv")
    }
    cells = [
        ((keep, METHOD_NAMES[method], _mode(mode), budgets[column]), cell)
        for (keep, method, mode), column, cell in _cells_by_name(table, 3)
    ]
    _check(cells, expected)
    assert len(cells) == len(expected)


def test_a_stale_cell_is_caught() -> None:
    """The check fails on a page whose cell differs from the built file (it can fail)."""
    text = DOC.read_text()
    row = next(r for r in _csv("grid.csv") if r["mode"] == "finetune" and r["method"] == "mp")
    cell = _mean_std(row)
    assert cell in text
    stale = _tables(text.replace(cell, "99.99±0.00", 1))
    with pytest.raises(AssertionError, match=r"99\.99"):
        _check_mode_method_table(stale, "6.36%", "grid.csv")
