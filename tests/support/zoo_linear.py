"""Linear-attention variants of the test zoo (same conventions as :mod:`zoo`).

- ``focused_linear``: FLatten's focused linear attention written out in 4-D tensors
  ``(B, h, N, d)``: ReLU + 1e-6 kernel, per-channel learned scale, focusing power with the norm
  over all channels, the normaliser ``1 / (q . mean(k))``, ``k^T v`` first, and one depthwise
  conv on v shared by all heads (heads folded into the batch dim for it).
- ``focused_linear_folded``: the same computation the way FLatten's public code lays it out:
  q, k and v with the heads folded into the batch dim ``(B*h, N, d)`` and einsums, the last
  one with three operands (the normaliser multiplies the product).
  The conv, run on the folded batch, ties v's channel ``j`` of every head; q/k heads stay
  independent.
- ``elu_linear``: kernelised linear attention with ``elu(x) + 1`` and a sum normaliser, four
  heads, no conv. ``elu(0) + 1 = 1``: zeroing a projection row is NOT removing the channel, so
  the zeroed-original check does not apply (``truth["zeroed_equals_removed"]`` is False, as for
  the focused variants, where ReLU(0) + 1e-6 is small but not 0); the gated model still equals
  the sliced one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo import GRID, ZOO, ZooEntry, _Block, _build, _Mlp, _Net, _site, _truth

N_TOKENS = GRID * GRID


def _linear_site(num_heads: int, head_dim: int) -> dict:
    return {**_site(num_heads, head_dim, head_dim, "linear"), "scale": 1.0}  # no score scale


class _FocusedLinear(nn.Module):
    def __init__(self, dim: int, num_heads: int, folded: bool = False, power: int = 3,
                 kernel: int = 3, conv: bool = True):
        super().__init__()
        self.h, self.d, self.folded, self.power = num_heads, dim // num_heads, folded, power
        self.qkv = nn.Linear(dim, 3 * dim)
        self.positional_encoding = nn.Parameter(torch.zeros(1, N_TOKENS, dim))
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.dwc = nn.Conv2d(self.d, self.d, kernel, padding=kernel // 2, groups=self.d) \
            if conv else None
        self.proj = nn.Linear(dim, dim)

    def _focus(self, t, s):
        t = (F.relu(t) + 1e-6) / s
        norm = t.norm(dim=-1, keepdim=True)
        t = t ** self.power
        return t / t.norm(dim=-1, keepdim=True) * norm

    def forward(self, x):
        B, N, C = x.shape
        h, d = self.h, self.d
        q, k, v = self.qkv(x).reshape(B, N, 3, C).unbind(2)
        k = k + self.positional_encoding
        s = F.softplus(self.scale)
        q, k = self._focus(q, s), self._focus(k, s)
        if self.folded:
            q, k, v = (t.reshape(B, N, h, d).permute(0, 2, 1, 3).reshape(B * h, N, d)
                       for t in (q, k, v))
            z = 1 / (torch.einsum("bic,bc->bi", q, k.mean(dim=1)) + 1e-6)
            kv = torch.einsum("bjc,bjd->bcd", k, v / N)
            out = torch.einsum("b i c, b c d, b i -> b i d", q, kv, z)  # as FLatten writes it
            if self.dwc is not None:
                fm = self.dwc(v.transpose(-2, -1).reshape(B * h, d, GRID, GRID))
                out = out + fm.reshape(B * h, d, N).transpose(-2, -1)
            out = out.reshape(B, h, N, d).transpose(1, 2).reshape(B, N, C)
        else:
            q, k, v = (t.reshape(B, N, h, d).transpose(1, 2) for t in (q, k, v))
            z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
            kv = (k.transpose(-2, -1) * N ** -0.5) @ (v * N ** -0.5)
            out = q @ kv * z
            fm = self.dwc(v.transpose(-2, -1).reshape(B * h, d, GRID, GRID))
            out = out + fm.reshape(B, h, d, N).transpose(-2, -1)
            out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out)


class _EluLinear(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.h, self.d = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q = F.elu(self.q(x)) + 1
        k, v = self.kv(x).chunk(2, dim=-1)
        k = F.elu(k) + 1
        q, k, v = (t.reshape(B, N, self.h, self.d).transpose(1, 2) for t in (q, k, v))
        kv = k.transpose(-2, -1) @ v
        denom = q @ k.sum(dim=-2).unsqueeze(-1)
        out = (q @ kv) / denom
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def focused_linear(seed: int = 0) -> ZooEntry:
    """FLatten focused linear attention, 2 heads of 8, shared depthwise conv on v."""
    dim, heads, hidden, depth = 16, 2, 32, 2
    model, x = _build(seed, lambda: _Net(dim, [
        _Block(dim, _FocusedLinear(dim, heads), _Mlp(dim, hidden)) for _ in range(depth)],
        class_token=False))
    truth = _truth([_linear_site(heads, 8)] * depth, [hidden] * depth,
                   "focused linear attention: norms over all channels, scale and positional "
                   "encoding coupled with q/k, dwc shared by the heads")
    truth["zeroed_equals_removed"] = False  # ReLU(0) + 1e-6 is not 0
    return model, x, truth


def focused_linear_folded(seed: int = 0) -> ZooEntry:
    """FLatten's layout: heads folded into the batch dim for every product."""
    dim, heads, hidden, depth = 16, 2, 32, 2
    model, x = _build(seed, lambda: _Net(dim, [
        _Block(dim, _FocusedLinear(dim, heads, folded=True), _Mlp(dim, hidden))
        for _ in range(depth)], class_token=False))
    truth = _truth([_linear_site(heads, 8)] * depth, [hidden] * depth,
                   "heads folded into the batch dim: q/k heads stay independent, the shared "
                   "conv ties v's channel j across heads")
    truth["zeroed_equals_removed"] = False  # ReLU(0) + 1e-6 is not 0
    return model, x, truth


def elu_linear(seed: int = 0) -> ZooEntry:
    """elu + 1 kernel linear attention, 4 heads of 8, separate q and fused kv Linears."""
    dim, heads, hidden, depth = 32, 4, 64, 2
    model, x = _build(seed, lambda: _Net(dim, [
        _Block(dim, _EluLinear(dim, heads), _Mlp(dim, hidden)) for _ in range(depth)]))
    truth = _truth([_linear_site(heads, 8)] * depth, [hidden] * depth,
                   "elu(x) + 1 kernel: masking after the kernel is removal, zeroing the "
                   "projection is not")
    truth["zeroed_equals_removed"] = False
    return model, x, truth


LINEAR_ZOO = {
    "focused_linear": focused_linear,
    "focused_linear_folded": focused_linear_folded,
    "elu_linear": elu_linear,
}
ZOO.update(LINEAR_ZOO)
