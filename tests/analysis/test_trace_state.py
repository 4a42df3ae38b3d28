"""fxprune.trace falls back to torch.export where torch.fx cannot trace a module, refuses an
ExportedProgram's lifted graph module, and leaves the traced module exactly as it was (a
forward that caches a value on the module keeps no proxy after a trace)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from exactness import outputs, rel_err, zeroed_original
from fxprune.errors import InputError, TraceError
from fxprune.modstate import preserved, restore, snapshot


class CachedBiasAttention(nn.Module):
    """Attention whose per-head bias is gathered from a table once per device and cached on
    the module in eval mode (the structure of timm's LeViT and EfficientFormer)."""

    def __init__(self, dim=32, heads=2, tokens=16):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(heads, 2 * tokens))
        self.register_buffer("idx", torch.randint(0, 2 * tokens, (tokens, tokens)),
                             persistent=False)
        self.bias_cache = {}

    def bias(self, device):
        if self.training:
            return self.table[:, self.idx]
        key = str(device)
        if key not in self.bias_cache:
            self.bias_cache[key] = self.table[:, self.idx]
        return self.bias_cache[key]

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.hd ** -0.5 + self.bias(x.device)
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class CachedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = CachedBiasAttention()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.fc2(F.gelu(self.fc1(x)))


def _state(model):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = {n: {k: v for k, v in vars(m).items() if k not in ("_parameters", "_buffers",
                                                                  "_modules")}
             for n, m in model.named_modules()}
    caches = {n: dict(m.bias_cache) for n, m in model.named_modules() if hasattr(m, "bias_cache")}
    return sd, attrs, caches


def _assert_same(model, before):
    sd, attrs, caches = _state(model)
    assert sd.keys() == before[0].keys()
    assert all(torch.equal(sd[k], before[0][k]) for k in sd)
    assert {n: set(a) for n, a in attrs.items()} == {n: set(a) for n, a in before[1].items()}
    for n, a in attrs.items():
        for k, v in a.items():
            assert v is before[1][n][k] or v == before[1][n][k], (n, k)
    assert caches.keys() == before[2].keys()
    for n, c in caches.items():
        assert c.keys() == before[2][n].keys() and all(c[k] is before[2][n][k] for k in c)


def test_a_trace_leaves_the_cache_empty_and_a_second_trace_works():
    torch.manual_seed(0)
    model, x = CachedNet().eval(), torch.randn(2, 16, 32)
    before = _state(model)
    first = fxprune.count_macs(model, x)
    _assert_same(model, before)
    assert model.attn.bias_cache == {}
    assert fxprune.count_macs(model, x) == first  # used to fail: the cache held a proxy
    _assert_same(model, before)


def test_analyze_then_prune_on_the_same_model_is_exact():
    torch.manual_seed(0)
    model, x = CachedNet().eval(), torch.randn(2, 16, 32)
    before = _state(model)
    analysis = fxprune.analyze(fxprune.trace(model, x))
    assert [s.num_heads for s in analysis.attention] == [2]
    pruned = fxprune.prune(model, x, macs_ratio=0.7, align=4, criterion="l1")
    _assert_same(model, before)
    reference = outputs(zeroed_original(model, pruned.meta["fxprune.plan"]), x)
    assert rel_err(outputs(pruned, x), reference) < 1e-4
    assert pruned.meta["fxprune.macs_ratio"] <= 0.72


def test_a_cache_filled_before_tracing_is_kept_as_it_was():
    torch.manual_seed(0)
    model, x = CachedNet().eval(), torch.randn(2, 16, 32)
    with torch.no_grad():
        y = model(x)  # a real run fills the cache with a tensor
    cached = model.attn.bias_cache["cpu"]
    fxprune.trace(model, x)
    assert list(model.attn.bias_cache) == ["cpu"] and model.attn.bias_cache["cpu"] is cached
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)


def test_training_flag_and_buffers_are_restored():
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    before = bn[1].running_mean.clone()
    with preserved(bn):
        bn(torch.randn(8, 4))
        bn.eval()
        bn.extra = 1
    assert bn.training and bn[1].training and not hasattr(bn, "extra")
    assert torch.equal(bn[1].running_mean, before)
    snap = snapshot(bn)
    bn[0].weight = nn.Parameter(torch.zeros(4, 4))
    restore(snap)
    assert bn[0].weight.abs().sum() > 0  # the original parameter is back


