"""Tiny plain-torch reproducers of ops and reshapes met in real architectures (issue 23)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def stochastic_depth(x: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision's per-sample (``row``) or per-batch random scaling, in plain torch."""
    if not training or p == 0.0:
        return x
    size = [x.shape[0]] + [1] * (x.ndim - 1) if mode == "row" else [1] * x.ndim
    noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * noise.div_(1 - p)


torch.fx.wrap("stochastic_depth")  # torchvision wraps it so that fx keeps it as one call
# torchvision is not installed here: this copy of its code stands in for it under its name,
# so the rule registered for torchvision's function by name is the one that applies
stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x):
        return stochastic_depth(x, self.p, self.mode, self.training)


class DropPath(nn.Module):
    """Conv -> Conv -> per-sample random scaling -> residual add."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.sd = StochasticDepth(0.1, "row")
        self.head = nn.Conv2d(4, 2, 1)
        self.functional = functional

    def forward(self, x):
        h = self.c0(x)
        y = self.c2(F.relu(self.c1(h)))
        y = stochastic_depth(y, 0.1, "row", self.training) if self.functional else self.sd(y)
        return self.head(h + y)


class AddCMul(nn.Module):
    """``h + a * b`` written as ``torch.addcmul``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.inp(x)
        return self.out(torch.addcmul(h, self.a(h), torch.sigmoid(self.b(h)), value=0.5))


class TokenPool(nn.Module):
    """CLIP's text pooling: the token at each sequence's largest id, ``x[arange(B), ids]``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 6)
        self.proj = nn.Linear(6, 3)

    def forward(self, ids):
        h = F.relu(self.fc(self.emb(ids)))
        return self.proj(h[torch.arange(h.shape[0]), ids.argmax(-1)])


class FunctionalConv(nn.Module):
    """Mamba's depthwise conv: its weight read through ``F.conv1d``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.conv = nn.Conv1d(6, 6, 3, groups=6, padding=2)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = self.inp(x).transpose(1, 2)
        n = h.shape[-1]
        h = F.conv1d(h, self.conv.weight, self.conv.bias, padding=2, groups=6)[..., :n]
        return self.out(F.silu(h).transpose(1, 2))


class RollPad(nn.Module):
    """Shifted windows: roll and pad on token axes, swapaxes as a transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):  # x: [B, H, W, C]
        h = self.a(x)
        h = torch.roll(h, shifts=(1, 1), dims=(1, 2))
        h = F.pad(h, (0, 0, 0, 1, 0, 1))
        h = h.swapaxes(1, 2).swapaxes(1, 2)
        return self.b(h)


class FusedQKV(nn.Module):
    """timm's attention: ``qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``."""

    def __init__(self, d: int = 8, heads: int = 2, index: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)
        self.heads, self.index = heads, index

    def forward(self, x):
        h = self.inp(x)
        b, n, c = h.shape
        qkv = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = (qkv[0], qkv[1], qkv[2]) if self.index else qkv.unbind(0)  # Swin: qkv[i]
        a = F.scaled_dot_product_attention(q, k, v)
        return self.head(self.proj(a.transpose(1, 2).reshape(b, n, c)))


class ChannelShuffle(nn.Module):
    """ShuffleNet: ``view(b, g, c // g, h, w).transpose(1, 2).reshape(b, c, h, w)``."""

    def __init__(self, einsum: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 4, 1)
        self.einsum = einsum

    def forward(self, x):
        h = F.relu(self.c1(x))
        b, c, hh, ww = h.shape
        h = h.view(b, 2, c // 2, hh, ww)
        h = torch.einsum("bgihw->bighw", h) if self.einsum else h.transpose(1, 2)
        return self.c2(h.reshape(b, c, hh, ww))


class TokenMixer(nn.Module):
    """MLP-Mixer: a Linear across tokens between two Linears across channels."""

    def __init__(self, tokens: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.tok = nn.Linear(tokens, tokens)
        self.ch = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):  # x: [B, T, 3]
        h = self.inp(x)
        h = h + self.tok(h.transpose(1, 2)).transpose(1, 2)
        return self.out(F.gelu(self.ch(h)))


class Unfold(nn.Module):
    """MobileViT's unfold: patches of a feature map to tokens and back, then a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)
        self.c2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):  # x: [B, 3, 4, 4], patches 2x2
        h = self.c1(x)
        b, c, hh, ww = h.shape
        ph = pw = 2
        nh, nw = hh // ph, ww // pw
        p = h.reshape(b * c * nh, ph, nw, pw).transpose(1, 2)
        p = p.reshape(b, c, nh * nw, ph * pw).transpose(1, 3).reshape(b * ph * pw, nh * nw, c)
        p = self.fc(p)
        p = p.contiguous().view(b, ph * pw, nh * nw, c).transpose(1, 3)
        p = p.reshape(b * c * nh, nw, ph, pw).transpose(1, 2).reshape(b, c, hh, ww)
        return self.c2(p)


class MHA(nn.Module):
    """nn.MultiheadAttention between two Linears; with batch > 1 it folds batch into heads."""

    def __init__(self, d: int = 8, heads: int = 2, batch_first: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h)
        return self.head(a)


class InputUnsqueeze(nn.Module):
    """wav2vec2's feature encoder: the raw input unsqueezed into the first conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(1, 4, 3)
        self.c2 = nn.Conv1d(4, 2, 3)

    def forward(self, x):  # x: [B, L]
        return self.c2(F.gelu(self.c1(x[:, None])))


def per_sample_scale(x: torch.Tensor, training: bool) -> torch.Tensor:
    """Drop path under another name: a Python function torch.fx keeps whole, with no rule."""
    if not training:
        return x
    keep = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype).bernoulli_(0.9)
    return x * keep / 0.9


torch.fx.wrap("per_sample_scale")


class PerSampleScaled(DropPath):
    """DropPath with an fx-wrapped function that no rule covers: export sees into it."""

    def forward(self, x):
        h = self.c0(x)
        return self.head(h + per_sample_scale(self.c2(F.relu(self.c1(h))), self.training))


class RollUnits(nn.Module):
    """roll along the unit axis: a permutation of units."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.roll(self.a(x), 1, -1))


class AcrossBatch(nn.Module):
    """A Linear applied across the batch axis (``a(x).t()``): units reach it on another axis."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x).t())
