"""Tests for lookahead_prune.data.batches: sampling, determinism, augmentation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from lookahead_prune.data import BatchStream, crop_flip, iterate_eval


def indexed(n: int, shape: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples whose every entry equals their index, and labels equal to the index."""
    y = torch.arange(n)
    x = y.to(torch.float32).reshape(n, *([1] * len(shape))).expand(n, *shape).contiguous()
    return x, y


def take(stream: BatchStream, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(itertools.islice(stream, count))


def test_same_seed_same_batches_other_seed_differs():
    x, y = indexed(50, (3, 4, 4))
    first = take(BatchStream(x, y, 8, seed=3, augment=True), 20)
    again = take(BatchStream(x, y, 8, seed=3, augment=True), 20)
    other = take(BatchStream(x, y, 8, seed=4, augment=True), 20)
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert any(not torch.equal(ya, yb) for (_, ya), (_, yb) in zip(first, other, strict=True))


def test_every_index_once_per_epoch_with_short_last_batch():
    x, y = indexed(10)
    stream = BatchStream(x, y, 3, seed=0, drop_last=False)
    assert stream.batches_per_epoch == 4
    epochs = []
    for _ in range(3):
        batches = take(stream, 4)
        assert [len(b) for _, b in batches] == [3, 3, 3, 1]
        order = torch.cat([b for _, b in batches])
        assert sorted(order.tolist()) == list(range(10))
        assert torch.equal(torch.cat([b for b, _ in batches]).long(), order)  # x matches y
        epochs.append(order.tolist())
    assert stream.epoch == 3
    assert len({tuple(e) for e in epochs}) == 3  # a fresh permutation each epoch


def test_drop_last_keeps_full_batches_without_repeats():
    x, y = indexed(10)
    stream = BatchStream(x, y, 4, seed=1)
    assert stream.batches_per_epoch == 2
    for _ in range(5):
        batches = take(stream, 2)
        assert all(len(b) == 4 for _, b in batches)
        seen = torch.cat([b for _, b in batches]).tolist()
        assert len(set(seen)) == 8
    exact = BatchStream(*indexed(12), 4, seed=1)
    assert sorted(torch.cat([b for _, b in take(exact, 3)]).tolist()) == list(range(12))


def test_sampling_order_does_not_depend_on_augmentation():
    x, y = indexed(40, (1, 6, 6))
    plain = take(BatchStream(x, y, 5, seed=7), 12)
    augmented = take(BatchStream(x, y, 5, seed=7, augment=True), 12)
    for (_, ya), (_, yb) in zip(plain, augmented, strict=True):
        assert torch.equal(ya, yb)


def reference_crop_flip(x, dy, dx, flip, pad):
    padded = F.pad(x, (pad, pad, pad, pad))
    out = []
    for b in range(x.shape[0]):
        img = padded[b, :, dy[b] : dy[b] + x.shape[2], dx[b] : dx[b] + x.shape[3]]
        out.append(img.flip(-1) if flip[b] else img)
    return torch.stack(out)


def test_crop_flip_matches_reference_loop():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 7, 9, generator=gen)
    dy = torch.randint(0, 9, (16,), generator=gen)
    dx = torch.randint(0, 9, (16,), generator=gen)
    flip = torch.rand(16, generator=gen) < 0.5
    assert torch.equal(crop_flip(x, dy, dx, flip, pad=4), reference_crop_flip(x, dy, dx, flip, 4))
    centre = torch.full((16,), 4)
    no_flip = torch.zeros(16, dtype=torch.bool)
    assert torch.equal(crop_flip(x, centre, centre, no_flip, pad=4), x)
    assert torch.equal(crop_flip(x, centre, centre, ~no_flip, pad=4), x.flip(-1))
    shifted = crop_flip(x, centre, centre + 4, no_flip, pad=4)  # view moved 4 px right
    assert torch.equal(shifted[..., :-4], x[..., 4:]) and (shifted[..., -4:] == 0).all()


def test_augmented_batches_are_crops_and_flips_of_their_sources():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 8, 8, generator=gen)
    y = torch.arange(64)
    stream = BatchStream(x, y, 16, seed=2, augment=True)
    flips = shifts = identical = 0
    for xb, yb in take(stream, 8):
        assert xb.shape == (16, 3, 8, 8) and xb.dtype == x.dtype
        for image, label in zip(xb, yb, strict=True):
            source = x[label]
            matches = [
                (dy, dx, f)
                for dy in range(9)
                for dx in range(9)
                for f in (False, True)
                if torch.equal(
                    image,
                    reference_crop_flip(source[None], [dy], [dx], [f], 4)[0],
                )
            ]
            assert matches, "augmented image is no crop/flip of its source"
            dy, dx, f = matches[0]
            flips += f
            shifts += (dy, dx) != (4, 4)
            identical += torch.equal(image, source)
    assert 30 < flips < 98  # about half of 128
    assert shifts > 100  # 80 of 81 offsets move the image
    assert identical < 10


def test_invalid_arguments_are_rejected():
    x, y = indexed(5, (1, 4, 4))
    with pytest.raises(ValueError, match="exceeds"):
        BatchStream(x, y, 6, seed=0)
    BatchStream(x, y, 6, seed=0, drop_last=False)  # fine: one short batch per epoch
    with pytest.raises(ValueError, match="examples"):
        BatchStream(x, y[:4], 2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(x, y, 0, seed=0)
    with pytest.raises(ValueError, match="augment"):
        BatchStream(torch.zeros(5, 16), y, 2, seed=0, augment=True)


def test_iterate_eval_is_ordered_and_complete():
    x, y = indexed(10, (2,))
    batches = list(iterate_eval(x, y, 4))
    assert [len(b) for _, b in batches] == [4, 4, 2]
    assert torch.cat([b for _, b in batches]).tolist() == list(range(10))
    assert torch.equal(torch.cat([b for b, _ in batches]), x)
    assert batches[0][0].data_ptr() == x.data_ptr()  # a view, not a copy


def test_stream_keeps_everything_on_the_data_device():
    # The meta device refuses to mix with CPU tensors, so it stands in for a GPU here.
    x = torch.zeros(10, 3, 8, 8, device="meta")
    y = torch.zeros(10, dtype=torch.long, device="meta")
    xb, yb = next(BatchStream(x, y, 4, seed=0, augment=True))
    assert xb.device.type == "meta" and yb.device.type == "meta"
    assert xb.shape == (4, 3, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stream_matches_cpu_stream():
    x, y = indexed(30, (3, 6, 6))
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    cpu = take(BatchStream(x, y, 7, seed=5, augment=True), 10)
    gpu = take(BatchStream(x.cuda(), y.cuda(), 7, seed=5, augment=True), 10)
    for (xa, ya), (xb, yb) in zip(cpu, gpu, strict=True):
        assert torch.equal(xa, xb.cpu()) and torch.equal(ya, yb.cpu())
