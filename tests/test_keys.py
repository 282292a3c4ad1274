"""Golden keys: every stored run key and every dense-model key stays what it was.

A run's key is the hash of its configuration and a dense model's checkpoint is named by the
hash of its dense configuration; a refactor that changed either would silently recompute
(or, worse, mix) stored results. The literal hashes below were computed by the code before
the dense key was derived from the ``Protocol`` fields' metadata.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import fields
from pathlib import Path

import pytest

from lookahead_prune.pipeline import Protocol
from lookahead_prune.store import config_hash
from lookahead_prune.sweep import run_config

ROOT = Path(__file__).resolve().parents[1]

STORED = {  # database: (rows whose key the code computes, digest of their dense keys)
    "fmnist-gpu.sqlite": (28, "2aaf61a47d213fc6"),
    "fmnist.sqlite": (162, "538923616d56275c"),
    "mnist-full.sqlite": (600, "a115160a62e320e6"),
    "mnist-reduced.sqlite": (26, "ca718e20e870c615"),  # the other 234: older code's keys
    "mnist-full-extra.sqlite": (80, "d12d224e6ecd6866"),  # issue 19, part 4
    "mnist-rewinding.sqlite": (720, "821a6aba5fdfcc0d"),  # issue 19
}

CASES = [
    dict(model="fcn", dataset="mnist"),
    dict(model="fcn", dataset="mnist", seed=3, train_steps=50000, retrain_steps=50000),
    dict(model="conv6", dataset="fmnist", train_steps=30000, retrain_steps=20000,
         precision="bf16"),
    dict(model="fcn", dataset="mnist", lr=0.01, optimizer="sgd", schedule="cosine",
         weight_decay=5e-4),
    dict(model="fcn", dataset="mnist", subset=600, eval_examples=1000, batch_size=30),
    dict(model="fcn", dataset="mnist", activation="tanh", augment=True),
    dict(model="vgg11", dataset="cifar10"),
    dict(model="fcn", dataset="mnist", retrain="rewind-weights", train_steps=100,
         rewind_step=20, retrain_steps=80),
    dict(model="fcn", dataset="mnist", mode="iterative", scope="global", exclude=("fc1",),
         bn=False, score_examples=500, bn_recalibrate=0, nm="", graph="sequential", p=0.5,
         q=0.7, engine="sparse", compile=True, channels_last=True),
]  # fmt: skip
DENSE_KEYS = [
    "9d1e1ec8fbf0dc22",
    "28636b771cf1f3a6",
    "fba13a2c33a078fc",
    "6c09331e4a9cf264",
    "7fdcf0646271f936",
    "7128d791f51ae0f1",
    "e644e3161ef665ac",
    "06c48a04dba09842",
    "9d1e1ec8fbf0dc22",  # pruning, retraining and runtime fields do not touch the dense key
]
RUN_KEYS = [  # run_config("lap", 3)
    "a83ab135b2d86364",
    "fe6295743aa90c04",
    "3ef83404c61fa981",
    "069822fd2817bedb",
    "ce85ce5a613771d1",
    "acf0296132cf1685",
    "b0acdd27ba5a4e47",
    "5ba174302054e50c",
    "4ebd6fc8bd45241e",
]


@pytest.mark.parametrize("name", sorted(STORED))
def test_every_committed_database_keeps_its_run_and_dense_keys(name):
    names = {f.name for f in fields(Protocol)}
    with sqlite3.connect(f"file:{ROOT / 'results' / name}?mode=ro", uri=True) as conn:
        stored = [(k, json.loads(c)) for k, c in conn.execute("SELECT key, config FROM runs")]
    same, dense = 0, set()
    for key, config in stored:
        protocol = Protocol(**{k: v for k, v in config.items() if k in names})
        method, level = config["method"], config["level"]
        if "path" in config:  # iterative runs record the levels they went through
            run = run_config(protocol, method, level, config["path"])
        else:
            run = protocol.run_config(method, level)
        same += config_hash(run) == key
        dense.add(config_hash(protocol.dense_config()))
    digest = hashlib.sha256(",".join(sorted(dense)).encode()).hexdigest()[:16]
    assert (same, digest) == STORED[name]


def test_dense_and_run_keys_of_varied_protocols_are_the_golden_ones():
    protocols = [Protocol(**case) for case in CASES]
    assert [config_hash(p.dense_config()) for p in protocols] == DENSE_KEYS
    assert [config_hash(p.run_config("lap", 3)) for p in protocols] == RUN_KEYS


ALTERNATIVES = {  # every Protocol field: a valid value other than BASE's
    "model": "conv6",
    "dataset": "fashion-mnist",
    "seed": 1,
    "activation": "tanh",
    "train_steps": 200,
    "retrain_steps": 50,
    "lr": 0.01,
    "batch_size": 30,
    "optimizer": "sgd",
    "schedule": "cosine",
    "weight_decay": 1e-4,
    "retrain": "rewind-lr",
    "rewind_step": 10,
    "mode": "iterative",
    "p": 0.5,
    "q": 0.5,
    "bn": False,
    "graph": "sequential",
    "subset": 600,
    "scope": "global",
    "exclude": ["fc1"],
    "eval_examples": 1000,
    "precision": "bf16",
    "score_examples": 500,
    "augment": True,
    "bn_recalibrate": 2,
    "nm": "2:4",
    "channels_last": True,
    "compile": True,
    "engine": "sparse",
}
BASE = Protocol(model="fcn", dataset="mnist", train_steps=100, retrain_steps=100)
DATA_FIELDS = ("model", "dataset", "activation", "subset", "eval_examples")
"""Dense fields that reach dense training other than through its TrainConfig."""


def test_every_protocol_field_is_keyed_flagged_and_in_a_sweep_file(tmp_path):
    from dataclasses import replace

    from lookahead_prune.cli import build_parser
    from lookahead_prune.sweep import read_sweep_file

    flags = vars(build_parser().parse_args(["sweep"]))
    assert sorted(ALTERNATIVES) == sorted(f.name for f in fields(Protocol)), "add the new field"
    for f in fields(Protocol):
        meta, value = f.metadata, ALTERNATIVES[f.name]
        other = replace(BASE, **{f.name: tuple(value) if isinstance(value, list) else value})
        assert getattr(other, f.name) != getattr(BASE, f.name), f.name
        # in the run key, or runtime and in no key
        if meta.get("runtime"):
            assert other.run_config("mp", 1) == BASE.run_config("mp", 1), f.name
            assert f.name not in other.dense_config(), f.name
        else:
            assert f.name in other.run_config("mp", 1), f.name
        # in the dense key exactly when it changes dense training
        dense_changed = config_hash(other.dense_config()) != config_hash(BASE.dense_config())
        assert dense_changed == bool(meta.get("dense")), f.name
        trains_otherwise = other.train_config(other.train_steps) != BASE.train_config(100)
        if meta.get("dense"):
            assert trains_otherwise or f.name in DATA_FIELDS, f.name
        elif not meta.get("runtime"):
            assert not trains_otherwise, f"{f.name} changes dense training: declare it dense"
        # a flag of `lap sweep` and a key of a sweep file
        assert meta.get("dest", f.name) in flags, f.name
        toml = tmp_path / f"{f.name}.toml"
        toml.write_text(f'methods = ["mp"]\nlevels = [1]\n{f.name} = {json.dumps(value)}\n')
        assert f.name in read_sweep_file(str(toml)), f.name
