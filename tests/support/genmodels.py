"""A generator of small ViT-like models with known attention structure (hypothesis strategies).

``vit_specs()`` draws a :class:`ViTSpec`; ``build(spec)`` turns it into
``(model, example_input, truth)``:

- ``model``: an ``nn.Module`` in eval mode, traceable by ``torch.fx.symbolic_trace``; it maps a
  ``(2, 3, 8, 8)`` image (patch 2: 16 patch tokens, plus a class token where the spec has one)
  to ``NUM_CLASSES`` logits;
- ``example_input``: a seeded ``(BATCH, 3, 8, 8)`` tensor;
- ``truth``: a dict with ``"sites"`` (one dict per block, in graph order: ``num_heads``,
  ``qk_head_dim``, ``v_head_dim``, ``kind``, ``scale``, ``frozen_qk``) and ``"mlp_hidden"``.
  ``frozen_qk`` is True where a LayerNorm normalizes q/k over a head dim of 2 or more, None
  where the block has rotary q/k without such a norm (freezing or coupling the rotated pairs
  are both right) and False otherwise (a LayerNorm over one channel mixes nothing).
  ``visible`` is False for one head of q/k dim 1 made by its own Linear: a width-1 Linear
  output carries no channel labels, so the analysis may not see that site (there is nothing
  to prune in it either: its q/k and heads are one channel, one head); ``v_visible``
  likewise for v. Under multi-query attention a k (v) Linear of one k/v head of dim 1 is such
  a width-1 Linear, so the site (its v) may not be seen either.
  ``kv_heads`` (k/v heads), ``interleaved`` and ``head_temperature`` repeat the spec;
  ``qk_head_class`` (``v_head_class``) gives, per q head, the class of heads that must keep
  the same q/k (v) channels: its k/v head under grouped-query attention, 0 for every head
  under the interleaved layout with a head dim above 1 (channel ``d`` of every head is one
  channel), the head itself otherwise; ``qk_shared`` (``v_shared``) is True where two heads
  share a class.

What a spec varies, per block: head count (1-7, odd counts included), q/k head dim and v head
dim (independently, 1 to 16), how q, k and v are produced (fused qkv Linear, separate q/k/v
Linears, a q Linear plus a fused kv Linear), biases, how a fused output is taken apart (a 5-D
reshape or view plus unbind, ``torch.split``, ``chunk``, slicing), how heads are split (``reshape``,
``view``, ``unflatten``) and merged back (``reshape``, ``view``, ``flatten``), ``transpose``
vs ``permute``, the attention form (SDPA with or without ``scale=``, explicit
``softmax(q @ k^T * scale) @ v`` with the scale before or after the product, einsum), q/k
LayerNorm over the head dim, rotate-half rotary on q/k, a per-head relative position bias (a
table indexed by a buffer, or a dense per-head parameter), layer scale, and the MLP (GELU,
SiLU, SwiGLU). Per model: depth 1-3, embedding width, class token or mean pooling.

Attention variants with channels shared across heads, drawn now and then: grouped-query /
multi-query attention (``kv_heads`` k/v heads, a divisor of the head count, repeated to the q
heads before the product by ``repeat_interleave`` or ``unsqueeze + expand + reshape``; with
separate or q + fused kv projections), the interleaved head layout (head ``h`` holds
projection channels ``d * H + h``: split by reshape to ``(B, N, D, H)`` and a permute, merged
by the inverse; not with the fused 5-D splits), and a learned per-head temperature ``(1, H, 1,
1)`` multiplying q right before the product (the scale is unchanged).

Example:
    >>> spec = example_spec()
    >>> model, x, truth = build(spec)
    >>> tuple(model(x).shape), truth["sites"][0]["num_heads"]
    ((2, 5), 3)
    >>> truth = build(shared_heads_spec())[2]
    >>> [(s["kv_heads"], s["qk_head_class"], s["qk_shared"]) for s in truth["sites"]]
    [(2, [0, 0, 1, 1], True), (1, [0, 0, 0], True)]
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from hypothesis import settings
from hypothesis import strategies as st
from torch import nn

IMG, PATCH, IN_CHANS, NUM_CLASSES, BATCH = 8, 2, 3, 5, 2
GRID = IMG // PATCH            # 4 x 4 = 16 patch tokens

PROJ = ("fused_qkv", "separate", "q_kv")
# how a fused projection is taken apart: "heads5" = reshape/view to (B, N, parts, H, D) + unbind
FUSED_SPLIT = ("heads5_permute", "heads5_view_unbind2", "split", "chunk", "slice")
HEAD_SPLIT = ("reshape", "view", "unflatten")
PERM = ("permute", "transpose")
MERGE = ("reshape", "view", "flatten")
ATTN = ("sdpa", "sdpa_scale", "explicit_pre", "explicit_post", "explicit_div", "einsum")
REL_POS = (None, "table", "dense")
MLP = ("gelu", "silu", "swiglu", "swiglu2")
# how k/v heads are repeated to the q heads (q head h uses k/v head h // (H // kv_heads))
KV_REPEAT = ("repeat_interleave", "expand")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    num_heads: int
    qk_head_dim: int
    v_head_dim: int
    proj: str = "fused_qkv"
    fused_split: str = "split"
    qkv_bias: bool = True
    head_split: str = "reshape"
    perm: str = "permute"
    merge: str = "reshape"
    attn: str = "sdpa"
    scale_mult: float = 1.0     # scale = scale_mult * qk_head_dim ** -0.5 where given explicitly
    qk_norm: bool = False
    rotary: bool = False
    rel_pos: str | None = None
    mlp: str = "gelu"
    mlp_hidden: int = 16
    layer_scale: bool = False
    kv_heads: int | None = None  # k/v heads (a divisor of num_heads); None: num_heads
    kv_repeat: str = "repeat_interleave"
    interleaved: bool = False    # head h holds channels d * H + h (not with "heads5_*")
    head_temperature: bool = False  # q times a learned (1, H, 1, 1) right before the product

    def __post_init__(self):
        kv = self.n_kv_heads
        assert kv >= 1 and self.num_heads % kv == 0, (self.num_heads, kv)
        assert kv == self.num_heads or self.proj != "fused_qkv", "fused qkv has equal heads"
        assert not (self.interleaved and self.fused_split.startswith("heads5")) \
            or self.proj == "separate", "interleaved heads with a fused 5-D split"
        assert self.kv_repeat in KV_REPEAT, self.kv_repeat

    @property
    def n_kv_heads(self) -> int:
        return self.num_heads if self.kv_heads is None else self.kv_heads

    def head_class(self, head_dim: int) -> list[int]:
        """Per q head, the class of heads that keep the same channels of a head dim of
        ``head_dim`` (q/k or v; module docstring). With one channel per head the interleaved
        layout is the plain one: channel ``0 * H + h`` is channel ``h``."""
        if self.interleaved and head_dim > 1:
            return [0] * self.num_heads
        group = self.num_heads // self.n_kv_heads
        return [h // group for h in range(self.num_heads)]

    @property
    def scale(self) -> float:
        """The factor the scores ``q . k`` are multiplied by (what the analysis must report)."""
        if self.attn == "sdpa":
            return self.qk_head_dim ** -0.5
        if self.attn == "explicit_div":
            return 1.0 / math.sqrt(self.qk_head_dim)
        return float(self.scale_mult * self.qk_head_dim ** -0.5)


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    embed: int
    blocks: tuple[BlockSpec, ...]
    class_token: bool = True
    seed: int = 0

    @property
    def tokens(self) -> int:
        return GRID * GRID + (1 if self.class_token else 0)


# --------------------------------------------------------------------------------------------
# Strategies.

CI_PROFILE_EXAMPLES = 200  # max_examples of the "ci" hypothesis profile (tests/conftest.py)


def budget(n: int) -> int:
    """Examples for a property: ``n`` under the "ci" profile, scaled with the loaded profile's
    max_examples (5 n under "slow"). Read when the test module is imported, i.e. after pytest
    loaded the profile named by ``--hypothesis-profile``."""
    return max(1, n * settings.default.max_examples // CI_PROFILE_EXAMPLES)


@st.composite
def block_specs(draw, max_head_width: int = 64, min_head_dim: int = 1) -> BlockSpec:
    num_heads = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7]))
    cap = max(min_head_dim, min(16, max_head_width // num_heads))
    rotary = draw(st.booleans())
    if rotary:
        qk = 2 * draw(st.integers(max(1, min_head_dim // 2), cap // 2))
    else:
        qk = draw(st.integers(min_head_dim, cap))
    v = draw(st.one_of(st.just(qk), st.integers(min_head_dim, cap)))
    proj = draw(st.sampled_from(PROJ))
    splits = ["split", "chunk", "slice"] if qk == v else ["split", "slice"]
    if qk == v and proj != "separate":
        splits += ["heads5_permute", "heads5_view_unbind2"]
    if proj == "q_kv" and qk != v:
        splits = ["split", "slice"]
    fused_split = draw(st.sampled_from(splits)) if proj != "separate" else "split"
    attn = draw(st.sampled_from(ATTN))
    scale_mult = 1.0
    if attn in ("sdpa_scale", "explicit_pre", "explicit_post", "einsum"):
        scale_mult = draw(st.sampled_from([1.0, 0.5, 2.0]))
    mlp = draw(st.sampled_from(MLP))
    common = dict(
        num_heads=num_heads, qk_head_dim=qk, v_head_dim=v, proj=proj, fused_split=fused_split,
        qkv_bias=draw(st.booleans()), head_split=draw(st.sampled_from(HEAD_SPLIT)),
        perm=draw(st.sampled_from(PERM)), merge=draw(st.sampled_from(MERGE)), attn=attn,
        scale_mult=scale_mult, qk_norm=draw(st.booleans()), rotary=rotary,
        rel_pos=draw(st.sampled_from(REL_POS)), mlp=mlp,
        mlp_hidden=draw(st.integers(2, 48)), layer_scale=draw(st.booleans()))
    # the variants below are drawn last, each with a moderate probability (sampled_from shrinks
    # to its first element: the plain block)
    kv_heads, kv_repeat = None, "repeat_interleave"
    # k/v head counts, the most first (shrinks towards fewer shared heads); 1 = multi-query
    divisors = [d for d in range(num_heads - 1, 0, -1) if num_heads % d == 0]
    if proj != "fused_qkv" and divisors and draw(st.sampled_from([False, False, False, True])):
        kv_heads = draw(st.sampled_from(divisors))
        kv_repeat = draw(st.sampled_from(KV_REPEAT))
    interleaved = False
    if proj == "separate" or not fused_split.startswith("heads5"):
        interleaved = draw(st.sampled_from([False] * 5 + [True]))
    head_temperature = draw(st.sampled_from([False] * 5 + [True]))
    return BlockSpec(**common, kv_heads=kv_heads, kv_repeat=kv_repeat, interleaved=interleaved,
                     head_temperature=head_temperature)


@st.composite
def vit_specs(draw, max_depth: int = 3) -> ViTSpec:
    """A random small ViT (see the module docstring)."""
    embed = draw(st.integers(4, 64))
    depth = draw(st.integers(1, max_depth))
    blocks = tuple(draw(block_specs()) for _ in range(depth))
    return ViTSpec(embed=embed, blocks=blocks, class_token=draw(st.booleans()),
                   seed=draw(st.integers(0, 2**16)))


def example_spec() -> ViTSpec:
    """A fixed spec touching many options (for docs and smoke tests)."""
    return ViTSpec(embed=24, blocks=(
        BlockSpec(3, 8, 4, proj="fused_qkv", fused_split="split", attn="explicit_pre",
                  rotary=True, rel_pos="table", mlp="swiglu", mlp_hidden=20),
        BlockSpec(5, 4, 4, proj="q_kv", fused_split="heads5_permute", attn="sdpa",
                  head_split="unflatten", perm="transpose", merge="flatten", qk_norm=True,
                  mlp="silu", mlp_hidden=12, layer_scale=True),
    ), class_token=True, seed=1)


def shared_heads_spec() -> ViTSpec:
    """A fixed spec with the variants whose heads share channels (grouped-query attention,
    interleaved heads) and a per-head temperature."""
    return ViTSpec(embed=16, blocks=(
        BlockSpec(4, 4, 2, proj="separate", kv_heads=2, kv_repeat="expand",
                  head_temperature=True, attn="explicit_post", mlp_hidden=8),
        BlockSpec(3, 2, 4, proj="q_kv", kv_heads=1, interleaved=True, attn="sdpa",
                  mlp_hidden=8),
    ), class_token=False, seed=2)


# --------------------------------------------------------------------------------------------
# Modules.


def _split_heads(t, H: int, D: int, how: str, perm: str, interleaved: bool = False):
    """(B, N, H * D) -> (B, H, N, D); interleaved: head h holds channels d * H + h."""
    B, N = t.shape[0], t.shape[1]
    inner = (D, H) if interleaved else (H, D)
    if how == "reshape":
        t = t.reshape(B, N, *inner)
    elif how == "view":
        t = t.view(B, N, *inner)
    else:
        t = t.unflatten(-1, inner)
    if interleaved:  # (B, N, D, H) -> (B, H, N, D)
        return t.permute(0, 3, 1, 2) if perm == "permute" else t.transpose(2, 3).transpose(1, 2)
    return t.permute(0, 2, 1, 3) if perm == "permute" else t.transpose(1, 2)


def _merge_heads(t, how: str, perm: str, interleaved: bool = False):
    """(B, H, N, Dv) -> (B, N, H * Dv); interleaved: the inverse of the interleaved split."""
    B, H, N, D = t.shape
    if interleaved:  # (B, H, N, D) -> (B, N, D, H)
        t = t.permute(0, 2, 3, 1) if perm == "permute" else t.transpose(1, 2).transpose(2, 3)
    else:
        t = t.permute(0, 2, 1, 3) if perm == "permute" else t.transpose(1, 2)
    if how == "reshape":
        return t.reshape(B, N, H * D)
    if how == "view":
        return t.contiguous().view(B, N, -1)
    return t.flatten(2)


def _repeat_kv(t, groups: int, how: str):
    """(B, Hkv, N, D) -> (B, Hkv * groups, N, D): head h is k/v head h // groups."""
    if groups == 1:
        return t
    if how == "repeat_interleave":
        return t.repeat_interleave(groups, dim=1)
    B, Hkv, N, D = t.shape
    return t.unsqueeze(2).expand(B, Hkv, groups, N, D).reshape(B, Hkv * groups, N, D)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class GenAttention(nn.Module):
    def __init__(self, dim: int, tokens: int, class_token: bool, s: BlockSpec):
        super().__init__()
        self.s = s
        H, Dq, Dv = s.num_heads, s.qk_head_dim, s.v_head_dim
        Hkv = s.n_kv_heads
        self.sizes = [H * Dq, Hkv * Dq, Hkv * Dv]
        if s.proj == "fused_qkv":
            self.qkv = nn.Linear(dim, sum(self.sizes), bias=s.qkv_bias)
        elif s.proj == "separate":
            self.q = nn.Linear(dim, H * Dq, bias=s.qkv_bias)
            self.k = nn.Linear(dim, Hkv * Dq, bias=s.qkv_bias)
            self.v = nn.Linear(dim, Hkv * Dv, bias=s.qkv_bias)
        else:
            self.q = nn.Linear(dim, H * Dq, bias=s.qkv_bias)
            self.kv = nn.Linear(dim, Hkv * (Dq + Dv), bias=s.qkv_bias)
        if s.qk_norm:
            self.q_norm = nn.LayerNorm(Dq)
            self.k_norm = nn.LayerNorm(Dq)
            for norm in (self.q_norm, self.k_norm):
                nn.init.normal_(norm.weight, 1.0, 0.2)
                nn.init.normal_(norm.bias, 0.0, 0.2)
        if s.rotary:
            inv_freq = 1.0 / (100 ** (torch.arange(0, Dq, 2, dtype=torch.float32) / Dq))
            freqs = torch.arange(tokens, dtype=torch.float32)[:, None] * inv_freq[None]
            emb = torch.cat([freqs, freqs], dim=-1)           # (N, Dq)
            self.register_buffer("rope_cos", emb.cos(), persistent=False)
            self.register_buffer("rope_sin", emb.sin(), persistent=False)
        if s.rel_pos == "table":
            # Swin / BEiT: table (R, H) indexed by a (N, N) buffer; BEiT's 3 extra entries for
            # class-token rows and columns
            num_rel = (2 * GRID - 1) ** 2
            ys, xs = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
            coords = torch.stack([ys.flatten(), xs.flatten()])
            rel = coords[:, :, None] - coords[:, None, :] + (GRID - 1)
            index = rel[0] * (2 * GRID - 1) + rel[1]
            if class_token:
                full = torch.empty(tokens, tokens, dtype=torch.long)
                full[1:, 1:] = index
                full[0, 1:] = num_rel
                full[1:, 0] = num_rel + 1
                full[0, 0] = num_rel + 2
                index, num_rel = full, num_rel + 3
            self.relative_position_bias_table = nn.Parameter(0.5 * torch.randn(num_rel, H))
            self.register_buffer("relative_position_index", index, persistent=False)
        elif s.rel_pos == "dense":
            self.pos_bias = nn.Parameter(0.5 * torch.randn(1, H, tokens, tokens))
        self.proj = nn.Linear(H * Dv, dim)
        if s.head_temperature:  # drawn last: the other parameters are those of the plain block
            self.temperature = nn.Parameter(torch.empty(1, H, 1, 1).uniform_(0.5, 2.0))
        self.tokens = tokens

    # -- q, k, v as (B, H, N, D) ----------------------------------------------------------
    def _parts(self, y, sizes):
        """Take a fused projection output (B, N, sum(sizes)) apart into len(sizes) parts."""
        s = self.s
        # index the tuple: a traced split/chunk result is a Proxy, which cannot be iterated
        if s.fused_split == "split":
            t = torch.split(y, sizes, dim=-1)
            return [t[i] for i in range(len(sizes))]
        if s.fused_split == "chunk":
            t = y.chunk(len(sizes), dim=-1)
            return [t[i] for i in range(len(sizes))]
        out, start = [], 0
        for size in sizes:
            out.append(y[..., start:start + size])
            start += size
        return out

    def _heads5(self, y, parts: int, H: int):
        """reshape/view (B, N, parts, H, D) + unbind: every part keeps the same head dim."""
        s = self.s
        B, N = y.shape[0], y.shape[1]
        D = s.qk_head_dim
        if s.fused_split == "heads5_permute":
            t = y.reshape(B, N, parts, H, D)
            t = t.permute(2, 0, 3, 1, 4).unbind(0)
            return [t[i] for i in range(parts)]
        t = y.view(B, N, parts, H, D).unbind(2)
        return [t[i].transpose(1, 2) if s.perm == "transpose" else t[i].permute(0, 2, 1, 3)
                for i in range(parts)]

    def qkv_heads(self, x):
        s = self.s
        H, Dq, Dv, Hkv = s.num_heads, s.qk_head_dim, s.v_head_dim, s.n_kv_heads

        def heads(t, D, n=H):
            return _split_heads(t, n, D, s.head_split, s.perm, s.interleaved)

        if s.proj == "separate":
            return heads(self.q(x), Dq), heads(self.k(x), Dq, Hkv), heads(self.v(x), Dv, Hkv)
        if s.proj == "fused_qkv":
            y = self.qkv(x)
            if s.fused_split.startswith("heads5"):
                return tuple(self._heads5(y, 3, H))
            q, k, v = self._parts(y, self.sizes)
            return heads(q, Dq), heads(k, Dq), heads(v, Dv)
        q = heads(self.q(x), Dq)
        y = self.kv(x)
        if s.fused_split.startswith("heads5"):
            k, v = self._heads5(y, 2, Hkv)
            return q, k, v
        k, v = self._parts(y, self.sizes[1:])
        return q, heads(k, Dq, Hkv), heads(v, Dv, Hkv)

    def bias(self):
        s = self.s
        if s.rel_pos == "table":
            N = self.tokens
            b = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            return b.view(N, N, s.num_heads).permute(2, 0, 1).unsqueeze(0)
        if s.rel_pos == "dense":
            return self.pos_bias
        return None

    def forward(self, x):
        s = self.s
        q, k, v = self.qkv_heads(x)
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if s.rotary:
            q = q * self.rope_cos + _rotate_half(q) * self.rope_sin
            k = k * self.rope_cos + _rotate_half(k) * self.rope_sin
        if s.head_temperature:
            q = q * self.temperature
        groups = s.num_heads // s.n_kv_heads
        k, v = _repeat_kv(k, groups, s.kv_repeat), _repeat_kv(v, groups, s.kv_repeat)
        bias = self.bias()
        if s.attn == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        elif s.attn == "sdpa_scale":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=s.scale)
        else:
            if s.attn == "einsum":
                scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * s.scale
            else:
                kt = k.transpose(-2, -1) if s.perm == "transpose" else k.permute(0, 1, 3, 2)
                if s.attn == "explicit_pre":
                    scores = (q * s.scale) @ kt
                elif s.attn == "explicit_post":
                    scores = (q @ kt) * s.scale
                else:
                    scores = (q @ kt) / math.sqrt(s.qk_head_dim)
            if bias is not None:
                scores = scores + bias
            attn = scores.softmax(dim=-1)
            if s.attn == "einsum":
                o = torch.einsum("bhnm,bhmd->bhnd", attn, v)
            else:
                o = attn @ v
        return self.proj(_merge_heads(o, s.merge, s.perm, s.interleaved))


