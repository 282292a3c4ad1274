"""The batched trainer gives what separate runs give, keeps masks, and refuses what it can't do."""

from __future__ import annotations

import math

import pytest
import torch

import lookahead_prune as lp
from lookahead_prune.batched import batchable, train_batched
from lookahead_prune.models import build_model
from lookahead_prune.train import TrainConfig, train


def _data(n: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = (x.flatten(1)[:, :10].argmax(1)).long()  # learnable labels
    return x, y


def _pruned_copies() -> list[torch.nn.Module]:
    models = []
    for method, keep in [("mp", 0.1), ("lap", 0.1), ("lap", 0.3), ("rp", 0.5)]:
        model = build_model("fcn", seed=0)
        lp.prune(model, method, keep)
        models.append(model)
    return models


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        (p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


@pytest.mark.parametrize("seeds", [None, [0, 1, 2, 0]])
def test_batched_equals_separate_runs(seeds):
    """In float64, and loosely for the few weights whose gradient is near Adam's eps.

    Adam's first steps are lr * g / (|g| + eps): for |g| ~ 1e-11 a tiny difference in g
    (vmap's batched kernels sum in another order) moves the step by a fraction of lr. In
    float32 that reached 4x lr on some CPUs; in float64 it stays below 1% of lr (the sparse
    engine agrees with train to 1e-9 everywhere, tests/test_engines.py)."""
    x, y = _data()
    x = x.double()
    config = TrainConfig(steps=25, lr=1.2e-3, seed=0)
    separate = [m.double() for m in _pruned_copies()]
    batched = [m.double() for m in _pruned_copies()]
    for i, model in enumerate(separate):
        seed = seeds[i] if seeds else 0
        train(model, x, y, TrainConfig(steps=25, lr=1.2e-3, seed=seed))
    results = train_batched(batched, x, y, config, seeds=seeds)
    assert len(results) == 4 and all(r.final_loss > 0 for r in results)
    for a, b in zip(separate, batched, strict=True):
        assert _max_diff(a, b) < 0.01 * config.lr  # same updates, other summation order
        assert torch.equal(b.fc1.weight_mask, a.fc1.weight_mask)
        assert bool((b.fc1.weight_orig[b.fc1.weight_mask == 0] == 0).all())
    untrained = _pruned_copies()[0].double()
    assert _max_diff(untrained, batched[0]) > 1e-3  # training did move the weights


def _bn_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(4),
        nn.Flatten(), nn.Linear(4 * 7 * 7, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10),
    )  # fmt: skip


def test_batched_trains_batchnorm_nets_as_separate_runs():
    """Batch norm's running statistics are per model (stacked buffers) and come back with the
    weights, so evaluation after vmap training sees each model's own statistics."""
    x, y = _data(240)
    x = x.double()
    config = TrainConfig(steps=6, lr=1e-3, seed=0)
    separate, batched = [], []
    for keep in (0.2, 0.5, 0.8):
        for out in (separate, batched):
            model = _bn_net(0).double()
            lp.prune(model, "lap", keep)
            out.append(model)
    for model in separate:
        train(model, x, y, config)
    assert batchable(batched)
    train_batched(batched, x, y, config)
    for a, b in zip(separate, batched, strict=True):
        assert _max_diff(a, b) < 0.01 * config.lr
        for (name, ba), bb in zip(a.named_buffers(), b.buffers(), strict=True):
            assert torch.allclose(ba.double(), bb.double(), atol=1e-9), name
        assert int(b[1].num_batches_tracked) == config.steps
        a.eval(), b.eval()
        assert torch.allclose(a(x[:50]), b(x[:50]), atol=1e-8)
    assert not torch.equal(batched[0][1].running_mean, batched[2][1].running_mean)


def _vgg_like_bn_net() -> torch.nn.Module:
    """A narrow VGG-11 on 28x28 (conv-bn-relu, pools, a 1x1 tail): the VGG-11 of the device
    check, cheap enough for the CPU."""
    from lookahead_prune.models.features import build_features

    torch.manual_seed(0)
    features, channels, _ = build_features(
        (8, "M", 16, "M", 16, 16, "M", 16, 16, "M", 16, 16, "M"),
        in_channels=1, image_size=28, batch_norm=True, activation="relu",
    )  # fmt: skip
    return torch.nn.Sequential(features, torch.nn.Flatten(), torch.nn.Linear(channels, 10))


def test_batched_batchnorm_sgd_matches_train_to_float64_precision():
    """The engine's arithmetic is train()'s: in float64 under SGD (an update linear in the
    gradient) the two agree to ~1e-15 after 12 steps at batch 60, running statistics and eval
    logits included. (The loss used to be taken in float32 whatever the model's dtype, which
    left 1e-9 after one step here.) Float32 runs of this net part by ~1e-1 within 20 steps, as
    much as train() against train() from weights nudged by 1e-7: that is the net's chaos
    (benchmarks/RESULTS.md), which is why the exact check lives in float64."""
    x, y = _data(600)
    x = x.double()
    config = TrainConfig(steps=12, lr=0.05, optimizer="sgd", batch_size=60, seed=0)
    separate, batched = [], []
    for method, keep in [("mp", 0.1), ("lap", 0.1)]:
        for out in (separate, batched):
            model = _vgg_like_bn_net().double()
            lp.prune(model, method, keep)
            out.append(model)
    for model in separate:
        train(model, x, y, config)
    train_batched(batched, x, y, config)
    for a, b in zip(separate, batched, strict=True):
        assert _max_diff(a, b) < 1e-12
        for (name, ba), bb in zip(a.named_buffers(), b.buffers(), strict=True):
            assert (ba.double() - bb.double()).abs().max().item() < 1e-12, name
        a.eval(), b.eval()
        la, lb = a(x[:100]), b(x[:100])
        assert (la - lb).abs().max().item() < 1e-12 * la.abs().max().item()
    untrained = _vgg_like_bn_net().double()
    lp.prune(untrained, "mp", 0.1)
    assert _max_diff(separate[0], untrained) > 1e-3  # it did train


class _AutocastOutput(torch.nn.Module):
    """What a conv under vmap hands on inside bf16 autocast on CUDA: the autocast dtype. (On
    the CPU vmap's batched convs and Linears reach autocast as ops it leaves in float32.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on = torch.is_autocast_enabled(x.device.type)
        return x.to(torch.get_autocast_dtype(x.device.type)) if on else x


def _bf16_bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 32), _AutocastOutput(), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 10),
    )  # fmt: skip


def test_batched_bf16_batch_norm_takes_a_bf16_input():
    """In bf16 autocast batch norm gets a bf16 input next to its float32 running statistics.
    train()'s kernels take the mix; under vmap it failed (the H200: 'Expected running_mean to
    have type BFloat16 but got Float'; the CPU: 'expected scalar type BFloat16 but found
    Float'). The engine normalises the upcast input in float32, as the mixed kernels do, and
    hands on bf16: bf16 training that keeps close to train()'s."""
    x, y = _data(240)
    sgd = {"steps": 3, "lr": 0.05, "optimizer": "sgd", "batch_size": 60}
    runs = {}
    for name, precision in [("train", "bf16"), ("vmap", "bf16"), ("vmap_fp32", "fp32")]:
        models = []
        for keep in (0.3, 0.6):
            model = _bf16_bn_net()
            lp.prune(model, "mp", keep)
            models.append(model)
        config = TrainConfig(**sgd, precision=precision)
        if name == "train":
            for model in models:
                train(model, x, y, config)
        else:
            train_batched(models, x, y, config)
        runs[name] = models
    for model in runs["vmap"]:
        assert all("forward" not in vars(m) for m in model.modules())  # the class's again
        assert {b.dtype for b in model.buffers()} <= {torch.float32, torch.int64}
    for a, b, c in zip(runs["train"], runs["vmap"], runs["vmap_fp32"], strict=True):
        assert _max_diff(a, b) < _max_diff(b, c)  # bf16 training as train()'s, not fp32
        a.eval(), b.eval()
        assert torch.allclose(a(x[:50]), b(x[:50]), atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_bf16_trains_conv_batchnorm_nets_on_cuda():
    x, y = _data(240)
    models = []
    for keep in (0.1, 0.3):
        model = _vgg_like_bn_net()
        lp.prune(model, "mp", keep)
        models.append(model.cuda())
    config = TrainConfig(steps=3, lr=0.05, optimizer="sgd", batch_size=60, precision="bf16")
    results = train_batched(models, x.cuda(), y.cuda(), config)
    assert all(math.isfinite(r.final_loss) for r in results)


def test_batched_refuses_dropout_and_mismatched_models():
    x, y = _data(120)
    dropout = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(), torch.nn.Linear(784, 10))
               for _ in range(2)]  # fmt: skip
    assert not batchable(dropout)
    with pytest.raises(ValueError, match="Dropout"):
        train_batched(dropout, x, y, TrainConfig(steps=1, lr=1e-3))
    mixed = [build_model("fcn"), build_model("linear")]
    assert not batchable(mixed)
    with pytest.raises(ValueError, match="one architecture"):
        train_batched(mixed, x, y, TrainConfig(steps=1, lr=1e-3))
    with pytest.raises(ValueError, match="seeds"):
        train_batched(_pruned_copies(), x, y, TrainConfig(steps=1, lr=1e-3), seeds=[0])


