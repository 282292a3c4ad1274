"""Every engine of train_many leaves each model as a separate train() run does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

import lookahead_prune as lp
from lookahead_prune.engines import SPARSE_MAX_DENSITY, choose_engine, train_many
from lookahead_prune.mlp_chain import mlp_chain
from lookahead_prune.models import build_model
from lookahead_prune.models.mlp import FCN
from lookahead_prune.sparse_group import density, sparse_why_not
from lookahead_prune.train import TrainConfig, train

JOBS = [  # methods and keep fractions from 25% down to 0.1%
    ("mp", 0.25),
    ("lap", 0.1),
    ("lap-forward", 0.03),
    ("lap-backward-seq", 0.01),
    ("rp", 0.005),
    ("lap", 0.001),
    ("mp", 0.001),
]


def _data(n: int = 300, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=g, dtype=dtype)
    y = x.flatten(1)[:, :10].argmax(1)
    return x, y


def _build(name: str, hidden: tuple[int, ...] | None = None, **kwargs) -> nn.Module:
    """A registry model, or with ``hidden`` a small FCN, initialised from seed 0."""
    if hidden is None:
        return build_model(name, seed=0, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FCN(784, 10, hidden=hidden, **kwargs)


def _pruned(name: str, jobs, dtype=torch.float64, **kwargs) -> list[nn.Module]:
    models = []
    for method, keep in jobs:
        model = _build(name, **kwargs).to(dtype)
        lp.prune(model, method, keep, seed=0)
        models.append(model)
    return models


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


def _check_equal(name, jobs, config, tol, dtype=torch.float64, **kwargs):
    x, y = _data(dtype=dtype)
    reference, grouped = _pruned(name, jobs, dtype, **kwargs), _pruned(name, jobs, dtype, **kwargs)
    expected = [train(m, x, y, config) for m in reference]
    results = train_many(grouped, x, y, config, engine="sparse")
    assert [r.engine for r in results] == ["sparse"] * len(jobs)
    untouched = _pruned(name, jobs, dtype, **kwargs)
    for ref, ours, want, got, before in zip(
        reference, grouped, expected, results, untouched, strict=True
    ):
        assert _max_diff(ref, ours) < tol
        assert _max_diff(before, ours) > 100 * tol  # training did move the weights
        assert abs(want.final_loss - got.final_loss) < max(tol, 1e-6)  # a float32 mean
        for module in ours.modules():
            if torch_prune.is_pruned(module) and hasattr(module, "weight_mask"):
                masked = module.weight_mask == 0
                assert bool((module.weight_orig[masked] == 0).all())  # exactly zero
                assert bool((module.weight[masked] == 0).all())
                assert torch.equal(module.weight, module.weight_orig * module.weight_mask)


def test_sparse_group_of_relu_fcns_matches_separate_runs_float64():
    _check_equal("fcn", JOBS, TrainConfig(steps=5, lr=1.2e-3, seed=3), 1e-9, hidden=(100,) * 4)


def test_sparse_group_of_sigmoid_fcns_matches_separate_runs_float64():
    jobs = [("mp", 0.1), ("lap", 0.1), ("lap", 0.01)]
    config = TrainConfig(steps=5, lr=1.2e-3, seed=1)
    _check_equal("fcn", jobs, config, 1e-9, activation="sigmoid", hidden=(100,) * 4)


def test_sparse_group_of_linear_nets_matches_separate_runs_float64():
    jobs = [("mp", 0.2), ("lap", 0.05), ("lap", 0.002)]
    _check_equal("linear", jobs, TrainConfig(steps=5, lr=1.2e-3), 1e-9)


def test_sparse_group_matches_in_float32():
    """float32 to 1e-5 after 3 steps, with SGD.

    With Adam the first updates are lr * g / (|g| + 1e-8): where g is ~1e-8 (a sum of 60
    terms that cancel), float32 rounding moves the step by a sizeable part of lr, by an
    amount that depends on the CPU's kernels. Both trainers round and neither is wrong; the
    float64 tests above check Adam to 1e-9. SGD passes rounding through smoothly.
    """
    config = TrainConfig(steps=3, lr=0.05, optimizer="sgd", momentum=0.9)
    _check_equal("fcn", JOBS, config, 1e-5, dtype=torch.float32)


def test_sparse_group_follows_schedule_weight_decay_and_sgd():
    jobs = [("lap", 0.05), ("mp", 0.01)]
    adam = TrainConfig(steps=6, lr=1e-2, schedule="cosine", weight_decay=1e-3)
    _check_equal("fcn", jobs, adam, 1e-9, hidden=(100, 100))
    sgd = TrainConfig(steps=6, lr=1e-2, optimizer="sgd", momentum=0.9, schedule="step")
    _check_equal("fcn", jobs, sgd, 1e-9, hidden=(100, 100))


def test_a_layer_with_no_surviving_weight_trains():
    x, y = _data()
    models = _pruned("fcn", [("lap", 0.01), ("mp", 0.01)])
    reference = _pruned("fcn", [("lap", 0.01), ("mp", 0.01)])
    for m in (models[1], reference[1]):
        torch_prune.custom_from_mask(m.fc3, "weight", torch.zeros_like(m.fc3.weight))
    config = TrainConfig(steps=4, lr=1e-2)
    for m in reference:
        train(m, x, y, config)
    train_many(models, x, y, config, engine="sparse")
    for a, b in zip(reference, models, strict=True):
        assert _max_diff(a, b) < 1e-9
    assert bool((models[1].fc3.weight == 0).all())


def test_unpruned_and_partly_pruned_models_train_too():
    x, y = _data()
    plain = _build("fcn", hidden=(20, 20)).double()
    partly = _build("fcn", hidden=(20, 20)).double()
    lp.prune(partly, "lap", {"fc2": 0.1})
    copies = [_build("fcn", hidden=(20, 20)).double() for _ in range(2)]
    lp.prune(copies[1], "lap", {"fc2": 0.1})
    config = TrainConfig(steps=5, lr=1e-2)
    train(plain, x, y, config)
    train(partly, x, y, config)
    train_many(copies, x, y, config, engine="sparse")
    assert _max_diff(plain, copies[0]) < 1e-9
    assert _max_diff(partly, copies[1]) < 1e-9


def test_auto_mixes_engines_and_keeps_the_input_order():
    x, y = _data()
    jobs = [("lap", 0.5), ("lap", 0.01), ("mp", 0.9), ("mp", 0.01)]
    models = _pruned("fcn", jobs, hidden=(30, 30))
    names = choose_engine(models, x, TrainConfig(steps=2, lr=1e-3))
    expected = ["sparse" if density(m) <= SPARSE_MAX_DENSITY else "sequential" for m in models]
    assert names == expected == ["sequential", "sparse", "sequential", "sparse"]
    reference = _pruned("fcn", jobs, hidden=(30, 30))
    config = TrainConfig(steps=3, lr=1e-2)
    results = train_many(models, x, y, config)
    assert [r.engine for r in results] == names
    for ref, ours, result in zip(reference, models, results, strict=True):
        want = train(ref, x, y, config)
        assert _max_diff(ref, ours) < 1e-9
        assert abs(want.final_loss - result.final_loss) < 1e-6


def test_sequential_engine_is_train():
    x, y = _data()
    a, b = _pruned("fcn", [("lap", 0.3)] * 2, hidden=(16,))
    config = TrainConfig(steps=3, lr=1e-2)
    train(a, x, y, config)
    (result,) = train_many([b], x, y, config, engine="sequential")
    assert result.engine == "sequential" and _max_diff(a, b) == 0.0


class _Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 784), nn.Linear(784, 10)

    def forward(self, x):
        h = x.flatten(1)
        return self.fc2(F.relu(self.fc1(h)) + h)


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 12), nn.Linear(12, 10)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.view(x.shape[0], -1))))


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (build_model("conv6"), "Conv2d"),
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.Dropout(), nn.Linear(8, 10)), "Dropout"),
        (_Skip(), "branch or skip"),
        (
            nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.Softmax(1), nn.Linear(8, 10)),
            "Softmax",
        ),
        (nn.Sequential(nn.Linear(28, 10)), "first layer takes 28"),
    ],
)
def test_sparse_engine_refuses_what_it_cannot_train(model, reason):
    x, y = _data(60, torch.float32)
    config = TrainConfig(steps=1, lr=1e-3)
    assert reason in (sparse_why_not([model], x, config) or "")
    with pytest.raises(ValueError, match="sparse"):
        train_many([model], x, y, config, engine="sparse")
    assert choose_engine([model], x, config) == ["sequential"]


def test_sparse_engine_refuses_bf16_and_mixed_architectures():
    x, _ = _data(60, torch.float32)
    fcn = build_model("fcn")
    assert "precision" in sparse_why_not([fcn], x, TrainConfig(1, 1e-3, precision="bf16"))
    other = _build("fcn", hidden=(10,))
    assert "differ" in sparse_why_not([fcn, other], x, TrainConfig(1, 1e-3))
    with pytest.raises(ValueError, match="unknown engine"):
        train_many([fcn], x, x[:, 0, 0, 0].long(), TrainConfig(1, 1e-3), engine="fast")


def test_functional_activations_and_view_form_a_chain():
    steps = mlp_chain(_Functional())
    assert [s.kind for s in steps] == ["linear", "act", "linear"]
    x, y = _data()
    a, b = _Functional().double(), _Functional().double()
    b.load_state_dict(a.state_dict())
    lp.prune(a, "lap", 0.2)
    lp.prune(b, "lap", 0.2)
    config = TrainConfig(steps=3, lr=1e-2)
    train(a, x, y, config)
    train_many([b], x, y, config, engine="sparse")
    assert _max_diff(a, b) < 1e-9