def test_a_graph_that_fails_lint_is_the_tracers_fault_not_the_inputs():
    # plain torch.fx (not fxprune) leaves a proxy of its own graph in the cache; fx then
    # builds a graph that uses a node of that other graph: it fails lint, which is never
    # blamed on the example inputs; torch.export (which keys the cache by the real device)
    # traces the model instead
    torch.manual_seed(0)
    model, x = CachedNet().eval(), torch.randn(2, 16, 32)
    torch.fx.symbolic_trace(model)
    assert any(isinstance(v, torch.fx.Proxy) for v in model.attn.bias_cache.values())
    with pytest.warns(UserWarning, match="malformed"):
        gm = fxprune.trace(model, x)
    assert gm.meta["fxprune.traced_from"] == "nn.Module (torch.export)"
    model.attn.bias_cache.clear()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


class ShapeBranch(nn.Module):
    """Python control flow on a size: torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        if h.shape[-1] > 32:
            h = h * 2
        return self.fc2(h)


def test_fx_failure_falls_back_to_torch_export_and_says_so():
    torch.manual_seed(0)
    model, x = ShapeBranch().eval(), torch.randn(4, 16)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    with pytest.warns(UserWarning, match="torch.export"):
        gm = fxprune.trace(model, x)
    assert gm.meta["fxprune.traced_from"] == "nn.Module (torch.export)"
    assert "control flow" in gm.meta["fxprune.trace_fallback"]
    # parameters are attributes of the graph module, under the model's own names
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"fc1.weight", "fc2.weight"} <= attrs
    assert not any(n.name.startswith("p_") for n in gm.graph.nodes if n.op == "placeholder")
    torch.testing.assert_close(gm(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = fxprune.analyze(fxprune.trace(model, x)).groups
        pruned = fxprune.prune(model, x, macs_ratio=0.6, align=4, criterion="l1")
    assert [(g.kind, g.size) for g in groups] == [("mlp", 64)]
    reference = outputs(zeroed_original(model, pruned.meta["fxprune.plan"]), x)
    assert rel_err(outputs(pruned, x), reference) < 1e-5
    assert pruned.meta["fxprune.macs_ratio"] <= 0.6


@pytest.mark.parametrize("batch", [1, 4])
def test_a_model_traced_through_torch_export_keeps_a_dynamic_batch(batch):
    """torch.export specialises a dim whose example size is 1; the fallback exports a batch of
    2 with the batch dim dynamic, so the pruned model takes any batch (as fx-traced ones do)."""
    torch.manual_seed(0)
    model, x = ShapeBranch().eval(), torch.randn(batch, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = fxprune.prune(model, x, macs_ratio=0.6, align=4, criterion="l1")
    reference = zeroed_original(model, pruned.meta["fxprune.plan"])
    for other in (1, 3, 7):
        xb = torch.randn(other, 16)
        assert rel_err(outputs(pruned, xb), outputs(reference, xb)) < 1e-5


class DataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:  # on a value: neither fx nor torch.export can trace it
            h = h * 2
        return h


def test_both_front_ends_failing_is_one_trace_error_naming_both():
    with pytest.raises(TraceError) as info:
        fxprune.trace(DataBranch(), torch.randn(2, 8))
    text = str(info.value)
    assert "control flow" in text and "torch.export failed too" in text
    assert "what to do" in text


def test_wrong_inputs_stay_an_input_error():
    with pytest.raises(InputError):
        fxprune.trace(ShapeBranch(), torch.randn(4, 15))


def test_exported_graph_module_is_refused_exported_program_works():
    model, x = ShapeBranch().eval(), torch.randn(4, 16)
    ep = torch.export.export(model, (x,))
    with pytest.raises(InputError, match="pass the ExportedProgram itself"):
        fxprune.trace(ep.graph_module, x)
    gm = fxprune.trace(ep, x)
    assert gm.meta["fxprune.traced_from"] == "ExportedProgram"
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["levit_128s", "efficientformer_l1", "efficientformerv2_s0"])
def test_timm_cached_bias_models_survive_repeated_traces(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    before = _state_dicts(model)
    assert fxprune.count_macs(model, x) == fxprune.count_macs(model, x)
    fxprune.analyze(fxprune.trace(model, x))
    assert _state_dicts(model) == before


def _state_dicts(model):
    """Per module: its attributes by identity and the length of every dict attribute."""
    out = {}
    for name, mod in model.named_modules():
        attrs = {k: v for k, v in vars(mod).items()
                 if k not in ("_parameters", "_buffers", "_modules")}
        out[name] = ({k: id(v) for k, v in attrs.items()},
                     {k: len(v) for k, v in attrs.items() if isinstance(v, dict)})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convit_tiny", "vit_tiny_r_s16_p8_224"])
def test_timm_models_fx_cannot_trace_prune_through_export(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    with pytest.warns(UserWarning, match="torch.export"):
        pruned = fxprune.prune(model, x, macs_ratio=0.7)
    reference = outputs(zeroed_original(model, pruned.meta["fxprune.plan"]), x)
    assert rel_err(outputs(pruned, x), reference) < 1e-4
    assert pruned.meta["fxprune.macs_ratio"] <= 0.72
