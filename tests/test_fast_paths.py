"""The speed options of training: channels_last, bf16 autocast, torch.compile (GPU ones skipped)."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

import lookahead_prune as lp
from lookahead_prune.models import build_model
from lookahead_prune.train import TrainConfig, evaluate, train

CUDA = torch.cuda.is_available()


def _images(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _trained(config: TrainConfig, model_name: str = "conv6", device: str = "cpu") -> nn.Module:
    x, y = _images()
    model = build_model(model_name, seed=0)
    lp.prune(model, "lap", 0.3)
    model.to(device)
    train(model, x.to(device), y.to(device), config)
    return model


def _close(a: nn.Module, b: nn.Module, atol: float) -> bool:
    return all(
        torch.allclose(p.float().cpu(), q.float().cpu(), atol=atol)
        for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


BASE = TrainConfig(steps=4, lr=0.05, batch_size=16, optimizer="sgd")
"""SGD: its updates follow gradient error smoothly (Adam's sign-like steps amplify rounding)."""


def test_channels_last_trains_the_same_model():
    plain = _trained(BASE)
    nhwc = _trained(TrainConfig(**{**BASE.__dict__, "channels_last": True}))
    convs = [p for p in nhwc.parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert _close(plain, nhwc, atol=1e-5)
    for module in nhwc.modules():  # masks still hold
        if hasattr(module, "weight_mask"):
            assert torch.equal(module.weight_orig * module.weight_mask, module.weight_orig)


def test_bf16_autocast_updates_fp32_weights_like_fp32_training():
    sgd = TrainConfig(**{**BASE.__dict__, "steps": 1})  # one step: the gradient itself
    start = build_model("conv6", seed=0).state_dict()
    plain = _trained(sgd).state_dict()
    bf16 = _trained(TrainConfig(**{**sgd.__dict__, "precision": "bf16"})).state_dict()
    assert all(v.dtype == torch.float32 for k, v in bf16.items() if "mask" not in k)
    errors = {}
    for key, w0 in start.items():
        if "weight" not in key:
            continue
        if key.replace("weight", "weight_orig") in plain:  # pruned: the weight lives in _orig
            key = key.replace("weight", "weight_orig")
        d32, d16 = plain[key] - w0 * (plain[key] != 0), bf16[key] - w0 * (bf16[key] != 0)
        error = (d32 - d16).norm() / d32.norm()
        errors[key] = float(error)
    # bf16 really ran (every gradient differs) and stayed close; the error grows with the
    # depth backward, as rounding piles up (on random data: ~0.5% at the classifier, ~20% at
    # the first conv, whose gradient is a sum of many cancelling terms)
    assert all(0 < e < 0.35 for e in errors.values()), errors
    assert errors["classifier.4.weight_orig"] < 0.02, errors


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on CPU needs a C compiler")
def test_compiled_training_matches_eager_and_compiles_once_per_architecture():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(64, 12)
    y = torch.randint(0, 3, (64,))

    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
        lp.prune(model, "lap", 0.5)
        return model

    config = TrainConfig(steps=3, lr=1e-2, batch_size=16, optimizer="sgd")  # see BASE
    eager, compiled = net(0), net(0)
    train(eager, x, y, config)
    train(compiled, x, y, TrainConfig(**{**config.__dict__, "compile": True}))
    assert _close(eager, compiled, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    for seed in (1, 2):  # other pruned models of the same architecture: no new graph
        train(net(seed), x, y, TrainConfig(**{**config.__dict__, "compile": True}))
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["conv6", "vgg11", "resnet18"])
def test_gpu_fast_path_trains_each_conv_model(name):
    config = TrainConfig(steps=5, lr=1e-3, batch_size=16, precision="bf16", channels_last=True,
                         compile=True)  # fmt: skip
    model = _trained(config, name, device="cuda")
    x, y = _images(64, seed=1)
    metrics = evaluate(model, x.cuda(), y.cuda())
    assert torch.isfinite(torch.tensor(metrics.loss))
