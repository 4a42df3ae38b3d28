"""Shapes on every node whatever the propagation path, and exported graphs' ``aten.index``
with a list of indices (relative position bias tables gathered by a buffer)."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from exactness import outputs, rel_err, zeroed_original


class ConstantAndDtype(nn.Module):
    """A value moved to a fixed device (``.to(device="cpu")``) and divided by a plain tensor
    attribute: meta-device propagation cannot run it (the attribute is a meta tensor, the
    moved value is not), so fake tensors are used; then a ``.to(h.dtype)`` (a node whose
    value is a dtype, which fake-tensor propagation does not record). timm builds rotary
    tables so."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)
        self.periods = torch.linspace(1.0, 2.0, 16)

    def forward(self, x):
        grid = x.mean(0, keepdim=True).to(device="cpu", dtype=torch.float32)
        scale = (6.28 * grid / self.periods).mean()
        h = F.gelu(self.fc1(x) * scale)
        return self.fc2(h.to(h.dtype))


def test_every_used_node_has_a_value_after_fake_propagation():
    torch.manual_seed(0)
    model, x = ConstantAndDtype().eval(), torch.randn(4, 16)
    gm = fxprune.trace(model, x)
    assert gm.meta["fxprune.shape_prop"] == "fake"  # meta propagation cannot run it
    dtype_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.args[1:2] == (
        "dtype",)]
    assert dtype_nodes and all(n.meta["val"] is torch.float32 for n in dtype_nodes)
    assert fxprune.count_macs(gm) == 4 * 16 * 64 * 2  # used to need example_inputs again
    pruned = fxprune.prune(model, x, macs_ratio=0.5, align=4, criterion="l1")
    reference = outputs(zeroed_original(model, pruned.meta["fxprune.plan"]), x)
    assert rel_err(outputs(pruned, x), reference) < 1e-5
    assert pruned.meta["fxprune.macs_ratio"] <= 0.5


class RelPosAttention(nn.Module):
    """Window-style attention whose per-head bias is gathered from a table by an index
    buffer, as ``table[idx.view(-1)]`` (Swin) or ``table[:, idx]`` (LeViT); exported, these
    become ``aten.index.Tensor(table, [idx])`` and ``aten.index.Tensor(table, [None, idx])``."""

    def __init__(self, dim=32, heads=2, tokens=16, heads_last=True):
        super().__init__()
        self.heads, self.hd, self.heads_last = heads, dim // heads, heads_last
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        shape = (2 * tokens, heads) if heads_last else (heads, 2 * tokens)
        self.table = nn.Parameter(torch.randn(shape))
        self.register_buffer("idx", torch.randint(0, 2 * tokens, (tokens, tokens)))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        if self.heads_last:
            bias = self.table[self.idx.view(-1)].view(n, n, -1).permute(2, 0, 1)
        else:
            bias = self.table[:, self.idx]
        attn = (q @ k.transpose(-2, -1)) * self.hd ** -0.5 + bias.unsqueeze(0)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class RelPosNet(nn.Module):
    def __init__(self, heads_last):
        super().__init__()
        self.attn = RelPosAttention(heads_last=heads_last)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.fc2(F.gelu(self.fc1(x)))


@pytest.mark.parametrize("heads_last", [True, False])
def test_exported_bias_table_gather_is_analysed_and_pruned(heads_last):
    torch.manual_seed(0)
    model, x = RelPosNet(heads_last).eval(), torch.randn(2, 16, 32)
    ep = torch.export.export(model, (x,))
    index = [n for n in ep.graph.nodes if n.target is torch.ops.aten.index.Tensor]
    assert index and all(isinstance(n.args[1], list) for n in index)
    analysis = fxprune.analyze(fxprune.trace(ep, x))  # used to crash in numpy (object array)
    assert [(s.kind, s.num_heads, s.qk_head_dim) for s in analysis.attention] == [
        ("window", 2, 16)]
    pruned = fxprune.prune(ep, x, macs_ratio=0.7, align=4, criterion="l1")
    reference = outputs(zeroed_original(model, pruned.meta["fxprune.plan"]), x)
    assert rel_err(outputs(pruned, x), reference) < 1e-4
    assert pruned.meta["fxprune.macs_ratio"] <= 0.72


@pytest.mark.slow
def test_timm_dinov3_graph_is_counted_without_inputs():
    # its rotary table is built with .to(device=...): shapes come from fake tensors
    timm = pytest.importorskip("timm")
    from fxprune.pipeline import prepare

    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False).eval()
    x = torch.randn(1, 3, 256, 256)
    gm, _ = prepare(fxprune.trace(model, x))
    assert gm.meta["fxprune.shape_prop"] == "fake"
    assert len(fxprune.analyze(gm).attention) == 12
    assert fxprune.count_macs(gm) == fxprune.count_macs(model, x) > 0


@pytest.mark.slow
def test_timm_swin_through_export_prunes_exactly():
    timm = pytest.importorskip("timm")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    pruned = fxprune.prune(torch.export.export(model, (x,)), x, macs_ratio=0.7)
    reference = outputs(zeroed_original(model, pruned.meta["fxprune.plan"]), x)
    assert rel_err(outputs(pruned, x), reference) < 1e-4
    assert pruned.meta["fxprune.macs_ratio"] <= 0.72


