"""Data-dependent scores: OBD against a brute-force Hessian, LAP-act against a hand count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lookahead_prune as lp
from lookahead_prune.prune import MethodSpec, canonical_method, parse_method


def _net(act: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), act(), nn.Linear(5, 5), act(), nn.Linear(5, 3)).double()


def _data(n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


WEIGHTS = ["0", "2", "4"]


def _flat_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names=WEIGHTS):
    """Mean cross-entropy as a function of the named layers' weights, flattened into one vector."""
    shapes = {n: model.get_submodule(n).weight.shape for n in names}
    params = dict(model.named_parameters())

    def loss(flat: torch.Tensor) -> torch.Tensor:
        weights = {f"{n}.weight": w for n, w in _split(flat, shapes).items()}
        return F.cross_entropy(functional_call(model, params | weights, (x,)), y)

    flat = torch.cat([params[f"{n}.weight"].detach().flatten() for n in names])
    return loss, flat, shapes


def _exact_hessian_diagonal(model, x, y, names=WEIGHTS) -> dict[str, torch.Tensor]:
    """The Hessian diagonal of the mean cross-entropy by brute force (the full Hessian)."""
    loss, flat, shapes = _flat_loss(model, x, y, names)
    return _split(torch.autograd.functional.hessian(loss, flat).diagonal(), shapes)


def _split(vec: torch.Tensor, shapes) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for n, shape in shapes.items():
        out[n] = vec[start : start + shape.numel()].view(shape)
        start += shape.numel()
    return out


def test_obd_is_half_the_exact_hessian_diagonal_times_w_squared_on_a_relu_net():
    model, (x, y) = _net(), _data()
    exact = _exact_hessian_diagonal(model, x, y)
    scores = lp.compute_scores(model, "obd", data=(x, y))
    for n in WEIGHTS:
        w = model.get_submodule(n).weight.detach()
        torch.testing.assert_close(scores[n], exact[n] * w.square() / 2, rtol=1e-9, atol=1e-12)
    assert all(bool((s >= 0).all()) for s in scores.values())


def test_obd_on_curved_activations_is_the_gauss_newton_diagonal():
    model, (x, y) = _net(nn.Tanh, seed=2), _data(seed=3)
    _, flat, shapes = _flat_loss(model, x, y)
    params = dict(model.named_parameters())

    def logits(v: torch.Tensor) -> torch.Tensor:
        return functional_call(
            model, params | {f"{n}.weight": w for n, w in _split(v, shapes).items()}, (x,)
        )

    jac = torch.autograd.functional.jacobian(logits, flat)  # [N, C, P]
    p = logits(flat).detach().softmax(-1)
    h_out = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # softmax CE Hessian per example
    ggn = torch.einsum("ncp,ncd,ndp->p", jac, h_out, jac) / len(x)
    expected = _split(ggn, shapes)
    scores = lp.compute_scores(model, "obd", data=x)  # labels are not needed
    for n in WEIGHTS:
        w = model.get_submodule(n).weight.detach()
        torch.testing.assert_close(scores[n], expected[n] * w.square() / 2, rtol=1e-9, atol=1e-12)


def test_obd_prunes_exact_counts_and_gives_pruned_weights_zero():
    model, (x, y) = _net(seed=4), _data()
    lp.prune(model, "mp", 0.5)
    scores = lp.compute_scores(model, "obd", data=(x, y))
    for n in WEIGHTS:
        assert bool((scores[n][model.get_submodule(n).weight_mask == 0] == 0).all())
    report = lp.prune(model, "obd", 0.2, data=(x, y))
    for r in report.layers:
        assert r.kept == round(0.2 * r.total)