class GenMlp(nn.Module):
    def __init__(self, dim: int, s: BlockSpec):
        super().__init__()
        self.kind, hidden = s.mlp, s.mlp_hidden
        if self.kind == "swiglu":
            self.fc1 = nn.Linear(dim, 2 * hidden)
        elif self.kind == "swiglu2":
            self.fc1 = nn.Linear(dim, hidden)
            self.fc1_gate = nn.Linear(dim, hidden)
        else:
            self.fc1 = nn.Linear(dim, hidden)
            self.act = nn.GELU() if self.kind == "gelu" else nn.SiLU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        if self.kind == "swiglu":
            a, b = self.fc1(x).chunk(2, dim=-1)
            return self.fc2(F.silu(a) * b)
        if self.kind == "swiglu2":
            return self.fc2(F.silu(self.fc1_gate(x)) * self.fc1(x))
        return self.fc2(self.act(self.fc1(x)))


class GenBlock(nn.Module):
    def __init__(self, dim: int, tokens: int, class_token: bool, s: BlockSpec):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GenAttention(dim, tokens, class_token, s)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = GenMlp(dim, s)
        if s.layer_scale:
            self.gamma1 = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))
            self.gamma2 = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x):
        y = self.attn(self.norm1(x))
        x = x + (y * self.gamma1 if self.gamma1 is not None else y)
        y = self.mlp(self.norm2(x))
        return x + (y * self.gamma2 if self.gamma2 is not None else y)


