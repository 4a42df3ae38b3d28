"""Tests of the decompose passes: ``decompose-mha``, ``decompose-window-attention``,
``decompose-functional-linear``.

Each pass: the graph before and after (op counts, FileCheck-style op order, parameter names as
``get_attr`` targets), numerics against the original model (fp32, 1e-5; also at another batch
size, since the batch stays dynamic), and the inputs it refuses or leaves unchanged.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.errors import DecomposeError, FxPruneError, PassOrderError
from fxprune.meta import LINEAR_KEY
from fxprune.passes.decompose_functional_linear import DecomposeFunctionalLinear
from fxprune.passes.decompose_mha import DecomposeMultiheadAttention
from fxprune.passes.decompose_window_attention import DecomposeWindowAttention

torchvision = pytest.importorskip("torchvision")
from torchvision.models import swin_transformer as tv_swin  # noqa: E402
from torchvision.models.vision_transformer import VisionTransformer  # noqa: E402
from torchvision.ops import stochastic_depth as tv_stochastic_depth  # noqa: E402

ATOL = 1e-5


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _label(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"module:{type(node.graph.owning_module.get_submodule(node.target)).__name__}"
    if node.op == "call_method":
        return f"method:{node.target}"
    if node.op == "call_function":
        if node.target is F.linear:
            return "F.linear"
        if isinstance(node.target, torch._ops.OpOverload):
            return str(node.target).rsplit(".", 1)[0]  # e.g. "aten.addmm"
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        counts[_label(n)] = counts.get(_label(n), 0) + 1
    return counts


def linear_params(gm: torch.fx.GraphModule) -> list[tuple[str, str | None]]:
    """(weight, bias) get_attr targets of every F.linear, in graph order."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is F.linear:
            w, b = n.args[1], n.args[2] if len(n.args) > 2 else None
            assert isinstance(w, torch.fx.Node) and w.op == "get_attr", n.format_node()
            out.append((w.target, b.target if isinstance(b, torch.fx.Node)
                        and b.op == "get_attr" else (None if b is None else b.op)))
    return out


def check_order(gm: torch.fx.GraphModule, expected: list[str]) -> None:
    """FileCheck-style: the labels appear in this order (other ops may come between)."""
    labels = [_label(n) for n in gm.graph.nodes]
    pos = 0
    for want in expected:
        try:
            pos = labels.index(want, pos) + 1
        except ValueError:
            raise AssertionError(f"{want!r} not found after position {pos} in {labels}") from None


def close(a, b, atol=ATOL) -> None:
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            close(x, y, atol)
        return
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=atol, rtol=0), (a - b).abs().max()


def every_node_has_val(gm: torch.fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        if n.op not in ("output",) and n.users:
            assert "val" in n.meta, n.format_node()


# --------------------------------------------------------------------------------------------
# decompose-mha
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_vit():
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4,
                              hidden_dim=64, mlp_dim=128).eval()
    x = torch.randn(2, 3, 32, 32)
    return model, x, fxprune.trace(model, x)


def test_mha_vit_before_after(small_vit):
    model, x, gm = small_vit
    before = op_counts(gm)
    assert before["module:MultiheadAttention"] == 2
    assert "F.linear" not in before

    result = DecomposeMultiheadAttention()(gm)
    out = result.graph_module
    after = op_counts(out)
    assert result.modified and len(result.changes) == 2
    assert result.info["refused"] == []
    assert "module:MultiheadAttention" not in after
    assert after["scaled_dot_product_attention"] == 2
    assert after["F.linear"] == 4
    prefix = "encoder.layers.encoder_layer_{}.self_attention."
    assert linear_params(out) == [
        (prefix.format(i) + w, prefix.format(i) + b)
        for i in range(2)
        for w, b in (("in_proj_weight", "in_proj_bias"), ("out_proj.weight", "out_proj.bias"))]
    check_order(out, ["F.linear", "method:reshape", "method:permute", "method:unbind",
                      "scaled_dot_product_attention", "method:transpose", "method:reshape",
                      "F.linear", "module:Dropout"] * 2)
    # the input graph is not modified
    assert op_counts(gm) == before
    every_node_has_val(out)
    with torch.no_grad():
        close(out(x), model(x))
        x3 = torch.randn(3, 3, 32, 32)  # the batch size stays dynamic
        close(out(x3), model(x3))