def _hand_lap(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Eq. 5 on a chain of Linear layers, with the sums written out."""
    out = {}
    for i, n in enumerate(WEIGHTS):
        w = weights[n]
        prev = weights[WEIGHTS[i - 1]].square().sum(1) if i > 0 else torch.ones(w.shape[1])
        nxt = (
            weights[WEIGHTS[i + 1]].square().sum(0)
            if i + 1 < len(WEIGHTS)
            else torch.ones(w.shape[0])
        )
        out[n] = w.abs() * prev.sqrt().view(1, -1) * nxt.sqrt().view(-1, 1)
    return out


def test_lap_act_is_lap_on_rows_scaled_by_sqrt_activation_rate():
    model, (x, _) = _net(seed=5), _data(n=50)
    with torch.no_grad():
        model[0].bias.add_(torch.tensor([-3.0, 0.0, 3.0, 0.5, -0.5], dtype=torch.float64))
        h1 = model[1](model[0](x))
        h2 = model[3](model[2](h1))
    rates = {"0": (h1 > 0).double().mean(0), "2": (h2 > 0).double().mean(0)}
    assert rates["0"][0] < 0.1 and rates["0"][2] > 0.9  # the biases made unequal rates
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in WEIGHTS}
    scaled = dict(weights)
    for n, r in rates.items():
        scaled[n] = weights[n] * r.sqrt().view(-1, 1)  # the classifier "4" keeps scale 1
    expected = _hand_lap(scaled)
    scores = lp.compute_scores(model, "lap-act", data=x)
    for n in WEIGHTS:
        torch.testing.assert_close(scores[n], expected[n], rtol=1e-12, atol=1e-15)
    assert not torch.allclose(scores["2"], lp.compute_scores(model, "lap")["2"])


def test_lap_act_on_conv_batchnorm_averages_sqrt_rates_over_positions():
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2)
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    model.eval()
    x = torch.randn(30, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        active = model[2](model[1](model[0](x))) > 0  # [N, C, H, W]
    scale = active.double().mean(0).sqrt().mean((1, 2))
    model.train()
    scores = lp.compute_scores(model, "lap-act", data=x, example_inputs=(x[:1],))
    plain = lp.compute_scores(model, "lap", example_inputs=(x[:1],))
    assert model.training and model[1].training  # modes are restored
    torch.testing.assert_close(scores["0"], plain["0"] * scale.view(-1, 1, 1, 1))
    ratio = scores["4"] / plain["4"]  # the next layer reads scaled rows: col c*16+p gets scale[c]
    torch.testing.assert_close(ratio, scale.repeat_interleave(16).expand_as(ratio))


def test_data_scores_parse_with_orders_and_steps_and_run_globally():
    assert parse_method("lap-act-forward-seq") == MethodSpec("lap-act", "forward", 5)
    assert canonical_method("LAP-ACT") == "lap-act"
    model, (x, y) = _net(seed=7), _data()
    report = lp.prune(model, "lap-act-backward-seq", 0.3, data=x)
    assert [r.kept for r in report.layers] == [round(0.3 * r.total) for r in report.layers]
    for method in ("obd", "lap-act"):
        m = _net(seed=8)
        report = lp.prune(m, method, 0.25, scope="global", data=(x, y))
        assert report.kept == round(0.25 * report.total)


@pytest.mark.parametrize("method", ["obd", "lap-act"])
def test_data_scores_without_data_say_so(method):
    model = _net()
    with pytest.raises(ValueError, match=r"pass data=\(x, y\)"):
        lp.prune(model, method, 0.5)
    assert not hasattr(model[0], "weight_mask")
    with pytest.raises(ValueError, match="batch of inputs"):
        lp.compute_scores(model, method, data=(torch.zeros(0, 4), torch.zeros(0)))


def test_lap_act_on_an_untraceable_model_is_one_line():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return self.b(torch.relu(self.a(x)))

    with pytest.raises(ValueError) as err:
        lp.compute_scores(Branchy(), "lap-act", data=torch.randn(5, 4), graph="sequential")
    assert "\n" not in str(err.value) and "torch.fx" in str(err.value)


def test_obd_on_a_conv_net_matches_the_exact_hessian_diagonal():
    """Conv layers take the per-example (torch.func) route, Linear ones the per-class one."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).double()
    x = torch.randn(12, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    names = ["0", "3"]
    exact = _exact_hessian_diagonal(model, x, y, names)
    scores = lp.compute_scores(model, "obd", data=(x, y))
    for n in names:
        w = model.get_submodule(n).weight.detach()
        torch.testing.assert_close(scores[n], exact[n] * w.square() / 2, rtol=1e-9, atol=1e-12)


def test_sweep_runs_data_scores_and_keys_the_examples_only_off_default(tmp_path, capsys):
    from lookahead_prune.cli import main
    from lookahead_prune.pipeline import Protocol
    from lookahead_prune.store import RunStore

    db = tmp_path / "r.sqlite"
    args = ["sweep", "--model", "fcn", "--dataset", "mnist", "--methods", "obd,lap-act",
            "--levels", "3", "--seeds", "0", "--train-steps", "20", "--retrain-steps", "5",
            "--subset", "300", "--score-examples", "200", "--scope", "global",
            "--db", str(db), "--quiet"]  # fmt: skip
    assert main(args) == 0
    with RunStore(db, read_only=True) as store:
        rows = store.runs()
    assert sorted(r["method"] for r in rows) == ["lap-act", "obd"]
    assert all(r["score_examples"] == 200 for r in rows)
    assert all(0.0 < r["keep"] < 1.0 for r in rows)
    default = Protocol(model="fcn", dataset="mnist").run_config("obd", 3)
    assert "score_examples" not in default  # keys stored before the field are unchanged


class _TokenNet(nn.Module):
    """A token-wise Linear, a mean over tokens, a classifier: per-example route for obd."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.tok(x)).mean(1))


def test_obd_and_lap_act_on_token_wise_linear_layers():
    torch.manual_seed(10)
    model = _TokenNet().double()
    x = torch.randn(9, 5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (9,))
    exact = _exact_hessian_diagonal(model, x, y, ("tok", "head"))
    scores = lp.compute_scores(model, "obd", data=(x, y))
    for n in exact:
        w = model.get_submodule(n).weight.detach()
        torch.testing.assert_close(scores[n], exact[n] * w.square() / 2, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        rate = (model.tok(x) > 0).double().mean(0).sqrt().mean(0)  # per unit, averaged over tokens
    act = lp.compute_scores(model, "lap-act", data=x, example_inputs=(x[:1],))
    plain = lp.compute_scores(model, "lap", example_inputs=(x[:1],))
    # a 2-D guess makes mean(1) reduce the units under fx; export's next guess (tokens) fits
    guessed = lp.compute_scores(model, "lap")
    assert all(torch.equal(guessed[n], plain[n]) for n in plain)
    torch.testing.assert_close(act["tok"], plain["tok"] * rate.view(-1, 1))


@pytest.mark.parametrize("method", ["obd", "lap-act"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_data_scores_refuse_non_finite_data_before_touching_the_model(method, bad):
    model = _net()
    x, y = _data()
    x[7, 2] = bad
    with pytest.raises(ValueError, match=r"holds 1 NaN or infinite value\(s\) among 160"):
        lp.prune(model, method, 0.5, data=(x, y))
    assert not hasattr(model[0], "weight_mask")


@pytest.mark.parametrize("method", ["obd", "lap-act"])
def test_data_of_the_wrong_width_names_the_layer_and_what_it_expects(method):
    x, y = _data()
    with pytest.raises(ValueError) as err:
        lp.compute_scores(_net(), method, data=(torch.cat([x, x], 1), y))
    message = str(err.value)
    assert "\n" not in message
    assert "shape (40, 8)" in message and "layer '0' (Linear) expects 4 input features" in message
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    images = torch.randn(6, 1, 4, 4)  # one channel where the model takes three
    with pytest.raises(ValueError, match=r"layer '0' \(Conv2d\) expects 3 input channels"):
        lp.compute_scores(conv, method, data=(images, torch.zeros(6, dtype=torch.long)))


def test_obd_labels_must_be_class_indices_of_the_model():
    x, y = _data()  # the model has 3 classes
    for labels, match in [
        (y + 3, r"labels for 'obd' lie in 3\.\.5, outside the model's 3 classes \(0\.\.2\)"),
        (y - 1, r"lie in -1\.\.1"),
        (y.double(), "integer class indices"),
        (y[:-1], r"one class index per example; got \(39,\) for 40"),
    ]:
        model = _net()
        with pytest.raises(ValueError, match=match):
            lp.prune(model, "obd", 0.5, data=(x, labels))
        assert not hasattr(model[0], "weight_mask")
    lp.prune(_net(), "obd", 0.5, data=x)  # no labels: nothing to check (OBD does not need them)
