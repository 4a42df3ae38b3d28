"""A zoo of small, hand-written attention variants with known structure.

The analysis and pruning tests run on these: each factory builds a tiny ViT-like model whose
head layout was chosen by hand, so what the analysis finds can be compared with ``truth``.

Every factory takes an optional ``seed`` and returns ``(model, example_input, truth)``:

- ``model``: an ``nn.Module`` in eval mode, traceable by ``torch.fx.symbolic_trace``;
  image classifier of ``(2, 3, 16, 16)`` images into 10 classes (patch 4: 16 patch tokens,
  plus a class token where the model has one).
- ``example_input``: a ``(2, 3, 16, 16)`` tensor.
- ``truth``: a dict

  - ``"sites"``: one dict per attention site, in graph (block) order, with ``"num_heads"``,
    ``"qk_head_dim"``, ``"v_head_dim"``, ``"kind"`` (``"softmax" | "window" | "linear"``) and
    ``"scale"`` (the factor the scores ``q . k`` are multiplied by before the softmax);
  - ``"mlp_hidden"``: hidden width of each block's MLP in order (for a gated MLP the width of
    the gated product, i.e. ``fc2``'s input, not ``fc1``'s output);
  - ``"frozen_qk"``: whether the q/k channel group must be left dense (an op normalizes across
    the head dim, so slicing is not equivalent to masking);
  - ``"qk_rotary"``: whether q/k carry a rotate-half rotary embedding (channels ``d`` and
    ``d + D/2`` of each head are paired; pruning must keep or drop pairs together);
  - ``"notes"``: one line on what the variant exercises.

All parameters are set from ``seed`` without touching the global RNG state. Scores are scaled
by ``qk_head_dim ** -0.5`` everywhere.

Example:
    >>> from zoo import ZOO
    >>> model, x, truth = ZOO["five_heads"]()
    >>> model(x).shape, truth["sites"][0]["num_heads"]
    (torch.Size([2, 10]), 5)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ZOO", "ZooEntry"] + [
    "separate_qkv_explicit", "einsum_attention", "qkv_no_bias", "qk_dim_differs", "five_heads",
    "qk_layernorm", "no_attention", "fused_q_kv", "rel_pos_bias", "swiglu_mlp",
    "layer_scale_mean_pool", "rotary_qk",
]

ZooEntry = tuple[nn.Module, torch.Tensor, dict]

IMG, PATCH, IN_CHANS, NUM_CLASSES, BATCH = 16, 4, 3, 10, 2
GRID = IMG // PATCH  # 4 x 4 = 16 patch tokens


# ---------------------------------------------------------------------------------------------
# Shared scaffolding: patch embedding, pre-norm block, MLPs, classifier shell.


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _SwiGLU(nn.Module):
    """fc1 -> (a, b) = chunk(2) -> silu(a) * b -> fc2. fc1 rows i and hidden + i are coupled."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


class _Block(nn.Module):
    """Pre-norm block; ``attn=None`` leaves only the MLP branch; optional layer scale."""

    def __init__(self, dim: int, attn: nn.Module | None, mlp: nn.Module,
                 layer_scale: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim) if attn is not None else None
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp
        if layer_scale:
            # Per-channel gammas well away from the usual 1e-5 init so both branches matter.
            self.gamma1 = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))
            self.gamma2 = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x):
        if self.attn is not None:
            y = self.attn(self.norm1(x))
            x = x + (y * self.gamma1 if self.gamma1 is not None else y)
        y = self.mlp(self.norm2(x))
        return x + (y * self.gamma2 if self.gamma2 is not None else y)


class _Net(nn.Module):
    """Patch-embed conv, optional class token, learned position embedding, blocks, norm, head.
    Pools the class token if there is one, otherwise the mean over tokens."""

    def __init__(self, dim: int, blocks: list[nn.Module], class_token: bool = True):
        super().__init__()
        self.patch_embed = nn.Conv2d(IN_CHANS, dim, kernel_size=PATCH, stride=PATCH)
        n = GRID * GRID + (1 if class_token else 0)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim)) if class_token else None
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n, dim))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.head(x)


def _site(num_heads: int, qk_head_dim: int, v_head_dim: int, kind: str = "softmax") -> dict:
    return {"num_heads": num_heads, "qk_head_dim": qk_head_dim, "v_head_dim": v_head_dim,
            "kind": kind, "scale": qk_head_dim ** -0.5}


def _truth(sites: list[dict], mlp_hidden: list[int], notes: str, frozen_qk: bool = False,
           qk_rotary: bool = False) -> dict:
    return {"sites": sites, "mlp_hidden": mlp_hidden, "frozen_qk": frozen_qk,
            "qk_rotary": qk_rotary, "notes": notes}


