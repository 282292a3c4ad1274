"""ResNet-18 under ``graph="sequential"``: which batch norm is each layer's Eq. 9 factor?

The official code (alinlab/lookahead_pruning, ``network/base_model.py:get_bn_weights``) walks
``model.modules()``, appends ``None`` for each masked layer and, for each batch norm, replaces
the last entry with that norm's factor. A layer's factor is therefore the *last* batch norm
registered before the next masked layer. In the three downsampling blocks (``layer2.0``,
``layer3.0``, ``layer4.0``) that is the shortcut's norm ``shortcut.1``, registered after
``bn2``, so ``conv2`` is scaled by the shortcut's statistics, both as its own output factor and
as the input factor of the next block's ``conv1``. It also uses ``sqrt(running_var + 1e-10)``
instead of the norm's ``eps``. The project's module-order chain takes the *first* batch norm
after a layer with as many features as the layer has outputs (``bn2``) and its ``eps``.

This script counts the mask entries in which the two choices differ on one ResNet-18. It
compares four sets of masks, at the keep fractions of the residual study:

- ``project``: ``lookahead_prune.compute_masks(model, "lap", keep, graph="sequential",
  exclude=["*shortcut*"])``.
- ``port, bn2``: an independent port of the official LAP score (``method/laprune.py``, base
  order), with the project's pairing and ``eps``. It should match ``project`` exactly, which
  checks the port.
- ``port, official pairing``: the same with the official pairing, and the norm's ``eps``.
- ``official``: the official pairing with ``1e-10``, i.e. the official code's score.

Every set keeps the same number of weights per layer, chosen with the same top-k
(``masks.top_k_mask``). A differing entry is one weight kept by one set and pruned by the
other; the table prints the count per layer, over the layers pruned.

A freshly initialised network has identical batch norms everywhere (gamma 1, variance 1), where
the pairing cannot matter. ``--stats data`` (the default) keeps gamma 1 and estimates the
running statistics of the initialised network on 20 batches of the bundled MNIST
(``lookahead_prune.recalibrate_batchnorm``): real per-channel activation scales, no training.
``--stats random`` draws gamma from U(0.2, 1.5) and the variance from exp(N(0, 1)), seeded.
``--checkpoint`` loads the trained model that
``lap train --model resnet18 --dataset fashion-mnist --out dense.pt`` writes.

    python benchmarks/resnet_bn_pairing.py [--stats data|random] [--checkpoint dense.pt]
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

import lookahead_prune as lp
from lookahead_prune.checkpoint import load_checkpoint
from lookahead_prune.data import load_dataset
from lookahead_prune.graph import prunable_layers
from lookahead_prune.masks import top_k_mask
from lookahead_prune.models import build_model, dense_layer_names
from lookahead_prune.schedule import level_keep, paper_pq

EXCLUDE = ("*shortcut*",)
OFFICIAL_EPS = 1e-10  # get_bn_weights: w / sqrt(running_var + 1e-10)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def resnet(checkpoint: str | None, stats: str, seed: int) -> nn.Module:
    """ResNet-18 for 1x28x28 images: trained, or initialised with BN stats from data or random."""
    model = build_model("resnet18", in_channels=1, image_size=28, seed=seed)
    if checkpoint:
        model.load_state_dict(load_checkpoint(checkpoint)["state"])
        return model.double().eval()
    if stats == "data":
        x = load_dataset("mnist", subset=1200).train_x
        lp.recalibrate_batchnorm(model, x, batches=20, batch_size=60, seed=seed)
        return model.double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BN_TYPES):
                m.weight.copy_(torch.empty(m.num_features).uniform_(0.2, 1.5, generator=g))
                m.running_var.copy_(torch.randn(m.num_features, generator=g).exp())
    return model.double().eval()


def bn_pairing(model: nn.Module, chain: list[str], rule: str) -> dict[str, nn.Module | None]:
    """Each chained layer's batch norm: ``official`` (last one before the next chained layer,
    any width, as get_bn_weights) or ``project`` (first one after it with matching width)."""
    paired: dict[str, nn.Module | None] = {}
    current = None
    for name, m in model.named_modules():
        if name in chain:
            current = name
            paired[name] = None
        elif isinstance(m, BN_TYPES) and current is not None:
            width = chain_width(model, current)
            if rule == "official" or (paired[current] is None and m.num_features == width):
                paired[current] = m
    return paired


def chain_width(model: nn.Module, name: str) -> int:
    w = dict(model.named_modules())[name].weight
    return w.shape[0]


def official_scores(
    model: nn.Module, chain: list[str], bns: dict[str, nn.Module | None], eps: float | None
) -> dict[str, Tensor]:
    """The official base-order LAP score w² · prev · next (method/laprune.py), in float64."""
    mods = dict(model.named_modules())
    w = {n: mods[n].weight.detach().double() for n in chain}

    def factor(name: str) -> Tensor | None:
        bn = bns[name]
        if bn is None:
            return None
        e = bn.eps if eps is None else eps
        return bn.weight.detach().double() / (bn.running_var.double() + e).sqrt()

    scores = {}
    for i, name in enumerate(chain):
        weight = w[name]
        shape = (1, -1) + (1,) * (weight.dim() - 2)
        score = weight**2
        if i > 0:  # rows of the previous layer, scaled by its batch norm
            prev = w[chain[i - 1]].flatten(1).square().sum(1)
            if (f := factor(chain[i - 1])) is not None:
                prev = prev * f**2
            score = score * prev.view(shape)
        if i + 1 < len(chain):  # columns of the next layer, scaled by this layer's batch norm
            nxt = w[chain[i + 1]]
            cols = nxt.square().sum(0) if nxt.dim() == 2 else nxt.square().sum((0, 2, 3))
            if (f := factor(name)) is not None:
                cols = cols * f**2
            score = score * cols.view((-1,) + (1,) * (weight.dim() - 1))
        scores[name] = score
    return scores


def masks_from(scores: dict[str, Tensor], keep: dict[str, float]) -> dict[str, Tensor]:
    return {n: top_k_mask(scores[n], round(k * scores[n].numel())) for n, k in keep.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a ResNet-18 written by lap train (else random BN)")
    parser.add_argument("--levels", default="17,26,35", help="levels τ of the residual study")
    parser.add_argument("--stats", default="data", choices=["data", "random"],
                        help="batch-norm statistics of the untrained network")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = resnet(args.checkpoint, args.stats, args.seed)
    layers = prunable_layers(model)
    shortcuts = [n for n in layers if "shortcut" in n]
    chain = [n for n in layers if n not in shortcuts]
    project_bn = bn_pairing(model, chain, "project")
    official_bn = bn_pairing(model, chain, "official")
    names = {m: n for n, m in model.named_modules()}
    print("layers whose batch norm differs (project -> official):")
    for n in chain:
        if project_bn[n] is not official_bn[n]:
            print(f"  {n}: {names.get(project_bn[n])} -> {names.get(official_bn[n])}")
    p, q = paper_pq("resnet18")
    variants = {
        "port, bn2": official_scores(model, chain, project_bn, None),
        "port, official pairing": official_scores(model, chain, official_bn, None),
        "official": official_scores(model, chain, official_bn, OFFICIAL_EPS),
    }
    for level in (int(v) for v in args.levels.split(",")):
        keep = level_keep(model, level, p, q, dense=dense_layer_names(model) + tuple(shortcuts))
        ours, _ = lp.compute_masks(model, "lap", keep, graph="sequential", exclude=EXCLUDE)
        kept = sum(int(ours[n].sum()) for n in keep)
        total = sum(ours[n].numel() for n in keep)
        print(f"\nlevel {level}: {kept:,} of {total:,} weights kept in {len(keep)} pruned layers")
        print("weights kept by `project` and pruned by the other set (as many the other way round)")
        print(f"{'layer':<18}{'kept':>10}" + "".join(f"{v:>24}" for v in variants))
        other = {v: masks_from(s, keep) for v, s in variants.items()}
        diff = {v: {n: int((ours[n] != m[n]).sum()) // 2 for n in keep} for v, m in other.items()}
        for n in keep:
            if any(diff[v][n] for v in variants):
                row = f"{n:<18}{int(ours[n].sum()):>10,}"
                print(row + "".join(f"{diff[v][n]:>24,}" for v in variants))
        row = f"{'all layers':<18}{kept:>10,}"
        print(row + "".join(f"{sum(diff[v].values()):>24,}" for v in variants))
        print(f"{'% of kept':<28}" + "".join(
            f"{100 * sum(diff[v].values()) / kept:>23.2f}%" for v in variants))  # fmt: skip


if __name__ == "__main__":
    main()
