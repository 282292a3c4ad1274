"""Tests for lookahead_prune.train: convergence, determinism, snapshots, masks, evaluation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from lookahead_prune.train import (
    PAPER_STEPS,
    Metrics,
    TrainConfig,
    evaluate,
    lr_at,
    paper_lr,
    paper_steps,
    pick_device,
    train,
)


def blobs(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two well separated Gaussian clusters in 8 dimensions, labelled 0 and 1."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    centres = torch.tensor([[-2.0] * 8, [2.0] * 8])
    x = centres[y] + 0.5 * torch.randn(n, 8, generator=generator)
    return x, y


def mlp(seed: int = 0) -> nn.Sequential:
    """A small ReLU MLP, 8-32-32-2."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)
    )


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_loss_decreases_and_model_separates_blobs():
    x, y = blobs()
    model = mlp()
    before = evaluate(model, x, y)
    result = train(model, x, y, TrainConfig(steps=150, lr=1e-2, batch_size=20))
    after = evaluate(model, x, y)
    assert result.steps == 150 and result.wall_time > 0
    assert after.loss < 0.1 * before.loss
    assert after.accuracy == 1.0
    assert math.isclose(result.final_loss, after.loss, abs_tol=0.05)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_same_seed_bit_identical_other_seed_differs(optimizer: str):
    x, y = blobs()
    runs = {}
    for seed in (0, 0, 1):
        model = mlp()
        config = TrainConfig(steps=40, lr=1e-2, batch_size=16, optimizer=optimizer, seed=seed)
        train(model, x, y, config)
        runs.setdefault(seed, []).append(weights(model))
    first, again = runs[0]
    other = runs[1][0]
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)


def test_training_does_not_disturb_global_rng():
    x, y = blobs()
    model = mlp()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(model, x, y, TrainConfig(steps=5, lr=1e-3, batch_size=16))
    assert torch.equal(torch.rand(3), expected)


def test_snapshots_at_requested_steps():
    x, y = blobs()
    model = mlp()
    initial = weights(model)
    result = train(model, x, y, TrainConfig(steps=10, lr=1e-2, batch_size=16), checkpoints=[0, 3])
    assert sorted(result.snapshots) == [0, 3]
    assert all(torch.equal(result.snapshots[0][key], initial[key]) for key in initial)
    assert any(not torch.equal(result.snapshots[3][key], initial[key]) for key in initial)
    assert all(value.device.type == "cpu" for value in result.snapshots[3].values())

    replay = mlp()
    train(replay, x, y, TrainConfig(steps=3, lr=1e-2, batch_size=16))
    assert all(
        torch.equal(result.snapshots[3][key], value) for key, value in weights(replay).items()
    )
    final = weights(model)
    assert any(not torch.equal(result.snapshots[3][key], final[key]) for key in final)


def test_checkpoint_outside_run_is_rejected():
    x, y = blobs()
    with pytest.raises(ValueError, match=r"outside 0\.\.5"):
        train(mlp(), x, y, TrainConfig(steps=5, lr=1e-3), checkpoints=[6])


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(steps=60, lr=1e-2, batch_size=16),
        TrainConfig(steps=60, lr=5e-2, batch_size=16, optimizer="sgd", weight_decay=0.1),
        TrainConfig(steps=60, lr=1e-2, batch_size=16, weight_decay=0.1, schedule="cosine"),
    ],
    ids=["adam", "sgd-momentum-wd", "adam-wd-cosine"],
)
def test_pruned_weights_stay_exactly_zero(config: TrainConfig):
    x, y = blobs()
    model = mlp()
    layers = [module for module in model if isinstance(module, nn.Linear)]
    for layer in layers:
        torch_prune.random_unstructured(layer, "weight", amount=0.6)
    train(model, x, y, config)
    for layer in layers:
        pruned = layer.weight_mask == 0
        assert pruned.any()
        assert torch.equal(layer.weight[pruned], torch.zeros(int(pruned.sum())))
        assert torch.equal(layer.weight_orig[pruned], torch.zeros(int(pruned.sum())))
        assert (layer.weight[~pruned] != 0).all()


def test_callback_every_eval_every_steps_and_may_prune():
    x, y = blobs()
    model = mlp()
    calls = []

    def prune_at_10(step: int, net: nn.Module) -> None:
        calls.append((step, net.training))
        if step == 10:
            torch_prune.l1_unstructured(net[2], "weight", amount=0.5)

    train(
        model,
        x,
        y,
        TrainConfig(steps=25, lr=1e-2, batch_size=16, eval_every=5),
        callback=prune_at_10,
    )
    assert calls == [(5, True), (10, True), (15, True), (20, True), (25, True)]
    pruned = model[2].weight_mask == 0
    assert int(pruned.sum()) == 32 * 32 // 2
    assert torch.equal(model[2].weight_orig[pruned], torch.zeros(int(pruned.sum())))


def test_train_restores_module_modes():
    x, y = blobs()
    model = mlp().eval()
    seen = []
    train(
        model,
        x,
        y,
        TrainConfig(steps=2, lr=1e-3, batch_size=16, eval_every=1),
        callback=lambda step, net: seen.append(net.training),
    )
    assert seen == [True, True]
    assert not any(module.training for module in model.modules())


