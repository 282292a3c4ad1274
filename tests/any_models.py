"""Tiny models of the architectures people prune beyond the paper's: shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """Two convs and a Linear for ``side`` x ``side`` inputs, flattened with ``view``."""

    def __init__(self, side: int = 16) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * (side // 4) ** 2, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(x.view(x.size(0), -1))


class SqueezeExcite(nn.Module):
    """A conv, a squeeze-and-excitation gate on its output, and a conv reading the product."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Conv2d(6, 2, 1)
        self.fc2 = nn.Conv2d(2, 6, 1)
        self.out = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.out(x * s)


class SwiGLU(nn.Module):
    """Llama's gated MLP: ``down(silu(gate(h)) * up(h))``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.gate = nn.Linear(6, 8)
        self.up = nn.Linear(6, 8)
        self.down = nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.down(F.silu(self.gate(h)) * self.up(h)))


class UNet(nn.Module):
    """Down, up by ConvTranspose, skip concatenation, interpolation and nn.Upsample."""

    def __init__(self) -> None:
        super().__init__()
        self.d1 = nn.Conv2d(1, 4, 3, padding=1)
        self.d2 = nn.Conv2d(4, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.u1 = nn.Conv2d(8, 4, 3, padding=1)
        self.up2 = nn.Upsample(scale_factor=2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = F.relu(self.d1(x))
        b = F.relu(self.d2(F.max_pool2d(a, 2)))
        y = F.relu(self.u1(torch.cat([a, F.relu(self.up(b))], 1)))
        y = F.interpolate(F.avg_pool2d(y, 2), scale_factor=2.0)
        return self.head(self.up2(F.max_pool2d(y, 2)))


class MeanPooledEmbedding(nn.Module):
    """Embedding, a Linear per token, a mean over tokens, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.fc2(F.relu(self.fc1(self.emb(tokens))).mean(1))


class LSTMClassifier(nn.Module):
    """Embedding, LSTM, last time step, two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.rnn = nn.LSTM(6, 8, batch_first=True)
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, tokens):
        out, _ = self.rnn(self.emb(tokens))
        return self.fc2(torch.relu(self.fc1(out[:, -1])))


class NormSandwich(nn.Module):
    """Linear, a norm over its units, Linear: the norm's affine weight scales the link."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.norm = norm
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.relu(self.norm(self.a(x))))


class ManualRMSNorm(nn.Module):
    """RMSNorm written out, as Hugging Face models do: a statistic and a weight."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Attention(nn.Module):
    """Multi-head self-attention over tokens, with separate or fused (GPT-2) projections."""

    def __init__(
        self, d: int = 8, heads: int = 2, fused: bool = False, manual: bool = False, einsum=False
    ):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.fused, self.manual, self.heads, self.einsum = fused, manual, heads, einsum
        if fused:
            self.qkv = nn.Linear(d, 3 * d)
        else:
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        b, t, d = h.shape
        if self.fused:
            q, k, v = self.qkv(h).split(d, dim=2)
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.einsum:
            w = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k), dim=-1)
            a = torch.einsum("bhqk,bhkd->bhqd", w, v)
        elif self.manual:
            a = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(1, 2).reshape(b, t, d)
        return self.head(self.o(a).mean(1))


class ViTBlock(nn.Module):
    """Patch embedding, class token, pre-norm attention and MLP with residuals, head."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.f1, self.f2 = nn.Linear(d, 16), nn.Linear(16, d)
        self.head = nn.Linear(d, 5)
        self.heads = heads

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        b, t, d = x.shape
        y = self.ln1(x)
        q, k, v = (
            p(y).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for p in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        x = x + self.f2(F.gelu(self.f1(self.ln2(x))))
        return self.head(x[:, 0])


class TwoInputs(nn.Module):
    """A model whose input cannot be guessed: forward takes two tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x, y):
        return self.b(torch.relu(self.a(x) + y))