def test_batched_bf16_autocasts_like_train():
    x, y = _data()
    sgd = {"steps": 3, "lr": 0.05, "optimizer": "sgd", "precision": "bf16"}
    separate, batched, fp32 = _pruned_copies(), _pruned_copies(), _pruned_copies()
    for model in separate:
        train(model, x, y, TrainConfig(**sgd))
    train_batched(batched, x, y, TrainConfig(**sgd))
    train_batched(fp32, x, y, TrainConfig(**(sgd | {"precision": "fp32"})))
    for a, b, c in zip(separate, batched, fp32, strict=True):
        # batched bf16 is train()'s bf16 (up to summation order), not fp32
        assert _max_diff(a, b) < _max_diff(b, c)


def test_batched_takes_gpu_flags_it_does_not_apply():
    """channels_last and compile are runtime choices the vmap loop ignores (the stacked weights
    have a model dimension); a sweep that asks for them with engine vmap still trains alike."""
    x, y = _data(120)
    plain, flagged = _pruned_copies()[:2], _pruned_copies()[:2]
    train_batched(plain, x, y, TrainConfig(steps=2, lr=1e-3))
    config = TrainConfig(steps=2, lr=1e-3, channels_last=True, compile=True)
    train_batched(flagged, x.contiguous(memory_format=torch.channels_last), y, config)
    for a, b in zip(plain, flagged, strict=True):
        assert _max_diff(a, b) < 1e-6