@pytest.mark.slow
def test_hugging_face_swin_through_export():
    transformers = pytest.importorskip("transformers")
    config = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1],
                                     num_heads=[2, 4], window_size=4, num_labels=10)
    model = transformers.SwinForImageClassification(config).eval()
    x = torch.randn(1, 3, 64, 64)
    pruned = fxprune.prune(torch.export.export(model, (x,)), x, macs_ratio=0.7)
    reference = outputs(zeroed_original(model, pruned.meta["fxprune.plan"]), x)
    assert rel_err(outputs(pruned, x), reference) < 1e-4
    assert pruned.meta["fxprune.macs_ratio"] <= 0.72


class PlainTableMLP(nn.Module):
    """A per-channel table kept as a plain tensor attribute (not a parameter or buffer), as
    rotary tables are: fx makes it a ``_tensor_constant``, which the slicer slices with the
    channels, but the model has no such name, so the plan must not list it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)
        self.tables = (torch.linspace(0.5, 1.5, 64),)  # not reachable by an attribute path

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x) * self.tables[0]))


def test_plan_names_only_the_models_own_tensors():
    torch.manual_seed(0)
    model, x = PlainTableMLP().eval(), torch.randn(4, 16)
    gm = fxprune.trace(model, x)
    assert any(n.op == "get_attr" and n.target.startswith("_tensor_constant")
               for n in gm.graph.nodes)
    pruned = fxprune.prune(model, x, macs_ratio=0.5, align=4, criterion="l1")
    plan = pruned.meta["fxprune.plan"]
    own = {n for n, _ in model.named_parameters()}
    assert plan and set(plan) <= own and "fc1.weight" in plan
    reference = outputs(zeroed_original(model, plan), x)
    assert rel_err(outputs(pruned, x), reference) < 1e-5


class DepthwiseConvMLP(nn.Module):
    """An MLP with a depthwise conv on its hidden channels (PVTv2, TinyViT): exported, the
    conv is ``aten.conv2d(x, w, b, stride, padding, dilation, groups)`` with ``groups`` a
    constant equal to the hidden width, which slicing must shrink with the channels."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.fc1(x).transpose(1, 2).reshape(b, 64, 4, 4)
        h = self.dw(h).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(h))


def test_exported_depthwise_conv_groups_follow_the_kept_channels():
    torch.manual_seed(0)
    model, x = DepthwiseConvMLP().eval(), torch.randn(2, 16, 16)
    ep = torch.export.export(model, (x,))
    convs = [n for n in ep.graph.nodes if "conv2d" in str(n.target)]
    assert [n.args[6] for n in convs] == [64]
    pruned = fxprune.prune(ep, x, macs_ratio=0.5, align=8, criterion="l1")
    kept = [n.args[6] for n in pruned.graph.nodes if "conv2d" in str(n.target)]
    assert len(kept) == 1 and 8 <= kept[0] < 64 and kept[0] % 8 == 0
    reference = outputs(zeroed_original(model, pruned.meta["fxprune.plan"]), x)
    assert rel_err(outputs(pruned, x), reference) < 1e-5


class LateMismatch(nn.Module):
    """A per-channel table applied after the last layer: once that layer's width is wrong (as
    a wrong slice leaves it), the graph fails at its last node, after a first layer whose
    real runs are counted."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 16)
        self.register_buffer("table", torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        return self.fc2(self.fc1(x)) * self.table


def _real_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda m, args: calls.append(args[0]) if type(
        args[0]) is torch.Tensor and args[0].device.type == "cpu" else None)
    return calls


def test_a_graph_whose_shapes_do_not_fit_fails_at_its_node_without_a_real_run():
    from fxprune.errors import InputError
    from fxprune.shapes import propagate_shapes

    x = torch.randn(2, 8)
    gm = fxprune.trace(LateMismatch().eval(), x)
    # what slicing leaves behind when it gets a width wrong: fc2 now returns 12 channels
    gm.fc2 = nn.Linear(8, 12)
    calls = _real_calls(gm.fc1)
    with pytest.raises(RuntimeError) as real:
        gm(x)
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(InputError) as replayed:
        propagate_shapes(gm, [x])
    assert calls == []   # found by running the failing node alone, not the whole graph
    first = str(real.value).splitlines()[0]
    assert (f"running the model on example inputs of shape (2, 8) failed: RuntimeError: "
            f"{first}") in str(replayed.value)
    assert replayed.value.node is not None and replayed.value.node.target is operator.mul


def numpy_double(x):
    return torch.from_numpy(x.numpy() * 2.0)


torch.fx.wrap("numpy_double")


class NumpyRoundTrip(nn.Module):
    """A call neither meta nor fake tensors can run (it goes through numpy) but real tensors
    can: the failing node runs alone without error, so the graph is run for real."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(numpy_double(self.fc1(x)))


def test_a_node_that_only_fake_tensors_cannot_run_is_still_run_for_real():
    from fxprune.shapes import propagate_shapes

    x = torch.randn(2, 8)
    gm = torch.fx.symbolic_trace(NumpyRoundTrip().eval())
    calls = _real_calls(gm.fc1)
    propagate_shapes(gm, [x])
    assert gm.meta["fxprune.shape_prop"] == "real" and len(calls) == 1
    assert [tuple(n.meta["val"].shape) for n in gm.graph.nodes
            if n.op in ("call_module", "call_function")] == [(2, 8), (2, 8), (2, 4)]
