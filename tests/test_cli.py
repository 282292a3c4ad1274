"""The `lap` command as a newcomer meets it: help, errors, logs, tables, prune --out."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lookahead_prune.cli import build_parser, main
from lookahead_prune.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("demo", "sweep", "report", "train", "prune", "export")
TINY = ["--train-steps", "20", "--subset", "600"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_with_its_default_and_no_markup():
    for name, sub in _subparsers().items():
        text = sub.format_help()
        assert "``" not in text, name
        for action in sub._actions:
            if action.dest in ("help", "config", "checkpoint"):
                continue
            assert action.help, f"lap {name} {action.option_strings} has no help"
        assert "(default: " in text, name
    assert "None: the paper's for each model" in _subparsers()["sweep"].format_help()


def test_every_command_takes_quiet_and_train_takes_only_training_flags():
    subs = _subparsers()
    for name in COMMANDS:
        assert "--quiet" in subs[name].format_help(), name
    train_flags = {flag for a in subs["train"]._actions for flag in a.option_strings}
    assert "--train-steps" in train_flags
    assert not {"--retrain-steps", "--mode", "--scope", "--exclude", "--engine"} & train_flags
    assert "one method" in subs["prune"].format_help()


def test_readme_examples_are_short():
    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")
    for line in re.findall(r"^lap (?:train|sweep) --.*$", readme, flags=re.M):
        steps = [int(n) for n in re.findall(r"--(?:train|retrain)-steps (\d+)", line)]
        assert steps and max(steps) <= 5000, line


def test_bad_levels_are_refused_before_anything_is_created(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    rc = main(["sweep", "--model", "fcn", "--methods", "mp", "--levels", "0,40",
               "--db", str(db), *TINY])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "level 40 keeps no weight" in err
    assert not db.exists() and not (tmp_path / "r-checkpoints").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "fcnn"], "unknown model"),
        (["--model", "fcn", "--dataset", "mnst"], "unknown dataset"),
        (["--model", "fcn", "--seeds", "a"], "--seeds must be integers"),
    ],
)
def test_typos_are_caught_before_anything_is_created(tmp_path, capsys, flags, message):
    db = tmp_path / "r.sqlite"
    rc = main(["sweep", "--methods", "mp", "--levels", "4", "--db", str(db), *flags, *TINY])
    assert rc == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _sweep(db: Path, *extra: str) -> None:
    args = ["sweep", "--model", "fcn", "--methods", "mp,lap", "--levels", "4", "--seeds", "0",
            "--retrain-steps", "10", "--db", str(db), "--quiet", *TINY, *extra]  # fmt: skip
    assert main(args) == 0


def test_report_skips_a_bad_row_and_titles_tables_in_words(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    _sweep(db)
    with RunStore(db) as store:  # a run stored by an older version with keep 0
        good = store.runs()[0]
        config = {k: good[k] for k in ("model", "dataset", "method", "seed", "mode", "retrain",
                                       "activation", "train_steps", "retrain_steps")}  # fmt: skip
        config["level"] = 40
        store.put(config, {"keep": 0.0, "test_acc_pruned": 0.1, "test_acc_retrained": 0.1},
                  wall_time=1.0, code_version="old")  # fmt: skip
    capsys.readouterr()
    assert main(["report", "--db", str(db)]) == 0
    out, err = capsys.readouterr()
    assert "skipped a run" in err and "keep 0.0" in err
    assert "test error (%) after retraining" in out and "test_acc" not in out
    assert "1 seed" in out and "1 seeds" not in out and "±" not in out.split("\n\n")[1]
    assert main(["report", "--db", str(db), "--metric", "test_acc_pruned"]) == 0
    title = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("**"))
    assert "right after pruning" in title and "finetune" not in title


def test_report_checks_the_plot_name_first_and_writes_pdf(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    _sweep(db)
    capsys.readouterr()
    assert main(["report", "--db", str(db), "--plot", str(tmp_path / "x.jpg")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and ".pdf" in err
    assert main(["report", "--db", str(db), "--plot", str(tmp_path / "x.pdf"), "--quiet"]) == 0
    assert (tmp_path / "x.pdf").read_bytes().startswith(b"%PDF")


def test_train_then_prune_out_is_a_pipeline(tmp_path, capsys):
    dense = tmp_path / "dense.pt"
    assert main(["train", "--out", str(dense), "--quiet", *TINY]) == 0
    pruned = tmp_path / "pruned.pt"
    assert main(["prune", str(dense), "--method", "lap", "--keep", "0.1", "--out",
                 str(pruned)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "fc1" in out and "pruned model saved" in out
    state = torch.load(pruned, weights_only=True)
    weights = state["state"]
    assert "fc1.weight_orig" in weights and "fc1.weight_mask" in weights
    kept = weights["fc1.weight_mask"].mean().item()
    assert abs(kept - 0.1) < 1e-3 and state["method"] == "lap"
    assert main(["prune", str(dense), "--model", "conv6"]) == 2
    assert "contradicts" in capsys.readouterr().err
    assert main(["prune", str(dense), "--method", "lamp", "--keep", "0.5"]) == 0
    assert "only with --scope global" in capsys.readouterr().err


def test_prune_on_a_results_database_says_what_it_is_and_never_to_delete_it(tmp_path, capsys):
    db = tmp_path / "results.sqlite"
    with RunStore(db):
        pass
    assert main(["prune", str(db)]) == 2
    err = capsys.readouterr().err
    assert "SQLite database" in err and "delete" not in err
    junk = tmp_path / "notes.pt"
    junk.write_bytes(b"not a checkpoint at all")
    assert main(["prune", str(junk)]) == 2
    err = capsys.readouterr().err
    assert "not a readable checkpoint" in err and "delete" not in err and err[-1] == "\n"
    assert err.count("\n") == 1


def test_logs_written_to_a_file_are_plain_lines(tmp_path):
    log = tmp_path / "sweep.log"
    cmd = [sys.executable, "-m", "lookahead_prune.cli", "sweep", "--model", "fcn",
           "--methods", "mp", "--levels", "4", "--retrain-steps", "10",
           "--db", str(tmp_path / "r.sqlite"), *TINY]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as handle:
        subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, check=True, env=env)
    text = log.read_text()
    assert "\x1b[" not in text and "\r" not in text
    assert re.search(r"^runs: 1/1 runs \(100%\)", text, flags=re.M), text


def test_toml_keys_take_dashes_and_the_example_file_is_valid(tmp_path, capsys):
    example = (ROOT / "examples" / "sweep.toml").read_text()
    small = example.replace("train-steps = 1000", "train-steps = 20").replace(
        "retrain-steps = 500", "retrain-steps = 10\nsubset = 600"
    )
    small = small.replace('levels = "4,7,10"', "levels = [4]").replace(
        'db = "example.sqlite"', f"db = {str(tmp_path / 'e.sqlite')!r}"
    )
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(small)
    assert main(["sweep", str(cfg), "--quiet"]) == 0
    assert "3 runs done" in capsys.readouterr().out


def test_runs_of_one_protocol_share_a_table_whatever_engine_made_them(tmp_path, capsys):
    db = tmp_path / "r.sqlite"  # level 2 keeps 25%: trained by train(); level 4 by the group
    assert main(["sweep", "--model", "fcn", "--methods", "mp", "--levels", "2,4",
                 "--retrain-steps", "10", "--db", str(db), *TINY, "--quiet"]) == 0  # fmt: skip
    with RunStore(db) as store:
        assert {r["engine"] for r in store.runs()} == {"sequential", "sparse"}
    capsys.readouterr()
    assert main(["report", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert out.count("**") == 2 and "| MP (baseline) |" in out and "25.14%" in out


def test_plain_progress_prints_the_last_line_once():
    import io

    from lookahead_prune.progress import PlainProgress

    stream = io.StringIO()
    bar = PlainProgress(2, "runs", "run", stream=stream, every=1e9)
    bar.update(1)
    bar.update(1)
    bar.update(0)
    bar.update(0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("runs: 2/2 runs (100%)")
