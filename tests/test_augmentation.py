"""CIFAR-style augmentation: on by default where the official code has it, black padding, keyed."""

from __future__ import annotations

import torch

from lookahead_prune.data import SOURCES
from lookahead_prune.data.batches import BatchStream, crop_flip
from lookahead_prune.pipeline import Protocol
from lookahead_prune.store import config_hash


def test_crop_pads_with_the_standardised_black_pixel():
    source = SOURCES["cifar10"]
    black = source.black
    pairs = zip(black, source.mean, source.std, strict=True)
    assert all(abs(b * s + m) < 1e-12 for b, m, s in pairs)  # black pixel: (0 - mean) / std
    x = torch.randn(2, 3, 5, 5)
    out = crop_flip(x, torch.tensor([0, 4]), torch.tensor([0, 4]), torch.tensor([False, True]),
                    pad=2, fill=black)  # fmt: skip
    for c in range(3):  # example 0 is shifted down-right: its first two rows are border
        assert torch.allclose(out[0, c, :2], torch.full((5,), black[c]))
        assert torch.allclose(out[1, c, -2:], torch.full((5,), black[c]))
    torch.testing.assert_close(out[0, :, 2:, 2:], x[0, :, :3, :3])
    same = crop_flip(x, torch.tensor([2, 2]), torch.tensor([2, 2]), torch.tensor([False, False]),
                     pad=2, fill=black)  # fmt: skip
    assert torch.equal(same, x)


def test_stream_with_fill_keeps_the_order_and_pads_black():
    x, y = torch.randn(12, 3, 4, 4), torch.arange(12)
    fill = (-5.0, -6.0, -7.0)
    plain = BatchStream(x, y, 4, seed=3)
    aug = BatchStream(x, y, 4, seed=3, augment=True, pad=4, fill=fill)
    border = 0
    for _ in range(6):
        (_, yp), (xa, ya) = next(plain), next(aug)
        assert torch.equal(yp, ya)  # augmentation never changes which examples come
        for c, v in enumerate(fill):
            border += int((xa[:, c] == v).sum())
    assert border > 0


def test_cifar_and_tiny_imagenet_augment_by_default_and_say_so_in_the_key():
    cifar = Protocol(model="conv6", dataset="cifar10")
    assert cifar.augment is True
    assert cifar.run_config("lap", 12)["augment"] is True
    assert cifar.dense_config()["augment"] is True
    config = cifar.train_config(10)
    assert config.augment and config.pad_value == SOURCES["cifar10"].black
    assert Protocol(model="vgg19-64", dataset="tiny-imagenet").augment is True
    off = Protocol(model="conv6", dataset="cifar10", augment=False)
    assert config_hash(off.run_config("lap", 12)) != config_hash(cifar.run_config("lap", 12))


def test_mnist_keys_are_unchanged_and_augmentation_can_be_asked_for():
    mnist = Protocol(model="fcn", dataset="mnist")
    assert mnist.augment is False and not mnist.train_config(10).augment
    assert "augment" not in mnist.run_config("lap", 4)
    assert "augment" not in mnist.dense_config()
    asked = Protocol(model="conv6", dataset="fashion-mnist", augment=True)
    assert asked.run_config("lap", 4)["augment"] is True
    assert asked.train_config(10).pad_value == SOURCES["fashion-mnist"].black


def test_sweep_takes_each_models_paper_steps_unless_given(tmp_path, capsys):
    from lookahead_prune.cli import build_parser
    from lookahead_prune.sweep import Sweep, protocol_lines

    template = Protocol(model="fcn", dataset="mnist", train_steps=7, retrain_steps=5)
    sweep = Sweep(template, ["fcn", "conv6"], ["fashion-mnist"], ["lap"], [2], [0],
                  paper_steps=frozenset({"train_steps"}))  # fmt: skip
    steps = {p.model: (p.train_steps, p.retrain_steps) for p in sweep.protocols()}
    assert steps == {"fcn": (50_000, 5), "conv6": (30_000, 5)}
    lines = protocol_lines(sweep)
    assert len(lines) == 2 and "train 30000 steps (the paper's), retrain 5 (finetune)" in lines[1]
    args = build_parser().parse_args(["sweep", "--model", "conv6", "--methods", "lap",
                                      "--levels", "2"])  # fmt: skip
    assert args.train_steps is None and args.retrain_steps is None