def _build(seed: int, make: Callable[[], nn.Module]) -> tuple[nn.Module, torch.Tensor]:
    """Build the model and input from ``seed`` without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make().eval()
        x = torch.randn(BATCH, IN_CHANS, IMG, IMG)
    return model, x


# ---------------------------------------------------------------------------------------------
# Attention variants.


class _SeparateQKVExplicit(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        H, D = self.num_heads, self.head_dim
        q = self.q(x).reshape(B, N, H, D).permute(0, 2, 1, 3)
        k = self.k(x).reshape(B, N, H, D).permute(0, 2, 1, 3)
        v = self.v(x).reshape(B, N, H, D).permute(0, 2, 1, 3)
        attn = F.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class _EinsumAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = torch.einsum("bhnd,bhmd->bhnm", q, k) * self.scale
        attn = attn.softmax(dim=-1)
        x = torch.einsum("bhnm,bhmd->bhnd", attn, v)
        x = x.permute(0, 2, 1, 3).reshape(B, N, C)
        return self.proj(x)


class _FusedSDPA(nn.Module):
    """timm-style: fused qkv, reshape (B, N, 3, H, D), permute, unbind, optional qk LayerNorm
    over the head dim, optional rotate-half rotary embedding on q and k, SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 rotary_tokens: int | None = None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if qk_norm:
            self.q_norm = nn.LayerNorm(self.head_dim)
            self.k_norm = nn.LayerNorm(self.head_dim)
            for norm in (self.q_norm, self.k_norm):  # non-trivial affine
                nn.init.normal_(norm.weight, 1.0, 0.2)
                nn.init.normal_(norm.bias, 0.0, 0.2)
        else:
            self.q_norm = self.k_norm = None
        if rotary_tokens is not None:
            D = self.head_dim
            if D % 2:
                raise ValueError("rotary embedding needs an even head dim")
            inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
            freqs = torch.arange(rotary_tokens, dtype=torch.float32)[:, None] * inv_freq[None]
            emb = torch.cat([freqs, freqs], dim=-1)  # (N, D): channel d and d + D/2 share a freq
            self.register_buffer("rope_cos", emb.cos(), persistent=False)
            self.register_buffer("rope_sin", emb.sin(), persistent=False)
            self.rotary = True
        else:
            self.rotary = False
        self.proj = nn.Linear(dim, dim)

    @staticmethod
    def _rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            q = q * self.rope_cos + self._rotate_half(q) * self.rope_sin
            k = k * self.rope_cos + self._rotate_half(k) * self.rope_sin
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class _QKDimDiffers(nn.Module):
    """Fused projection of H * (2 * Dqk + Dv) outputs, split with ``torch.split``."""

    def __init__(self, dim: int, num_heads: int, qk_head_dim: int):
        super().__init__()
        self.num_heads, self.qk_head_dim = num_heads, qk_head_dim
        self.v_head_dim = dim // num_heads
        self.sizes = [num_heads * qk_head_dim, num_heads * qk_head_dim,
                      num_heads * self.v_head_dim]
        self.qkv = nn.Linear(dim, sum(self.sizes))
        self.proj = nn.Linear(num_heads * self.v_head_dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        H = self.num_heads
        q, k, v = torch.split(self.qkv(x), self.sizes, dim=-1)
        q = q.reshape(B, N, H, self.qk_head_dim).permute(0, 2, 1, 3)
        k = k.reshape(B, N, H, self.qk_head_dim).permute(0, 2, 1, 3)
        v = v.reshape(B, N, H, self.v_head_dim).permute(0, 2, 1, 3)
        x = F.scaled_dot_product_attention(q, k, v)  # default scale: qk_head_dim ** -0.5
        x = x.transpose(1, 2).reshape(B, N, H * self.v_head_dim)
        return self.proj(x)


class _ViewTranspose(nn.Module):
    """Fused qkv, ``view`` to (B, N, 3, H, D), ``unbind(2)``, ``transpose(1, 2)`` per tensor."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).contiguous().view(B, N, C)
        return self.proj(x)


class _QAndFusedKV(nn.Module):
    """Spatial-reduction-attention layout (PVT) without the reduction: q Linear + kv Linear."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        H, D = self.num_heads, self.head_dim
        q = self.q(x).reshape(B, N, H, D).permute(0, 2, 1, 3)
        kv = self.kv(x).reshape(B, N, 2, H, D).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class _WindowAttentionRelPos(nn.Module):
    """Swin-like window attention with a per-head relative position bias table.

    The block input (B, L, C), L = grid_size ** 2 tokens in raster order, is partitioned into
    windows of ws x ws tokens (one window in the zoo), attention runs per window, then the
    windows are merged back. q is scaled before ``q @ k^T`` (as in Swin); the bias
    ``table[index]`` of shape (H, N, N) is added to the scores.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, grid_size: int):
        super().__init__()
        if grid_size % window_size:
            raise ValueError(f"grid {grid_size} is not a multiple of window {window_size}")
        self.windows_per_side = grid_size // window_size
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.ws = window_size
        self.window_area = window_size * window_size
        num_rel = (2 * window_size - 1) ** 2
        self.relative_position_bias_table = nn.Parameter(0.5 * torch.randn(num_rel, num_heads))
        ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
        rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # (2, N, N), >= 0
        index = rel[0] * (2 * window_size - 1) + rel[1]
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, C = x.shape
        ws, nw, N = self.ws, self.windows_per_side, self.window_area
        H, D = self.num_heads, self.head_dim
        # window partition: (B, g, g, C) -> (B * nW, ws * ws, C), nW = (g / ws) ** 2
        x = x.view(B, nw, ws, nw, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, N, C)
        Bw = x.shape[0]
        qkv = self.qkv(x).reshape(Bw, N, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, H).permute(2, 0, 1).contiguous()
        attn = (attn + bias.unsqueeze(0)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(Bw, N, C)
        x = self.proj(x)
        # window reverse
        return x.view(B, nw, nw, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, L, C)


# ---------------------------------------------------------------------------------------------
# Factories.


def separate_qkv_explicit(seed: int = 0) -> ZooEntry:
    """Separate q/k/v Linears, ``softmax(q @ k.transpose(-2, -1) * scale) @ v``; 4 heads of 8."""
    dim, heads, hidden, depth = 32, 4, 72, 2
    model, x = _build(seed, lambda: _Net(dim, [
        _Block(dim, _SeparateQKVExplicit(dim, heads), _Mlp(dim, hidden)) for _ in range(depth)]))
    return model, x, _truth([_site(heads, 8, 8)] * depth, [hidden] * depth,
                            "separate q/k/v Linears, explicit matmul-softmax-matmul")


def einsum_attention(seed: int = 0) -> ZooEntry:
    """Fused qkv, both attention products as einsum; 3 heads of 16."""
    dim, heads, hidden, depth = 48, 3, 96, 2
    model, x = _build(seed, lambda: _Net(dim, [
        _Block(dim, _EinsumAttention(dim, heads), _Mlp(dim, hidden)) for _ in range(depth)]))
    return model, x, _truth([_site(heads, 16, 16)] * depth, [hidden] * depth,
                            "einsum 'bhnd,bhmd->bhnm' and 'bhnm,bhmd->bhnd'")


def qkv_no_bias(seed: int = 0) -> ZooEntry:
    """Fused qkv Linear without bias, SDPA; 2 heads of 16."""
    dim, heads, hidden, depth = 32, 2, 64, 2
    model, x = _build(seed, lambda: _Net(dim, [
        _Block(dim, _FusedSDPA(dim, heads, qkv_bias=False), _Mlp(dim, hidden))
        for _ in range(depth)]))
    return model, x, _truth([_site(heads, 16, 16)] * depth, [hidden] * depth,
                            "fused qkv Linear with bias=False, SDPA")


def qk_dim_differs(seed: int = 0) -> ZooEntry:
    """4 heads, q/k head dim 16, v head dim 8: qkv Linear 32 -> 160 split [64, 64, 32]."""
    dim, heads, qk, hidden, depth = 32, 4, 16, 72, 2
    model, x = _build(seed, lambda: _Net(dim, [
        _Block(dim, _QKDimDiffers(dim, heads, qk), _Mlp(dim, hidden)) for _ in range(depth)]))
    return model, x, _truth([_site(heads, qk, dim // heads)] * depth, [hidden] * depth,
                            "q/k head dim 16 != v head dim 8; torch.split of a fused projection")


def five_heads(seed: int = 0) -> ZooEntry:
    """5 heads of 8 (embed 40); view + unbind(2) + transpose instead of reshape/permute."""
    dim, heads, hidden, depth = 40, 5, 80, 2
    model, x = _build(seed, lambda: _Net(dim, [
        _Block(dim, _ViewTranspose(dim, heads), _Mlp(dim, hidden)) for _ in range(depth)]))
    return model, x, _truth([_site(heads, 8, 8)] * depth, [hidden] * depth,
                            "5 heads (not a power of two); view/transpose/contiguous")


def qk_layernorm(seed: int = 0) -> ZooEntry:
    """timm ``qk_norm=True``: LayerNorm(head_dim) on q and k -> the q/k group must stay dense."""
    dim, heads, hidden, depth = 32, 4, 72, 2
    model, x = _build(seed, lambda: _Net(dim, [
        _Block(dim, _FusedSDPA(dim, heads, qk_norm=True), _Mlp(dim, hidden))
        for _ in range(depth)]))
    return model, x, _truth([_site(heads, 8, 8)] * depth, [hidden] * depth,
                            "LayerNorm over the q and k head dim: q/k frozen, v still prunable",
                            frozen_qk=True)


def no_attention(seed: int = 0) -> ZooEntry:
    """Channel-MLP-only blocks (no token mixing, no attention), mean pooling."""
    dim, hidden, depth = 32, 72, 2
    model, x = _build(seed, lambda: _Net(dim, [
        _Block(dim, None, _Mlp(dim, hidden)) for _ in range(depth)], class_token=False))
    return model, x, _truth([], [hidden] * depth, "no attention sites at all; only MLP groups")


def fused_q_kv(seed: int = 0) -> ZooEntry:
    """q Linear + fused kv Linear (SRA layout, no reduction), SDPA with explicit ``scale=``."""
    dim, heads, hidden, depth = 32, 4, 72, 2
    model, x = _build(seed, lambda: _Net(dim, [
        _Block(dim, _QAndFusedKV(dim, heads), _Mlp(dim, hidden)) for _ in range(depth)]))
    return model, x, _truth([_site(heads, 8, 8)] * depth, [hidden] * depth,
                            "q Linear and kv Linear (2C outputs, unbind), SDPA(scale=8**-0.5)")


def rel_pos_bias(seed: int = 0) -> ZooEntry:
    """Swin-like window attention on one 4x4 window, per-head relative position bias table
    (49, H) indexed by a buffer; no class token, no shift; 4 heads of 8."""
    dim, heads, hidden, depth = 32, 4, 72, 2
    model, x = _build(seed, lambda: _Net(dim, [
        _Block(dim, _WindowAttentionRelPos(dim, heads, GRID, GRID), _Mlp(dim, hidden))
        for _ in range(depth)], class_token=False))
    return model, x, _truth([_site(heads, 8, 8, kind="window")] * depth, [hidden] * depth,
                            "window attention, bias table (49, H): whole heads index its columns")


def swiglu_mlp(seed: int = 0) -> ZooEntry:
    """Gated MLP: fc1 32 -> 2 * 48, chunk, silu(a) * b, fc2 48 -> 32; fused-qkv SDPA attention."""
    dim, heads, hidden, depth = 32, 4, 48, 2
    model, x = _build(seed, lambda: _Net(dim, [
        _Block(dim, _FusedSDPA(dim, heads), _SwiGLU(dim, hidden)) for _ in range(depth)]))
    return model, x, _truth([_site(heads, 8, 8)] * depth, [hidden] * depth,
                            "SwiGLU: fc1 rows i and 48 + i and fc2 column i form one channel")


def layer_scale_mean_pool(seed: int = 0) -> ZooEntry:
    """Per-channel layer scale on both residual branches, no class token, mean pooling."""
    dim, heads, hidden, depth = 32, 4, 72, 2
    model, x = _build(seed, lambda: _Net(dim, [
        _Block(dim, _FusedSDPA(dim, heads), _Mlp(dim, hidden), layer_scale=True)
        for _ in range(depth)], class_token=False))
    return model, x, _truth([_site(heads, 8, 8)] * depth, [hidden] * depth,
                            "layer-scale gammas live on the (dense) embedding group")


def rotary_qk(seed: int = 0) -> ZooEntry:
    """Rotate-half rotary embedding on q and k (pairs (d, d + 8) in each head of 16); 2 heads."""
    dim, heads, hidden, depth = 32, 2, 64, 2
    tokens = GRID * GRID + 1
    model, x = _build(seed, lambda: _Net(dim, [
        _Block(dim, _FusedSDPA(dim, heads, rotary_tokens=tokens), _Mlp(dim, hidden))
        for _ in range(depth)]))
    return model, x, _truth([_site(heads, 16, 16)] * depth, [hidden] * depth,
                            "rotary: q/k channels d and d + 8 of a head prune together; the "
                            "(N, 16) cos/sin buffers are shared by both heads (slice them per "
                            "head, or keep the same pairs in every head), or freeze q/k",
                            qk_rotary=True)


ZOO: dict[str, Callable[..., ZooEntry]] = {
    "separate_qkv_explicit": separate_qkv_explicit,
    "einsum_attention": einsum_attention,
    "qkv_no_bias": qkv_no_bias,
    "qk_dim_differs": qk_dim_differs,
    "five_heads": five_heads,
    "qk_layernorm": qk_layernorm,
    "no_attention": no_attention,
    "fused_q_kv": fused_q_kv,
    "rel_pos_bias": rel_pos_bias,
    "swiglu_mlp": swiglu_mlp,
    "layer_scale_mean_pool": layer_scale_mean_pool,
    "rotary_qk": rotary_qk,
}

import zoo_linear  # noqa: E402, F401  (adds its variants to ZOO; builds on the helpers above)
