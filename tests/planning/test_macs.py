"""fxprune.macs against torch.utils.flop_counter.FlopCounterMode (FLOPs = 2 x MACs) and against
published figures.

How the reference is made fair (torch 2.13, CPU):

- FlopCounterMode has no formula for ``aten._scaled_dot_product_flash_attention_for_cpu``: on
  CPU, SDPA with equal q/k/v head dims picks that kernel and counts 0, while unequal head dims
  fall back to the math path and are counted. Forcing ``SDPBackend.MATH`` makes SDPA decompose
  into matmuls that are always counted.
- ``nn.MultiheadAttention`` in eval mode without grad takes a fused fast path
  (``aten._native_multi_head_attention``) that FlopCounterMode does not see at all: torchvision's
  ViT-B/16 reads 11.27 G instead of 17.56 G. The fast path is switched off for the reference.
- FlopCounterMode has no formula for matrix-vector products (``aten.mv``, ``aten.dot``), which
  a matmul with a 1-D operand becomes: ``x @ w`` with ``w`` 1-D reads 0. The reference adds
  those formulas through ``custom_mapping`` instead of registering them globally.
- Real-size models run on the meta device: FlopCounterMode only needs shapes, so the reference
  costs no arithmetic, and ``count_macs`` traces with fake tensors anyway.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from fxprune.errors import InputError
from fxprune.macs import count_macs, einsum_macs, macs_by_node, node_macs

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


@contextlib.contextmanager
def _no_mha_fastpath():
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _mv_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * (a_shape[1] if len(a_shape) == 2 else 1)


_MISSING_FORMULAS = {torch.ops.aten.mv: _mv_flops, torch.ops.aten.dot: _mv_flops}


def reference_macs(model, *inputs) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=_MISSING_FORMULAS)
    with counter, sdpa_kernel(SDPBackend.MATH), _no_mha_fastpath(), torch.no_grad():
        model(*inputs)
    return counter.get_total_flops() // 2


# -- tiny hand-written models ------------------------------------------------------------------

class EinsumAttention(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.einsum("bhnd,bhmd->bhnm", q, k).softmax(-1)
        out = torch.einsum("bhnm,bhmd->bhnd", attn, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SdpaUnequalHeads(nn.Module):
    """q/k head dim 16, v head dim 8: the two attention products differ in cost."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, heads * 16)
        self.k = nn.Linear(dim, heads * 16)
        self.v = nn.Linear(dim, heads * 8)
        self.proj = nn.Linear(heads * 8, dim)

    def forward(self, x):
        b, n, _ = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class MiscOps(nn.Module):
    """Conv variants, every matmul spelling, 1-D and broadcast operands, odd einsums, MHA."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv1d(8, 12, 3, groups=4)
        self.w1 = nn.Parameter(torch.randn(16))
        self.w2 = nn.Parameter(torch.randn(16, 16))
        self.w3 = nn.Parameter(torch.randn(6, 5))
        self.conv_w = nn.Parameter(torch.randn(4, 8, 1))
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True, kdim=12, vdim=10)

    def forward(self, x, ctx_k, ctx_v):
        y = self.dw(self.conv(x)).flatten(2)                  # (1, 8, 16)
        z = self.grouped(y)                                   # (1, 12, 14)
        z = F.conv1d(z[:, :8], self.conv_w)                   # (1, 4, 14)
        a = y @ self.w1                                       # 1-D right operand -> (1, 8)
        b = self.w1 @ y.transpose(1, 2)                       # 1-D left operand -> (1, 8)
        c = torch.matmul(y.unsqueeze(1), self.w2)             # broadcast (1, 1, 8, 16)
        d = y.matmul(y.transpose(1, 2)) + torch.bmm(y, y.transpose(1, 2))
        e = torch.addmm(self.w3[0, :1], self.w3, self.w3.t())
        f = torch.einsum("ij,jk->i", self.w2, self.w2)        # k summed out before the product
        g = torch.einsum("...ij,...jk", y, self.w2)          # implicit output, ellipsis
        h, _ = self.mha(y, ctx_k, ctx_v)                      # cross attention, 8 x 5 tokens
        return (z.sum() + a.sum() + b.sum() + c.sum() + d.sum() + e.sum() + f.sum()
                + g.sum() + h.sum())


def _misc_inputs():
    return torch.randn(1, 3, 4, 4), torch.randn(1, 5, 12), torch.randn(1, 5, 10)


@pytest.mark.parametrize("model, inputs", [
    (EinsumAttention(), (torch.randn(2, 10, 32),)),
    (SdpaUnequalHeads(), (torch.randn(2, 10, 32),)),
    (MiscOps(), _misc_inputs()),
], ids=["einsum-attention", "sdpa-qk16-v8", "misc-ops"])
@pytest.mark.parametrize("front", ["fx", "export"])
def test_small_models_match_flop_counter(model, inputs, front):
    model.eval()
    expected = reference_macs(model, *inputs)
    subject = torch.export.export(model, inputs) if front == "export" else model
    assert expected > 0
    assert count_macs(subject, inputs) == pytest.approx(expected, rel=0.01)


def test_sdpa_counts_both_products():
    q, v = torch.randn(2, 3, 10, 16), torch.randn(2, 3, 12, 8)
    k = torch.randn(2, 3, 12, 16)

    class Attn(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    assert count_macs(Attn(), (q, k, v)) == 2 * 3 * 10 * 12 * (16 + 8)


def _timm(name):
    return lambda: timm.create_model(name, pretrained=False)


@pytest.mark.parametrize("make", [
    _timm("vit_tiny_patch16_224"),
    _timm("deit_small_patch16_224"),
    _timm("deit3_small_patch16_224"),
    _timm("swin_tiny_patch4_window7_224"),
    lambda: torchvision.models.vit_b_16(weights=None),
    lambda: torchvision.models.swin_t(weights=None),
], ids=["vit_tiny", "deit_small", "deit3_small", "swin_tiny", "tv_vit_b_16", "tv_swin_t"])
def test_real_size_models_match_flop_counter(make):
    with torch.device("meta"):
        model = make().eval()
        x = torch.empty(1, 3, 224, 224)
    assert count_macs(model, x) == pytest.approx(reference_macs(model, x), rel=0.01)


def test_real_tensors_match_too():
    # the meta-device shortcut above must not hide a difference from a real forward
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    assert count_macs(model, x) == pytest.approx(reference_macs(model, x), rel=0.01)


def test_hugging_face_vit_exported():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, image_size=32, patch_size=8,
                                    num_labels=10)
    model = transformers.ViTForImageClassification(config).eval()
    x = torch.randn(1, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    expected = reference_macs(model, x)
    assert count_macs(exported, (x,)) == pytest.approx(expected, rel=0.01)
    assert count_macs(exported) == count_macs(exported, (x,))  # its own example inputs


@pytest.mark.parametrize("name, gmacs", [
    ("deit_small_patch16_224", 4.6), ("deit_base_patch16_224", 17.6),
    ("swin_tiny_patch4_window7_224", 4.5), ("vit_large_patch16_224", 61.6),
])
def test_published_figures(name, gmacs):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.empty(1, 3, 224, 224)
    assert round(count_macs(model, x) / 1e9, 1) == gmacs


def test_traced_graph_is_counted_as_is():
    model = EinsumAttention().eval()
    x = torch.randn(2, 10, 32)
    gm = fxprune.trace(model, x)
    assert count_macs(gm) == count_macs(model, x) == sum(macs_by_node(gm).values())
    assert all(v > 0 for v in macs_by_node(gm).values())


def test_custom_shape_of_prices_pruned_widths():
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    gm = fxprune.trace(model, torch.randn(4, 8))
    fc1, act, fc2 = (n for n in gm.graph.nodes if n.op == "call_module")

    def halved(node):
        shape = tuple(node.meta["val"].shape)
        return shape[:-1] + (shape[-1] // 2,) if node in (fc1, act) else shape

    assert node_macs(fc1, gm) == 4 * 32 * 8
    assert node_macs(fc1, gm, halved) == 4 * 16 * 8
    assert node_macs(fc2, gm, halved) == 4 * 8 * 16  # reads its input width through shape_of
    assert sum(macs_by_node(gm, halved).values()) == count_macs(gm) // 2


def test_custom_shape_of_on_a_vit():
    with torch.device("meta"):
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
        x = torch.empty(1, 3, 224, 224)
    gm = fxprune.trace(model, x)
    fc1 = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith("fc1"))

    def halved(node):
        shape = tuple(node.meta["val"].shape)
        return shape[:-1] + (shape[-1] // 2,) if node is fc1 else shape

    assert node_macs(fc1, gm) == 197 * 768 * 192
    assert node_macs(fc1, gm, halved) == 197 * 384 * 192
    dense = count_macs(gm)
    assert sum(macs_by_node(gm, halved).values()) == dense - 197 * 384 * 192


def test_einsum_macs_forms():
    assert einsum_macs("bhnd,bhmd->bhnm", [(2, 3, 5, 8), (2, 3, 7, 8)]) == 2 * 3 * 5 * 7 * 8
    assert einsum_macs("ij,jk", [(4, 5), (5, 6)]) == 4 * 5 * 6
    assert einsum_macs("...ij,jk->...ik", [(2, 3, 4, 5), (5, 6)]) == 2 * 3 * 4 * 5 * 6
    assert einsum_macs("ij,jk->i", [(4, 5), (5, 6)]) == 4 * 5
    assert einsum_macs("ij->ji", [(4, 5)]) == 0
    assert einsum_macs("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)]) == 2 * 3 * 4 + 2 * 4 * 5


def test_opaque_leaf_with_linears_warns():
    """torch.fx's own tracer keeps torch.nn's composite modules as leaves: counting such a
    graph warns instead of undercounting silently. fxprune.trace traces into them."""
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)).eval()
    x = torch.randn(1, 4, 16)
    with pytest.warns(UserWarning, match="opaque leaf"):
        assert count_macs(torch.fx.symbolic_trace(model), x) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torch.export fallback says so
        traced_into = count_macs(model, x)
    # q/k/v/out projections, the two MLP Linears, q.k and attn.v
    assert traced_into == 4 * (16 * 48 + 16 * 16 + 16 * 32 + 32 * 16) + 2 * 4 * 4 * 16


def test_not_a_module_raises_input_error():
    with pytest.raises(InputError, match="str"):
        count_macs("not a module", torch.randn(1, 3))


def test_graph_without_shapes_needs_inputs():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(InputError, match="example_inputs"):
        count_macs(gm)
    assert count_macs(gm, torch.randn(2, 4)) == 2 * 4 * 4