class FixedLogits(nn.Module):
    """Returns the logits stored for each input index, whatever the mode."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)
        self.modes: list[bool] = []

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.logits[index.long()]


def test_evaluate_hand_made_case_in_eval_mode():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.0]])
    model = FixedLogits(logits).train()
    x = torch.arange(4)
    y = torch.tensor([0, 1, 1, 1])  # right, right, wrong, a tie resolved to class 0: wrong
    metrics = evaluate(model, x, y, batch_size=3)
    expected = nn.functional.cross_entropy(logits, y).item()
    assert metrics == Metrics(loss=pytest.approx(expected), accuracy=0.5)
    assert model.modes == [False, False]
    assert model.training


def test_evaluate_uses_batch_norm_running_stats():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(50, 4), torch.randint(0, 2, (50,))
    running = model[1].running_mean.clone()
    first, second = evaluate(model, x, y, batch_size=7), evaluate(model, x, y, batch_size=50)
    assert torch.equal(model[1].running_mean, running)
    assert math.isclose(first.loss, second.loss, rel_tol=1e-5)
    assert model.training


def test_data_on_wrong_device_or_bad_labels_rejected():
    x, y = blobs()
    with pytest.raises(ValueError, match="int64"):
        evaluate(mlp(), x, y.float())
    with pytest.raises(ValueError, match="meta"):
        train(mlp(), x.to("meta"), y, TrainConfig(steps=1, lr=1e-3))


def test_constant_cosine_and_step_schedules():
    constant = TrainConfig(steps=100, lr=0.1)
    assert {lr_at(constant, step) for step in range(101)} == {0.1}
    cosine = TrainConfig(steps=100, lr=0.1, schedule="cosine")
    values = [lr_at(cosine, step) for step in range(101)]
    assert values[0] == 0.1 and values[-1] == pytest.approx(0.0, abs=1e-12)
    assert values[-2] < 1e-4 and values[50] == pytest.approx(0.05)
    assert all(a >= b for a, b in itertools.pairwise(values))
    stepped = TrainConfig(steps=100, lr=0.1, schedule="step")
    assert [lr_at(stepped, s) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_at(constant, -1)


def test_schedule_reaches_the_optimizer():
    x, y = blobs()
    # plain SGD on the same batches: a decaying rate must move the weights less
    model = mlp()
    start = weights(model)
    config = TrainConfig(steps=4, lr=1e-3, batch_size=16, optimizer="sgd", momentum=0.0)
    constant = mlp()
    train(constant, x, y, config)
    train(model, x, y, TrainConfig(**{**config.__dict__, "schedule": "cosine"}))
    moved = sum((model.state_dict()[k] - start[k]).abs().sum() for k in start)
    moved_constant = sum((constant.state_dict()[k] - start[k]).abs().sum() for k in start)
    assert 0 < moved < moved_constant


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": -1, "lr": 1e-3}, "steps must be"),
        ({"steps": 10, "lr": 0.0}, "lr must be"),
        ({"steps": 10, "lr": -1e-3}, "lr must be"),
        ({"steps": 10, "lr": math.nan}, "lr must be"),
        ({"steps": 10, "lr": 1e-3, "optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"steps": 10, "lr": 1e-3, "schedule": "linear"}, "unknown schedule 'linear'"),
        ({"steps": 10, "lr": 1e-3, "batch_size": 0}, "batch_size must be"),
        ({"steps": 10, "lr": 1e-3, "momentum": 1.0}, "momentum must"),
        ({"steps": 10, "lr": 1e-3, "weight_decay": -0.1}, "weight_decay must"),
        ({"steps": 10, "lr": 1e-3, "eval_every": -1}, "eval_every must"),
    ],
)
def test_bad_config_raises(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_zero_steps_leaves_weights_alone():
    x, y = blobs()
    model = mlp()
    start = weights(model)
    result = train(model, x, y, TrainConfig(steps=0, lr=1e-3), checkpoints=[0])
    assert result.steps == 0 and math.isnan(result.final_loss)
    assert all(torch.equal(value, start[key]) for key, value in model.state_dict().items())
    assert all(torch.equal(value, start[key]) for key, value in result.snapshots[0].items())


def test_paper_hyper_parameters():
    assert paper_lr("fcn") == 1.2e-3 and paper_lr("vgg16") == 3e-4 and paper_lr("mine") == 3e-4
    assert paper_steps("conv6") == (30_000, 20_000) and paper_steps("vgg19") == (60_000, 40_000)
    retrain = TrainConfig.paper("resnet18", "retrain", seed=3)
    assert (retrain.steps, retrain.lr, retrain.batch_size, retrain.seed) == (25_000, 3e-4, 60, 3)
    assert retrain.optimizer == "adam" and retrain.schedule == "constant"
    assert set(PAPER_STEPS) >= {"fcn", "conv6", "vgg11", "vgg16", "vgg19", "resnet18"}
    with pytest.raises(ValueError, match="no step counts"):
        paper_steps("mine")
    with pytest.raises(ValueError, match="unknown phase"):
        TrainConfig.paper("fcn", "finetune")


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == expected and pick_device("auto").type == expected
    with pytest.raises(ValueError, match="not a device"):
        pick_device("potato")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda:0")