@pytest.mark.slow
def test_mha_vit_b_16_full_size():
    model = torchvision.models.vit_b_16(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    result = DecomposeMultiheadAttention()(fxprune.trace(model, x))
    assert len(result.changes) == 12
    with torch.no_grad():
        close(result.graph_module(x), model(x), atol=1e-4)


class _SelfAttn(nn.Module):
    def __init__(self, batch_first: bool, need_weights: bool, average: bool = True, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, **kw)
        self.need_weights = need_weights
        self.average = average

    def forward(self, x):
        out, weights = self.attn(x, x, x, need_weights=self.need_weights,
                                 average_attn_weights=self.average)
        return (out, weights) if self.need_weights else out


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_standalone(batch_first, need_weights):
    torch.manual_seed(1)
    model = _SelfAttn(batch_first, need_weights).eval()
    shape = (2, 5, 16) if batch_first else (5, 2, 16)
    x = torch.randn(shape)
    result = DecomposeMultiheadAttention()(fxprune.trace(model, x))
    out = result.graph_module
    counts = op_counts(out)
    assert "module:MultiheadAttention" not in counts
    assert linear_params(out) == [("attn.in_proj_weight", "attn.in_proj_bias"),
                                  ("attn.out_proj.weight", "attn.out_proj.bias")]
    if need_weights:  # explicit attention: q * scale @ k^T, softmax, @ v
        assert "scaled_dot_product_attention" not in counts
        check_order(out, ["F.linear", "method:unbind", "mul", "matmul", "method:softmax",
                          "matmul", "F.linear"])
    else:
        check_order(out, ["F.linear", "method:unbind", "scaled_dot_product_attention",
                          "F.linear"])
    if not batch_first:
        check_order(out, ["method:transpose", "F.linear", "F.linear", "method:transpose"])
    every_node_has_val(out)
    with torch.no_grad():
        close(out(x), model(x))
        other = torch.randn((3, 7, 16) if batch_first else (7, 3, 16))  # batch and length
        close(out(other), model(other))


def test_mha_unused_weights_use_sdpa():
    """need_weights defaults to True; when nothing reads the weights, SDPA is used."""

    class Default(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    model = Default().eval()
    x = torch.randn(2, 5, 16)
    result = DecomposeMultiheadAttention()(fxprune.trace(model, x))
    assert op_counts(result.graph_module)["scaled_dot_product_attention"] == 1
    with torch.no_grad():
        close(result.graph_module(x), model(x))


def test_mha_weights_per_head_and_tuple_users():
    model = _SelfAttn(True, True, average=False).eval()
    x = torch.randn(2, 5, 16)
    out = DecomposeMultiheadAttention()(fxprune.trace(model, x)).graph_module
    with torch.no_grad():
        got, ref = out(x), model(x)
    assert got[1].shape == (2, 4, 5, 5)
    close(got, ref)


class _CrossAttn(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True, **kw)

    def forward(self, x, y):
        return self.attn(x, y, y, need_weights=False)[0]


@pytest.mark.parametrize("kw,weights", [
    ({}, ["attn.in_proj_weight"]),
    ({"kdim": 8, "vdim": 8}, ["attn.q_proj_weight", "attn.k_proj_weight",
                              "attn.v_proj_weight"]),
])
def test_mha_cross_attention_and_separate_weights(kw, weights):
    torch.manual_seed(2)
    model = _CrossAttn(**kw).eval()
    x, y = torch.randn(2, 5, 16), torch.randn(2, 7, kw.get("kdim", 16))
    result = DecomposeMultiheadAttention()(fxprune.trace(model, (x, y)))
    out = result.graph_module
    assert "cross-attention" in result.changes[0]
    assert op_counts(out)["F.linear"] == 4
    used = {n.target for n in out.graph.nodes if n.op == "get_attr"}
    assert set(weights) <= used
    with torch.no_grad():
        close(out(x, y), model(x, y))


def test_mha_dropout_becomes_module_following_train_eval():
    torch.manual_seed(3)
    model = _SelfAttn(True, False, dropout=0.5).eval()
    x = torch.randn(2, 5, 16)
    out = DecomposeMultiheadAttention(out_proj="module")(fxprune.trace(model, x)).graph_module
    counts = op_counts(out)
    assert counts["module:Dropout"] == 1 and counts["module:NonDynamicallyQuantizableLinear"] == 1
    assert "scaled_dot_product_attention" not in counts
    with torch.no_grad():
        close(out(x), model(x))
        out.train()
        torch.manual_seed(0)
        a = out(x)
        b = out(x)
    assert not torch.allclose(a, b)  # dropout is active in training mode


def test_mha_static_batch_is_reported():
    """A graph that bakes the batch size: the decomposition is specialized and says so."""

    class Baked(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            x = x.reshape(2, 5, 16)
            return self.attn(x, x, x, need_weights=False)[0]

    model = Baked().eval()
    x = torch.randn(2, 5, 16)
    result = DecomposeMultiheadAttention()(fxprune.trace(model, x))
    assert "dynamic sizes: static" in result.changes[0]
    with torch.no_grad():
        close(result.graph_module(x), model(x))


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x, mask):
        return self.attn(x, x, x, key_padding_mask=mask)[0]


def test_mha_refuses_graph_valued_mask():
    model = _Masked().eval()
    x, mask = torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool)
    gm = fxprune.trace(model, (x, mask))
    result = DecomposeMultiheadAttention()(gm)
    assert not result.modified and result.changes == []
    assert result.info["refused"] == [{"node": "attn", "target": "attn",
                                       "reason": "key_padding_mask is given (masks are not "
                                       "supported)"}]
    assert op_counts(result.graph_module)["module:MultiheadAttention"] == 1
    with pytest.raises(DecomposeError) as err:
        DecomposeMultiheadAttention(strict=True)(gm)
    text = str(err.value)
    assert isinstance(err.value, FxPruneError)
    assert "[decompose-mha]" in text and "key_padding_mask" in text
    assert "at node: %attn" in text and "what to do" in text


@pytest.mark.parametrize("kw,reason", [
    ({"add_bias_kv": True}, "add_bias_kv"),
    ({"add_zero_attn": True}, "add_zero_attn"),
])
def test_mha_refuses_unsupported_modules(kw, reason):
    model = _SelfAttn(True, False, **kw).eval()
    result = DecomposeMultiheadAttention()(fxprune.trace(model, torch.randn(2, 5, 16)))
    assert not result.modified
    assert reason in result.info["refused"][0]["reason"]


def test_mha_no_sites_is_unchanged(small_vit):
    _, _, gm = small_vit
    once = DecomposeMultiheadAttention()(gm).graph_module
    again = DecomposeMultiheadAttention()(once)
    assert not again.modified and again.changes == [] and again.graph_module is once


# --------------------------------------------------------------------------------------------
# decompose-window-attention
# --------------------------------------------------------------------------------------------

WRAPPED = (tv_swin.shifted_window_attention, tv_swin._get_relative_position_bias,
           tv_swin._patch_merging_pad, tv_stochastic_depth)


def _wrapped_count(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in WRAPPED)


def _small_swin(v2: bool = False, window=(4, 4)):
    torch.manual_seed(4)
    kw = dict(block=tv_swin.SwinTransformerBlockV2,
              downsample_layer=tv_swin.PatchMergingV2) if v2 else {}
    return tv_swin.SwinTransformer([4, 4], 32, [2, 2], [2, 4], list(window), **kw).eval()


@pytest.mark.parametrize("v2", [False, True], ids=["swin-v1", "swin-v2"])
def test_window_attention_small_swin(v2):
    model = _small_swin(v2)
    x = torch.randn(2, 3, 32, 32)
    gm = fxprune.trace(model, x)
    before = op_counts(gm)
    assert before["shifted_window_attention"] == 4
    assert before["_get_relative_position_bias"] == 4
    assert before["_patch_merging_pad"] == 1
    assert "F.linear" not in before

    result = DecomposeWindowAttention()(gm)
    out = result.graph_module
    after = op_counts(out)
    assert result.modified and result.info["refused"] == []
    assert _wrapped_count(out) == 0
    blocks = ["features.1.0", "features.1.1", "features.3.0", "features.3.1"]
    weights = [w for w, _ in linear_params(out)]
    assert weights == [f"{b}.attn.{p}.weight" for b in blocks for p in ("qkv", "proj")]
    assert after["method:softmax" if "method:softmax" in after else "softmax"] == 4
    # one shifted block (features.1.1; in stage 3 the window covers the 4x4 map, no shift):
    # roll forward and back, and the 9 regions of its shift mask
    assert after["roll"] == 2 and after["setitem"] == 9
    # q @ k^T is operator.matmul (v2) or Tensor.matmul (v1); attn @ v is Tensor.matmul
    check_order(out, ["F.linear", "method:reshape", "method:permute", "method:transpose",
                      "add", "softmax", "method:matmul", "F.linear"])
    if v2:
        assert after["normalize"] == 8 and after["method:exp"] == 4  # cosine attention
        assert "method:zero_" not in after and "method:clone" not in after
        assert after["zeros_like"] == 4 and after["cat"] >= 4
        biases = [n.args[2] for n in out.graph.nodes if n.target is F.linear]
        assert all(b.target is torch.cat for b in biases[::2])  # qkv: cat(q, zeros, v)
    else:
        # the bias table is read with get_attr and indexed by the get_attr index
        idx = [n for n in out.graph.nodes if n.target is operator.getitem
               and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "get_attr"
               and n.args[0].target.endswith("relative_position_bias_table")]
        assert len(idx) == 4 and all(n.args[1].op == "get_attr" for n in idx)
        assert linear_params(out)[0] == ("features.1.0.attn.qkv.weight",
                                         "features.1.0.attn.qkv.bias")
    assert all("dynamic sizes: batch" in c for c in result.changes if "->" in c
               and "bias of" not in c)
    every_node_has_val(out)
    with torch.no_grad():
        close(out(x), model(x))
        x1 = torch.randn(1, 3, 32, 32)
        close(out(x1), model(x1))


def test_window_attention_padding_and_no_shift():
    """Window 3 on an 8x8 map pads; in the last stage the window covers the map (no shift)."""
    model = _small_swin(window=(3, 3))
    x = torch.randn(2, 3, 32, 32)
    out = DecomposeWindowAttention()(fxprune.trace(model, x)).graph_module
    assert _wrapped_count(out) == 0
    assert op_counts(out)["pad"] >= 2
    with torch.no_grad():
        close(out(x), model(x))


def test_window_attention_torchvision_swin_t():
    torch.manual_seed(5)
    model = torchvision.models.swin_t(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    gm = fxprune.trace(model, x)
    assert op_counts(gm)["shifted_window_attention"] == 12
    result = DecomposeWindowAttention()(gm)
    out = result.graph_module
    assert _wrapped_count(out) == 0
    assert op_counts(out)["F.linear"] == 24
    assert linear_params(out)[-1] == ("features.7.1.attn.proj.weight",
                                      "features.7.1.attn.proj.bias")
    with torch.no_grad():
        close(out(x), model(x))


def test_window_attention_helpers_option():
    model = _small_swin()
    gm = fxprune.trace(model, torch.randn(1, 3, 32, 32))
    out = DecomposeWindowAttention(helpers=False)(gm).graph_module
    counts = op_counts(out)
    assert "shifted_window_attention" not in counts
    assert counts["_get_relative_position_bias"] == 4 and counts["stochastic_depth"] == 8


def _data_dependent(x):
    if x.sum() > 0:  # control flow on tensor data: cannot be inlined
        return x
    return -x


torch.fx.wrap("_data_dependent")


class _UsesWrapped(nn.Module):
    def forward(self, x):
        return _data_dependent(x) + 1


def test_window_attention_refuses_untraceable_function():
    gm = fxprune.trace(_UsesWrapped(), torch.randn(2, 3))
    result = DecomposeWindowAttention(extra_functions=(_data_dependent,))(gm)
    assert not result.modified
    [refusal] = result.info["refused"]
    assert refusal["target"] == "_data_dependent"
    assert "control flow depends on tensor data" in refusal["reason"]
    with pytest.raises(DecomposeError, match=r"(?s)\[decompose-window-attention\].*at node"):
        DecomposeWindowAttention(strict=True, extra_functions=(_data_dependent,))(gm)


def test_window_attention_unchanged_without_wrapped_calls(small_vit):
    _, _, gm = small_vit
    result = DecomposeWindowAttention()(gm)
    assert not result.modified and result.changes == [] and result.graph_module is gm


# --------------------------------------------------------------------------------------------
# decompose-functional-linear
# --------------------------------------------------------------------------------------------

class _QkvBias(nn.Module):
    """timm/BEiT-style qkv: a bias concatenated at run time from pieces."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48, bias=False)
        self.q_bias = nn.Parameter(torch.randn(16))
        self.v_bias = nn.Parameter(torch.randn(16))
        self.register_buffer("k_bias", torch.zeros(16), persistent=False)
        self.proj = nn.Linear(16, 16)
        self.fc = nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        b1 = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        b2 = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False),
                        self.v_bias))
        y = F.linear(x, self.qkv.weight, b1) + F.linear(input=x, weight=self.qkv.weight,
                                                         bias=b2)
        y = self.proj(y[..., :16]) + y[..., 16:32]  # non-contiguous: bmm when decomposed
        return torch.ops.aten.linear.default(y, self.fc)


@pytest.fixture(scope="module")
def qkv_model():
    torch.manual_seed(6)
    return _QkvBias().eval(), torch.randn(2, 5, 16)


def _check_linear_result(result, model, x, n_linear):
    out = result.graph_module
    counts = op_counts(out)
    assert counts["F.linear"] == n_linear
    assert not {"aten.linear", "aten.addmm", "aten.mm", "aten.bmm", "addmm"} & set(counts)
    got = out(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    with torch.no_grad():
        close(got, model(x))
    again = DecomposeFunctionalLinear()(out)
    assert not again.modified and again.changes == []  # idempotent
    return out


def test_functional_linear_fx_graph(qkv_model):
    model, x = qkv_model
    gm = fxprune.trace(model, x)
    assert op_counts(gm)["aten.linear"] == 1
    result = DecomposeFunctionalLinear()(gm)
    assert len(result.changes) == 2  # the kwargs call and the aten.linear call
    out = _check_linear_result(result, model, x, n_linear=3)
    lin = [n for n in out.graph.nodes if n.target is F.linear]
    assert all(not n.kwargs for n in lin)
    assert lin[0].meta[LINEAR_KEY] == {
        "weight": "qkv.weight",
        "bias": [("q_bias", 0, 16, 0), ("k_bias", 16, 32, 0), ("v_bias", 32, 48, 0)]}
    assert lin[1].meta[LINEAR_KEY]["bias"] == [("q_bias", 0, 16, 0), (None, 16, 32, 0),
                                                ("v_bias", 32, 48, 0)]
    assert lin[2].meta[LINEAR_KEY] == {"weight": "fc", "bias": None}


def test_functional_linear_export_graphs(qkv_model):
    model, x = qkv_model
    ep = torch.export.export(model, (x,))
    for program, rewritten in ((ep, "aten.linear"), (ep.run_decompositions(), "addmm")):
        gm = fxprune.trace(program, x)
        before = op_counts(gm)
        result = DecomposeFunctionalLinear()(gm)
        assert result.modified and result.info["skipped"] == []
        assert any(rewritten in c for c in result.changes)
        out = _check_linear_result(result, model, x, n_linear=4)
        assert [w for w, _ in linear_params(out)] == ["qkv.weight", "qkv.weight",
                                                      "proj.weight", "fc"]
        if rewritten == "addmm":
            assert (before["aten.addmm"], before["aten.bmm"], before["aten.mm"]) == (2, 1, 1)
            # the flatten/unflatten views around addmm are gone: F.linear reads x directly
            first = next(n for n in out.graph.nodes if n.target is F.linear)
            assert first.args[0].op == "placeholder"
            assert linear_params(out)[2] == ("proj.weight", "proj.bias")  # bmm + add folded


class _ZeroedClone(nn.Module):
    """torchvision Swin V2 style: the key third of the qkv bias is zeroed in place."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        bias = self.qkv.bias.clone()
        bias[16:32].zero_()
        return F.linear(x, self.qkv.weight, bias)


def test_functional_linear_zeroed_clone_bias():
    torch.manual_seed(7)
    model = _ZeroedClone().eval()
    x = torch.randn(2, 5, 16)
    gm = fxprune.trace(model, x)
    assert op_counts(gm)["method:zero_"] == 1
    result = DecomposeFunctionalLinear()(gm)
    out = result.graph_module
    assert "method:zero_" not in op_counts(out) and "method:clone" not in op_counts(out)
    assert "in-place zeroed clone of qkv.bias" in result.changes[0]
    lin = next(n for n in out.graph.nodes if n.target is F.linear)
    assert lin.meta[LINEAR_KEY]["bias"] == [("qkv.bias", 0, 16, 0), (None, 16, 32, 0),
                                             ("qkv.bias", 32, 48, 32)]
    with torch.no_grad():
        close(out(x), model(x))
    # dead-code elimination can no longer drop the zeroing
    out.graph.eliminate_dead_code()
    out.recompile()
    with torch.no_grad():
        close(out(x), model(x))


class _NotALinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        y = F.linear(x, self.w * 2)  # a computed weight: not a parameter the plan can name
        z = torch.addmm(self.lin.bias, x, self.lin.weight.t(), beta=2.0)
        return y.sum() + z.sum() + self.lin(x).sum()


def test_functional_linear_skips_and_reports():
    model = _NotALinear().eval()
    x = torch.randn(4, 16)
    gm = fxprune.trace(model, x)
    result = DecomposeFunctionalLinear()(gm)
    assert not result.modified and result.changes == []
    reasons = [s["reason"] for s in result.info["skipped"]]
    assert any("weight is not a get_attr parameter" in r for r in reasons)
    assert any("beta/alpha" in r for r in reasons)
    with torch.no_grad():
        close(result.graph_module(x), model(x))


def test_functional_linear_unchanged_on_module_linears(small_vit):
    _, _, gm = small_vit
    result = DecomposeFunctionalLinear()(gm)
    assert not result.modified and result.changes == [] and result.graph_module is gm


# --------------------------------------------------------------------------------------------
# the three passes in sequence
# --------------------------------------------------------------------------------------------

def test_pipeline_order_is_stable(small_vit):
    model, x, gm = small_vit
    gm = DecomposeMultiheadAttention()(gm).graph_module
    result = DecomposeFunctionalLinear()(gm)
    assert not result.modified  # MHA's decomposition is already canonical
    lin = [n for n in result.graph_module.graph.nodes if n.target is F.linear]
    assert lin[0].meta[LINEAR_KEY]["weight"].endswith("self_attention.in_proj_weight")
    swin = _small_swin(v2=True)
    xs = torch.randn(1, 3, 32, 32)
    out = DecomposeWindowAttention()(fxprune.trace(swin, xs)).graph_module
    assert not DecomposeFunctionalLinear()(out).modified
    with torch.no_grad():
        close(out(xs), swin(xs))


@pytest.mark.parametrize("make", [DecomposeMultiheadAttention, DecomposeWindowAttention,
                                  DecomposeFunctionalLinear])
def test_requires_shape_metadata(make):
    gm = torch.fx.symbolic_trace(nn.Linear(4, 4))  # no fxprune.trace: no meta["val"]
    with pytest.raises(PassOrderError, match=r"run fxprune\.trace"):
        make()(gm)