class GenViT(nn.Module):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        dim = spec.embed
        self.patch_embed = nn.Conv2d(IN_CHANS, dim, kernel_size=PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim)) if spec.class_token \
            else None
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, spec.tokens, dim))
        self.blocks = nn.ModuleList(GenBlock(dim, spec.tokens, spec.class_token, b)
                                    for b in spec.blocks)
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


# --------------------------------------------------------------------------------------------
# Build.


def truth_of(spec: ViTSpec) -> dict:
    sites = []
    for b in spec.blocks:
        frozen = b.qk_head_dim > 1 if b.qk_norm else (None if b.rotary else False)
        qk_class, v_class = b.head_class(b.qk_head_dim), b.head_class(b.v_head_dim)
        sites.append({"num_heads": b.num_heads, "qk_head_dim": b.qk_head_dim,
                      "v_head_dim": b.v_head_dim, "scale": b.scale,
                      "kind": "window" if b.rel_pos else "softmax", "frozen_qk": frozen,
                      "visible": b.n_kv_heads * b.qk_head_dim > 1,
                      "v_visible": b.n_kv_heads * b.v_head_dim > 1,
                      "kv_heads": b.n_kv_heads, "interleaved": b.interleaved,
                      "head_temperature": b.head_temperature,
                      "qk_head_class": qk_class, "v_head_class": v_class,
                      "qk_shared": len(set(qk_class)) < len(qk_class),
                      "v_shared": len(set(v_class)) < len(v_class)})
    return {"sites": sites, "mlp_hidden": [b.mlp_hidden for b in spec.blocks]}


def build(spec: ViTSpec, batch: int = BATCH) -> tuple[nn.Module, torch.Tensor, dict]:
    """Model, example input and truth for ``spec``; the global RNG is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = GenViT(spec).eval()
        x = torch.randn(batch, IN_CHANS, IMG, IMG)
    return model, x, truth_of(spec)
