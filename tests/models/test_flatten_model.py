"""FLatten-Swin (models/flatten_attention.py, models/flatten_swin.py).

Sizes: the three published configs are built on the meta device (no memory, no init cost) and
checked against the paper's parameter counts and MACs; MACs come from torch's own
``FlopCounterMode`` (FLOPs = 2 x MACs) and must agree with ``fxprune.count_macs``.
Numerics: the attention modules are compared with references written here independently (per
head loops and einsum for focused linear attention; full attention over the map with a mask
built from window membership in image coordinates, no roll, for shifted windows).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from fxprune.app.models_registry import load_model
from fxprune.models.flatten import (
    FLattenSwin,
    FocusedLinearAttention,
    PatchMerging,
    SwinBlock,
    WindowAttention,
    flatten_swin_base,
    flatten_swin_nano,
    flatten_swin_small,
    flatten_swin_tiny,
)

# name: (factory, params (M), GMACs at 224px), as reported for FLatten-Swin T / S / B
PUBLISHED = {
    "tiny": (flatten_swin_tiny, 29, 4.5),
    "small": (flatten_swin_small, 51, 8.7),
    "base": (flatten_swin_base, 89, 15.4),
}


@functools.cache
def _meta_model(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return PUBLISHED[name][0]().eval()


@functools.cache
def _flop_counter_macs(name: str) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        _meta_model(name)(torch.empty(1, 3, 224, 224, device="meta"))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_param_count_matches_paper(name):
    params = sum(p.numel() for p in _meta_model(name).parameters())
    target = PUBLISHED[name][1] * 1e6
    assert abs(params - target) / target < 0.02, f"{name}: {params / 1e6:.2f}M params"


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_macs_match_paper(name):
    macs = _flop_counter_macs(name)
    target = PUBLISHED[name][2] * 1e9
    assert abs(macs - target) / target < 0.03, f"{name}: {macs / 1e9:.3f} GMACs"


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_count_macs_agrees_with_flop_counter(name):
    x = torch.empty(1, 3, 224, 224, device="meta")
    ours = fxprune.count_macs(fxprune.trace(_meta_model(name), x))
    theirs = _flop_counter_macs(name)
    assert abs(ours - theirs) / theirs < 0.01, (ours, theirs)


def test_stage_layout_of_tiny():
    model = _meta_model("tiny")
    kinds = [type(stage.blocks[0].attn).__name__ for stage in model.stages]
    assert kinds == ["FocusedLinearAttention"] * 2 + ["WindowAttention"] * 2
    assert model.windows == (56, 28, 7, 7)
    assert model.stages[0].blocks[0].attn.positional_encoding.shape == (1, 56 * 56, 96)
    stage3 = model.stages[2].blocks
    assert [blk.shift_size for blk in stage3] == [0, 3] * 3
    assert model.stages[3].blocks[1].shift_size == 0  # 7x7 map: one window, no shift


@pytest.mark.parametrize("kwargs, shape", [
    ({}, (2, 3, 32, 32)),
    ({"img_size": 8, "in_chans": 1, "patch_size": 1}, (2, 1, 8, 8)),
])
def test_nano_output_shape(kwargs, shape):
    model = flatten_swin_nano(**kwargs)
    assert model(torch.randn(*shape)).shape == (2, 10)
    assert (model.img_size, model.in_chans) == (shape[2], shape[1])


def _shifted_model() -> FLattenSwin:
    # depth 2 in stages 2-4 and window 2: stage 3 (4x4) has a shifted, masked block
    return FLattenSwin(img_size=32, patch_size=2, num_classes=10, embed_dim=16,
                       depths=(1, 2, 2, 2), num_heads=(2, 2, 4, 4), window_size=2)


@pytest.mark.parametrize("build, shape", [
    (flatten_swin_nano, (2, 3, 32, 32)),
    (lambda: flatten_swin_nano(img_size=8, in_chans=1, patch_size=1), (2, 1, 8, 8)),
    (_shifted_model, (2, 3, 32, 32)),
])
def test_traces_to_the_same_function(build, shape):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(*shape)
    expected = model(x)
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), expected, rtol=0, atol=0)
    gm = fxprune.trace(model, x)
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)
    assert fxprune.count_macs(gm) > 0


def test_exports_with_a_dynamic_batch():
    # the input check runs under export (SymInt dims), unlike under fx symbolic tracing
    torch.manual_seed(0)
    model = flatten_swin_nano().eval()
    x = torch.randn(2, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=16)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    x3 = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(exported.module()(x3), model(x3), rtol=1e-5, atol=1e-6)


def test_wrong_input_shape_is_refused_on_meta_tensors():
    with torch.device("meta"):
        model = flatten_swin_nano()
        with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\).*\(1, 3, 64, 64\)"):
            model(torch.empty(1, 3, 64, 64))


def test_shifted_model_has_a_mask():
    blk = _shifted_model().stages[2].blocks[1]
    assert (blk.window_size, blk.shift_size, tuple(blk.attn_mask.shape)) == (2, 1, (4, 4, 4))


def test_registry_builds_an_input_from_the_attributes():
    model, x = load_model("fxprune:flatten.flatten_swin_nano")
    assert tuple(x.shape) == (1, 3, 32, 32)
    assert model(x).shape == (1, 10)


# -- focused linear attention against a per-head reference ------------------------------------

def _reference_focused(attn: FocusedLinearAttention, x: torch.Tensor) -> torch.Tensor:
    """FLatten's attention written head by head with einsum, from the paper's equations."""
    B, N, C = x.shape
    heads, d, p = attn.num_heads, attn.head_dim, attn.focusing_factor
    H, W = attn.resolution
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    k = k + attn.positional_encoding
    s = torch.log1p(torch.exp(attn.scale))  # softplus

    def phi(t):
        t = (torch.clamp(t, min=0) + 1e-6) / s
        powered = t.pow(p)
        return powered * (torch.linalg.vector_norm(t, dim=-1, keepdim=True)
                          / torch.linalg.vector_norm(powered, dim=-1, keepdim=True))

    q, k = phi(q), phi(k)
    outs = []
    for i in range(heads):
        cols = slice(i * d, (i + 1) * d)
        qi, ki, vi = q[..., cols], k[..., cols], v[..., cols]
        kv = torch.einsum("bnd,bne->bde", ki, vi) / N
        numerator = torch.einsum("bnd,bde->bne", qi, kv)
        denominator = torch.einsum("bnd,bd->bn", qi, ki.mean(dim=1)) + 1e-6
        vmap = vi.transpose(1, 2).reshape(B, d, H, W)
        conv = F.conv2d(vmap, attn.dwc.weight, attn.dwc.bias, padding=attn.dwc.padding,
                        groups=d)
        outs.append(numerator / denominator[..., None] + conv.reshape(B, d, N).transpose(1, 2))
    return F.linear(torch.cat(outs, dim=-1), attn.proj.weight, attn.proj.bias)


@pytest.mark.parametrize("focusing_factor", [3, 2.5])
def test_focused_linear_attention_matches_reference(focusing_factor):
    torch.manual_seed(0)
    attn = FocusedLinearAttention(24, num_heads=3, resolution=(4, 6),
                                  focusing_factor=focusing_factor, kernel_size=3)
    with torch.no_grad():
        attn.scale.normal_(0, 0.5)
        attn.positional_encoding.normal_(0, 0.5)
        attn.dwc.bias.normal_()
    x = torch.randn(2, 24, 24, dtype=torch.float64)
    attn = attn.double()
    torch.testing.assert_close(attn(x), _reference_focused(attn, x), rtol=1e-10, atol=1e-10)


# -- window attention against full attention with a window-membership mask --------------------

def _reference_swin_block(blk: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """Shifted windows without rolling: in image coordinates, a shifted window boundary lies at
    ``shift + k * window``; two tokens attend to each other iff no boundary separates them."""
    (H, W), w, s = blk.resolution, blk.window_size, blk.shift_size
    attn = blk.attn
    heads, d = attn.num_heads, attn.head_dim
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    gy, gx = (ys + w - s) // w, (xs + w - s) // w
    allowed = (gy[:, None] == gy[None, :]) & (gx[:, None] == gx[None, :])
    dy, dx = ys[:, None] - ys[None, :], xs[:, None] - xs[None, :]
    table_row = ((dy + w - 1) * (2 * w - 1) + (dx + w - 1)).clamp(0, (2 * w - 1) ** 2 - 1)

    h = blk.norm1(x)
    q, k, v = attn.qkv(h).chunk(3, dim=-1)
    outs = []
    for i in range(heads):
        cols = slice(i * d, (i + 1) * d)
        scores = torch.einsum("bnd,bmd->bnm", q[..., cols], k[..., cols]) * d ** -0.5
        scores = scores + attn.relative_position_bias_table[table_row, i]
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.einsum("bnm,bmd->bnd", scores.softmax(-1), v[..., cols]))
    x = x + attn.proj(torch.cat(outs, dim=-1))
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("resolution, window, shift", [
    ((4, 6), 2, True), ((6, 6), 3, True), ((6, 6), 3, False), ((2, 2), 4, True),
])
def test_swin_block_matches_masked_full_attention(resolution, window, shift):
    torch.manual_seed(0)
    blk = SwinBlock(16, 2, resolution, window_size=window, shift=shift).double()
    x = torch.randn(2, resolution[0] * resolution[1], 16, dtype=torch.float64)
    # -100 in the block's mask vs -inf in the reference: exp(-100) is far below the tolerance
    torch.testing.assert_close(blk(x), _reference_swin_block(blk, x), rtol=1e-9, atol=1e-9)


def test_patch_merging_concatenates_each_2x2_neighbourhood():
    torch.manual_seed(0)
    merge = PatchMerging((4, 6), 3)
    x = torch.randn(2, 24, 3)
    grid = x.view(2, 4, 6, 3)
    # Swin's order: (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1)
    parts = [grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]]
    expected = merge.reduction(merge.norm(torch.cat(parts, dim=-1).reshape(2, 6, 12)))
    torch.testing.assert_close(merge(x), expected)


# -- refusals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("build, words", [
    (lambda: flatten_swin_nano(img_size=33), ["img_size 33", "patch_size 2"]),
    (lambda: flatten_swin_nano(img_size=8), ["patch grid 4", "2**3"]),
    (lambda: flatten_swin_nano(img_size=8, patch_size=3), ["img_size 8", "patch_size 3"]),
    (lambda: flatten_swin_tiny(window_size=6), ["window_size 6", "14x14"]),
    (lambda: flatten_swin_nano(focusing_factor=0), ["focusing_factor", "0"]),
    (lambda: flatten_swin_nano(kernel_size=4), ["kernel_size", "4", "odd"]),
    (lambda: flatten_swin_nano(num_heads=(3, 2, 4, 4)), ["16", "num_heads[0] = 3"]),
    (lambda: flatten_swin_nano(linear_stages=5), ["linear_stages", "5"]),
    (lambda: flatten_swin_nano(depths=(1, 1, 1)), ["depths", "num_heads"]),
])
def test_bad_model_config_is_refused(build, words):
    with pytest.raises(ValueError) as info:
        build()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("kwargs, words", [
    ({"focusing_factor": 0}, ["focusing_factor", "got 0", "3"]),
    ({"focusing_factor": -1.5}, ["focusing_factor", "-1.5"]),
    ({"kernel_size": 4}, ["kernel_size", "odd", "got 4"]),
    ({"kernel_size": 0}, ["kernel_size", "got 0"]),
    ({"dim": 10}, ["dim 10", "num_heads 3"]),
    ({"resolution": (4, 0)}, ["resolution", "(4, 0)"]),
])
def test_bad_attention_config_is_refused(kwargs, words):
    args = {"dim": 12, "num_heads": 3, "resolution": (4, 4), **kwargs}
    with pytest.raises(ValueError) as info:
        FocusedLinearAttention(**args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_bad_window_attention_config_is_refused():
    with pytest.raises(ValueError, match="dim 10 is not divisible by num_heads 4"):
        WindowAttention(10, 4, 2)
    with pytest.raises(ValueError, match="window_size 3 does not divide .* 6x4"):
        SwinBlock(16, 2, (6, 4), window_size=3)


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 1, 32, 32), (3, 32, 32)])
def test_wrong_input_shape_is_refused_at_call_time(shape):
    model = flatten_swin_nano()
    with pytest.raises(ValueError) as info:
        model(torch.randn(*shape))
    message = str(info.value)
    assert "(B, 3, 32, 32)" in message and str(shape) in message, message
