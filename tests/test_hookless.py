"""Hook-free masked training gives exactly what training through torch's pruning hooks gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from lookahead_prune.data import BatchStream
from lookahead_prune.hookless import HooklessMasks, apply_masks, mask_pairs
from lookahead_prune.train import TrainConfig, make_optimizer, train


def _pruned_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)]
    model = nn.Sequential(*layers)
    for i, layer in enumerate(m for m in model if isinstance(m, nn.Linear)):
        if i < 2:  # the last layer stays unpruned: a mix of both kinds
            torch_prune.random_unstructured(layer, "weight", amount=0.7)
    return model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(120, 8, generator=g), torch.randint(0, 3, (120,), generator=g)


def _train_through_hooks(model: nn.Module, x, y, config: TrainConfig) -> None:
    """The plain loop: the forward pre-hooks compute weight = weight_orig * mask each call."""
    stream = BatchStream(x, y, config.batch_size, seed=config.seed)
    opt = make_optimizer(
        list(model.parameters()), config
    )  # the trainer's own (fused) Adam, for bit equality
    pairs = mask_pairs(model)
    for _ in range(config.steps):
        xb, yb = next(stream)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        apply_masks(pairs)


def test_hookless_training_is_bit_identical_to_training_through_the_hooks():
    x, y = _data()
    config = TrainConfig(steps=40, lr=1e-2, batch_size=12, weight_decay=0.01)
    reference, ours = _pruned_mlp(), _pruned_mlp()
    _train_through_hooks(reference, x, y, config)
    train(ours, x, y, config)
    for (name, a), (_, b) in zip(
        reference.state_dict().items(), ours.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_hooks_come_back_with_the_mask_applied():
    model = _pruned_mlp()
    layer = model[0]
    hooks_before = list(layer._forward_pre_hooks)
    with HooklessMasks(model) as hookless:
        assert not any(
            isinstance(h, torch_prune.BasePruningMethod) for h in layer._forward_pre_hooks.values()
        )
        assert layer.weight is layer.weight_orig
        assert len(hookless.pairs) == 2
        with torch.no_grad():
            layer.weight_orig.add_(1.0)  # an update that hits masked entries too
    assert list(layer._forward_pre_hooks) == hooks_before
    assert torch.equal(layer.weight, layer.weight_orig * layer.weight_mask)
    assert "weight" not in dict(layer.named_parameters())


def test_hooks_come_back_after_an_error():
    model = _pruned_mlp()
    with pytest.raises(RuntimeError, match="boom"), HooklessMasks(model):
        raise RuntimeError("boom")
    assert any(
        isinstance(h, torch_prune.BasePruningMethod) for h in model[0]._forward_pre_hooks.values()
    )


def test_state_dict_inside_is_the_pruned_state_dict():
    model = _pruned_mlp()
    keys = list(model.state_dict())
    with HooklessMasks(model):
        assert list(model.state_dict()) == keys


def test_a_failing_train_call_puts_the_hooks_back():
    model = _pruned_mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = _data()
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, x, y, TrainConfig(steps=2, lr=1e-2, batch_size=12))
    layer = model[0]
    assert layer.weight is not layer.weight_orig
    assert any(
        isinstance(h, torch_prune.BasePruningMethod) for h in layer._forward_pre_hooks.values()
    )


def test_masked_entries_leave_no_optimiser_state_or_gradient():
    """Regrowing a mask mid-training meets zero moments, as training through the hooks does."""
    x, y = _data()
    config = TrainConfig(steps=20, lr=1e-2, batch_size=12, eval_every=10)

    def regrow(step: int, net: nn.Module) -> None:
        if step == 10:
            net[0].weight_mask.fill_(1.0)

    ours = _pruned_mlp()
    train(ours, x, y, config, callback=regrow)
    reference = _pruned_mlp()  # the same run through the hooks, by hand
    stream = BatchStream(x, y, config.batch_size, seed=config.seed)
    opt = make_optimizer(list(reference.parameters()), config)
    for step in range(1, config.steps + 1):
        xb, yb = next(stream)
        loss = F.cross_entropy(reference(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        apply_masks(mask_pairs(reference))
        regrow(step, reference)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key
    layer = ours[2]
    assert not layer.weight_orig.grad[layer.weight_mask == 0].any()
