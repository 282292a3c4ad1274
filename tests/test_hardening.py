"""Nothing lost, nothing silently wrong: damaged checkpoints, tied weights, aliases, TOML types."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lookahead_prune as lp
from lookahead_prune.cli import main
from lookahead_prune.pipeline import Protocol
from lookahead_prune.prune import canonical_method
from lookahead_prune.store import RunStore, config_hash
from lookahead_prune.sweep import Sweep

TINY = ["--train-steps", "20", "--retrain-steps", "10", "--subset", "600", "--quiet"]


def _sweep(db: Path, levels: str) -> int:
    return main(["sweep", "--model", "fcn", "--methods", "mp", "--levels", levels,
                 "--db", str(db), *TINY])  # fmt: skip


def test_a_bit_flipped_dense_checkpoint_is_refused_and_nothing_is_stored(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    assert _sweep(db, "4") == 0
    (dense,) = (tmp_path / "r-checkpoints").glob("dense-*.pt")
    data = bytearray(dense.read_bytes())
    data[len(data) // 2] ^= 0x10
    dense.write_bytes(bytes(data))
    capsys.readouterr()
    assert _sweep(db, "4,5") == 2
    err = capsys.readouterr().err
    assert str(dense) in err and "CRC-32" in err and "delete the file" in err
    assert err.count("\n") == 1  # one line, no traceback
    with RunStore(db) as store:
        assert len(store) == 1  # level 5 was not computed from the damaged weights


def test_tied_weights_are_refused_not_silently_untied():
    first, second = nn.Linear(6, 6), nn.Linear(6, 6)
    second.weight = first.weight
    model = nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), nn.Linear(6, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"shares its weight with \['2.weight'\]"):
        lp.prune(model, "lap", 0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.relu(self.fc(self.emb(x)))).mean(1)

    lm = TiedLM()
    with pytest.raises(ValueError, match=r"emb\.weight"):
        lp.prune(lm, "mp", 0.5)
    lp.prune(lm, "mp", 0.5, exclude=["head"])  # the way out the message names
    assert hasattr(lm.fc, "weight_mask") and not hasattr(lm.head, "weight_mask")
    assert lm.head.weight is lm.emb.weight


def test_method_aliases_share_one_run_key():
    base = Protocol(model="fcn", dataset="mnist")
    keys = {config_hash(base.run_config(m, 4)) for m in ("lap", "LAP", "lap-base", "Lap-Base")}
    assert keys == {"5d04fff4ff7371ff"}  # the canonical name's key from before (commit 5f726e4)
    assert canonical_method("LAP-Forward-SEQ") == "lap-forward-seq"
    assert canonical_method("lap-base-seq") == "lap-seq"
    sweep = Sweep(base, ["fcn"], ["mnist"], ["lap", "LAP", "lap-base", "mp"], [4], [0])
    assert sweep.methods == ["lap", "mp"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('bn = "no"', "bn must be true or false"),
        ("compile = \"yes\"", "compile must be true or false"),
        ("levels = [2.7]", "'levels' must hold int"),
        ("levels = [true]", "'levels' must hold int"),
        ("levels = [[2]]", "'levels' must hold int"),
        ("seeds = [0.9]", "'seeds' must hold int"),
        ("methods = 5", "'methods' must hold str"),
        ("db = 5", "'db' must be a string"),
        ('subset = "5000"', "subset must be an integer"),
        ('activation = "gelu"', "activation must be one of"),
        ("batch_size = 0", "batch_size must be >= 1"),
        ('graph = "module"', "graph must be one of"),
        ('methods = ["lapp"]', "unknown"),
    ],
)
def test_toml_fields_are_checked_strictly_before_any_work(tmp_path, capsys, line, message):
    key = line.split(" =")[0]
    base = {"methods": '["mp"]', "levels": "[4]", "db": repr(str(tmp_path / "r.sqlite"))}
    base.pop(key, None)
    text = "\n".join([f"{k} = {v}" for k, v in base.items()] + [line])
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(text + "\n")
    assert main(["sweep", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.toml"]
