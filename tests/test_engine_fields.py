"""Per TrainConfig field: every engine trains as train() does, or refuses in why_not.

Every engine builds its optimiser and sets its learning rate through
:func:`~lookahead_prune.train.make_optimizer` and :func:`~lookahead_prune.train.set_lr`; this
test proves, field by field, that the sequential, vmap and sparse engines then give the same
weights (float64, small pruned FCNs) or that the engine's ``why_not`` refuses the setting. A
new TrainConfig field fails :func:`test_every_field_is_covered` until it gets a case here.

The sparse engine agrees with train() to 1e-9. vmap's batched kernels sum in another order,
and Adam's first steps (lr * g / (|g| + eps)) magnify that where |g| is tiny, so it agrees
to 1% of the learning rate, as tests/test_batched.py measures it (here ~2e-4 of lr).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import lookahead_prune as lp
from lookahead_prune.engines import ENGINES, train_many
from lookahead_prune.models.mlp import FCN
from lookahead_prune.train import TrainConfig, train

BASE = {"steps": 6, "lr": 1e-2}
TOLERANCE = {"sparse": lambda lr: 1e-9, "vmap": lambda lr: 0.01 * lr}
CASES: dict[str, tuple[dict, dict]] = {  # name -> (TrainConfig overrides, FCN kwargs)
    "adam": ({}, {}),
    "weight_decay": ({"weight_decay": 1e-2}, {}),
    "sgd": ({"optimizer": "sgd", "lr": 0.05}, {}),
    "momentum": ({"optimizer": "sgd", "lr": 0.05, "momentum": 0.5}, {}),
    "cosine": ({"schedule": "cosine"}, {}),
    "step": ({"schedule": "step"}, {}),
    "schedule_window": ({"schedule": "cosine", "schedule_start": 3, "schedule_steps": 12}, {}),
    "batch_size": ({"batch_size": 17}, {}),
    "seed": ({"seed": 7}, {}),
    "augment": ({"augment": True, "pad_value": (0.0,)}, {}),
    "eval_every": ({"eval_every": 2}, {}),  # train_many takes no callback: nothing to call
    "channels_last": ({"channels_last": True}, {}),  # how it runs: results stay the same
    "tanh": ({}, {"activation": "tanh"}),
    "sigmoid": ({}, {"activation": "sigmoid"}),
}
FIELDS_IN = {  # which TrainConfig fields each case sets (steps and lr: every case)
    "adam": {"steps", "lr", "optimizer"},
    "weight_decay": {"weight_decay"},
    "sgd": {"optimizer"},
    "momentum": {"momentum"},
    "cosine": {"schedule"},
    "step": {"schedule"},
    "schedule_window": {"schedule_start", "schedule_steps"},
    "batch_size": {"batch_size"},
    "seed": {"seed"},
    "augment": {"augment", "pad_value"},
    "eval_every": {"eval_every"},
    "channels_last": {"channels_last"},
}
ELSEWHERE = {
    "precision": "bf16: the sparse engine refuses it (below); vmap against train() in "
    "tests/test_batched.py::test_batched_bf16_autocasts_like_train (float32: autocast "
    "leaves float64 alone, so this file cannot test it)",
    "compile": "how it runs, not what it computes; vmap takes it and trains alike "
    "(tests/test_batched.py::test_batched_takes_gpu_flags_it_does_not_apply); torch.compile "
    "is too slow for this file",
}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, 28, 28, generator=g, dtype=torch.float64)
    return x, x.flatten(1)[:, :10].argmax(1)


def _models(fcn: dict) -> list[nn.Module]:
    out = []
    for method, keep in (("lap", 0.2), ("mp", 0.05)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = FCN(784, 10, hidden=(24, 24), **fcn).double()
        lp.prune(model, method, keep)
        out.append(model)
    return out


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def test_every_field_is_covered():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    covered = set().union(*FIELDS_IN.values())
    assert covered | set(ELSEWHERE) == fields, "give a new TrainConfig field a case here"


@pytest.mark.parametrize("engine", [name for name in ENGINES if name != "sequential"])
@pytest.mark.parametrize("case", list(CASES))
def test_engine_trains_as_train_or_refuses(case, engine):
    overrides, fcn = CASES[case]
    config = TrainConfig(**(BASE | overrides))
    x, y = _data()
    reference, ours = _models(fcn), _models(fcn)
    reason = ENGINES[engine].why_not(ours, x, config)
    if reason is not None:  # a refusal names why, and train_many refuses the same way
        with pytest.raises(ValueError, match="cannot train"):
            train_many(ours, x, y, config, engine=engine)
        pytest.skip(f"{engine} refuses {case}: {reason}")
    for model in reference:
        train(model, x, y, config)
    results = train_many(ours, x, y, config, engine=engine)
    assert [r.engine for r in results] == [engine] * len(ours)
    before = _models(fcn)
    for ref, got, untouched in zip(reference, ours, before, strict=True):
        assert _max_diff(ref, got) < TOLERANCE[engine](config.lr)
        assert _max_diff(untouched, got) > 0.1 * config.lr  # training moved the weights


def test_the_sparse_engine_refuses_bf16():
    x, _ = _data()
    config = TrainConfig(**BASE, precision="bf16")
    assert "precision" in (ENGINES["sparse"].why_not(_models({}), x, config) or "")
