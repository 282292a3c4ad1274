"""Sparse inference and compact files: ``to_sparse``, ``save_sparse``, ``load_sparse``, and
``lap export``. Every sparse format of the registry is checked against the masked layer."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import lookahead_prune as lp
from lookahead_prune.checkpoint import CheckpointError, save_checkpoint
from lookahead_prune.cli import main
from lookahead_prune.models import FCN, build_model
from lookahead_prune.sparse import CSR_CROSSOVER_CPU, SparseLinear
from tests.any_models import SmallCNN

LEVEL6 = {"fc1": 0.0163, "fc2": 0.0163, "fc3": 0.0163, "fc4": 0.0163, "fc5": 0.178}


def _pruned_fcn(keep=LEVEL6) -> nn.Module:
    model = build_model("fcn", seed=0)
    lp.prune(model, "mp", keep)
    return model


def _no_pruning_left(model: nn.Module) -> bool:
    hooks = [
        h
        for m in model.modules()
        for h in m._forward_pre_hooks.values()
        if isinstance(h, torch.nn.utils.prune.BasePruningMethod)
    ]
    return not hooks and not any(k.endswith(("_mask", "_orig")) for k in model.state_dict())


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        ya, yb = a(x), b(x)
    ya = getattr(ya, "logits", ya)
    yb = getattr(yb, "logits", yb)
    assert torch.allclose(ya, yb, atol=1e-5, rtol=1e-5), float((ya - yb).abs().max())


class TokenMLP(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.up = nn.Linear(12, hidden)
        self.down = nn.Linear(hidden, 12, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


# --------------------------------------------------------------------------- the registry


@pytest.mark.parametrize("name", list(lp.FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_format_computes_what_the_masked_layer_computes(name, dtype):
    fmt = lp.FORMATS[name]
    torch.manual_seed(0)
    layer = nn.Linear(20, 7).to(dtype)
    torch.nn.utils.prune.random_unstructured(layer, "weight", amount=0.8)
    assert fmt.supports(layer, torch.device("cpu"))
    cross = fmt.crossover((7, 20), 60, torch.device("cpu"))
    assert cross is None or 0.0 < cross <= 1.0
    weight = layer.weight.detach()
    for bias in (layer.bias.detach(), None):
        module = fmt.to_module(weight, layer.weight_mask.bool(), bias)
        for shape in ((5, 20), (20,), (2, 3, 20), (1, 20)):  # batches, one vector, tokens
            x = torch.randn(*shape, dtype=dtype)
            with torch.inference_mode():
                got = module(x)
            want = nn.functional.linear(x, weight, bias)
            assert got.shape == want.shape and got.dtype == dtype
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not fmt.supports(nn.Conv2d(3, 4, 3), torch.device("cpu"))


def test_the_crossover_table_grows_with_the_batch_and_stays_below_a_quarter():
    densities = [d for _, d in CSR_CROSSOVER_CPU]
    assert densities == sorted(densities) and max(densities) < 0.25
    csr = lp.FORMATS["csr"]
    cpu = torch.device("cpu")
    assert csr.crossover((500, 500), 1, cpu) == CSR_CROSSOVER_CPU[0][1]
    assert csr.crossover((500, 500), 1000, cpu) == CSR_CROSSOVER_CPU[-1][1]
    assert csr.crossover((500, 500), 60, torch.device("meta")) is None


# --------------------------------------------------------------------------- to_sparse


def test_to_sparse_fcn_equals_the_pruned_model_without_masks_or_hooks():
    model = _pruned_fcn()
    sparse = lp.to_sparse(model)
    formats = sparse.sparse_report.formats
    assert formats == {"fc1": "csr", "fc2": "csr", "fc3": "csr", "fc4": "csr", "fc5": "dense"}
    assert isinstance(sparse.fc1, SparseLinear) and isinstance(sparse.fc5, nn.Linear)
    assert "crossover" in str(sparse.sparse_report)
    assert _no_pruning_left(sparse) and not sparse.training
    assert hasattr(model.fc1, "weight_mask")  # the original is untouched
    _same(model, sparse, torch.randn(60, 1, 28, 28))
    _same(model, sparse, torch.randn(1, 1, 28, 28))
    assert sparse(torch.randn(3, 1, 28, 28)).shape == (3, 10)  # outside inference_mode too


def test_the_crossover_leaves_a_quarter_dense_and_max_density_overrides_it():
    model = _pruned_fcn(0.25)
    assert set(lp.to_sparse(model).sparse_report.formats.values()) == {"dense"}
    assert set(lp.to_sparse(model, max_density=1.0).sparse_report.formats.values()) == {"csr"}
    assert set(lp.to_sparse(model, max_density=0.0).sparse_report.formats.values()) == {"dense"}
    small = _pruned_fcn(0.1)  # pays at batch 60, not at batch 1
    assert set(lp.to_sparse(small, batch=1).sparse_report.formats.values()) == {"dense"}
    assert set(lp.to_sparse(small, batch=60).sparse_report.formats.values()) == {"csr"}
    calibrated = lp.to_sparse(small, batch=60, calibrate_layers=True)
    _same(small, calibrated, torch.randn(60, 1, 28, 28))


def test_to_sparse_token_wise_linear():
    torch.manual_seed(0)
    model = TokenMLP()
    lp.prune(model, "mp", 0.2)
    sparse = lp.to_sparse(model, max_density=0.5)
    assert isinstance(sparse.up, SparseLinear) and isinstance(sparse.down, SparseLinear)
    _same(model, sparse, torch.randn(2, 5, 12))


def test_convolutions_stay_dense_with_a_reason():
    torch.manual_seed(0)
    model = SmallCNN()
    lp.prune(model, "mp", 0.05)
    sparse = lp.to_sparse(model, max_density=1.0)
    rows = {r.name: r for r in sparse.sparse_report.rows}
    assert rows["c1"].format == "dense" and "convolution" in rows["c1"].reason
    assert rows["fc"].format == "csr"
    assert _no_pruning_left(sparse)
    _same(model, sparse, torch.randn(4, 3, 16, 16))


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_layers_become_sparse_and_round_trip(tmp_path):
    model = _gpt2()
    lp.prune(model, "mp", 0.1, exclude=["lm_head"])
    sparse = lp.to_sparse(model, max_density=0.5)
    h0 = sparse.transformer.h[0]
    assert all(isinstance(m, SparseLinear) for m in (h0.attn.c_attn, h0.mlp.c_fc, h0.mlp.c_proj))
    tokens = torch.arange(6).view(1, 6)
    _same(model, sparse, tokens)
    path = tmp_path / "gpt2.lap"
    lp.save_sparse(sparse, path)
    with pytest.raises(lp.SparseExportError, match="records no architecture"):
        lp.load_sparse(path)
    back = lp.load_sparse(path, model=_gpt2())
    assert isinstance(back.transformer.h[1].mlp.c_fc, SparseLinear)
    _same(model, back, tokens)


# --------------------------------------------------------------------------- files


def test_save_load_round_trip_fcn_and_the_file_is_small(tmp_path):
    model = _pruned_fcn()
    path = tmp_path / "fcn.lap"
    lp.save_sparse(model, path)
    dense = tmp_path / "dense.pt"
    torch.save(build_model("fcn").state_dict(), dense)
    assert os.path.getsize(path) <= 0.05 * os.path.getsize(dense)
    stored = torch.load(path, weights_only=True)
    assert "crow" in stored["layers"]["fc1"] and stored["layers"]["fc1"]["col"].dtype == torch.int16
    back = lp.load_sparse(path)  # the architecture is in the file
    assert back.sparse_report.formats == lp.to_sparse(model).sparse_report.formats
    x = torch.randn(60, 1, 28, 28)
    _same(model, back, x)
    masked = lp.load_sparse(path, masked=True)  # masks back, e.g. to retrain
    assert torch.equal(masked.fc2.weight_mask, model.fc2.weight_mask)
    _same(model, masked, x)
    again = tmp_path / "again.lap"
    lp.save_sparse(back, again)  # a to_sparse module saves the same way
    _same(model, lp.load_sparse(again), x)


def test_bitmask_where_smaller_and_dtype_kept(tmp_path):
    torch.manual_seed(0)
    model = TokenMLP(256).double()
    lp.prune(model, "mp", {"up": 0.6, "down": 0.02})
    path = tmp_path / "m.lap"
    lp.save_sparse(model, path)
    layers = torch.load(path, weights_only=True)["layers"]
    assert "bitmask" in layers["up"] and "crow" in layers["down"]
    assert layers["up"]["values"].dtype == torch.float64
    back = lp.load_sparse(path, model=TokenMLP(256))
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    _same(model, back, x)


# --------------------------------------------------------------------------- bad input


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_bad_input_gets_one_line_each(tmp_path):
    plain = build_model("fcn", seed=0)
    with pytest.raises(lp.SparseExportError, match="nothing to gain") as err:
        lp.to_sparse(plain)
    _one_line(err)
    with pytest.raises(lp.SparseExportError, match="nothing to gain"):
        lp.save_sparse(plain, tmp_path / "x.lap")
    with pytest.raises(lp.SparseExportError, match="max_density"):
        lp.to_sparse(_pruned_fcn(), max_density=2.0)

    not_export = tmp_path / "ckpt.pt"
    save_checkpoint(not_export, {"state": plain.state_dict()})
    with pytest.raises(lp.SparseExportError, match="not a sparse export") as err:
        lp.load_sparse(not_export)
    _one_line(err)

    path = tmp_path / "fcn.lap"
    lp.save_sparse(_pruned_fcn(), path)
    for wrong in (FCN(784, 10, hidden=(400, 500, 500, 500)), FCN(784, 10, hidden=(500,) * 3)):
        with pytest.raises(lp.SparseExportError, match="does not match") as err:
            lp.load_sparse(path, model=wrong)
        _one_line(err)
    with pytest.raises(lp.SparseExportError, match="does not match"):
        lp.load_sparse(path, model=SmallCNN())

    data = path.read_bytes()
    truncated = tmp_path / "truncated.lap"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt.lap"
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    corrupt.write_bytes(bytes(flipped))
    for bad in (truncated, corrupt):
        with pytest.raises(CheckpointError, match="not a readable checkpoint") as err:
            lp.load_sparse(bad)
        assert "lp.save_sparse" in _one_line(err)


# --------------------------------------------------------------------------- lap export


def _prune_out(tmp_path):
    """A checkpoint shaped like the one `lap prune --out` writes."""
    model = _pruned_fcn()
    path = tmp_path / "pruned.pt"
    state = {k: v.detach() for k, v in model.state_dict().items()}
    protocol = {"model": "fcn", "dataset": "mnist", "activation": "relu", "batch_size": 60}
    save_checkpoint(path, {"state": state, "protocol": protocol, "method": "mp", "keep": 0.02,
                           "test_acc": 0.9})  # fmt: skip
    return model, path


def test_lap_export_sparse_and_dense(tmp_path, capsys):
    model, ckpt = _prune_out(tmp_path)
    out = tmp_path / "fcn.lap"
    assert main(["export", str(ckpt), "--out", str(out), "--repeats", "2"]) == 0
    text = capsys.readouterr().out
    assert "size:" in text and "latency at batch 1 " in text and "latency at batch 60 " in text
    x = torch.randn(8, 1, 28, 28)
    _same(model, lp.load_sparse(out), x)

    dense = tmp_path / "dense.pt"
    assert main(["export", str(ckpt), "--out", str(dense), "--format", "dense",
                 "--repeats", "2"]) == 0  # fmt: skip
    plain = FCN(784, 10)
    plain.load_state_dict(torch.load(dense, weights_only=True))  # any PyTorch code
    _same(model, plain.eval(), x)

    assert main(["export", str(out), "--out", str(tmp_path / "again.lap")]) == 2
    assert "already an export" in capsys.readouterr().err


def test_everything_works_under_inference_mode(tmp_path):
    model = _pruned_fcn(0.02)
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        sparse = lp.to_sparse(model)
        lp.save_sparse(model, tmp_path / "m.lap")
        back = lp.load_sparse(tmp_path / "m.lap")
    assert isinstance(back.fc2, SparseLinear)
    _same(model, sparse, x)
    _same(model, back, x)
