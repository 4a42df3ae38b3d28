"""``fxprune.analyze`` tells the truth on what it is given: a model plus inputs is traced and
prepared (the attention sites are found); a raw trace with opaque attention names the opaque
calls and the one call that decomposes them; an ExportedProgram's ``graph_module`` is refused
with what to pass instead (also by ``fxprune.trace``)."""

from __future__ import annotations

import warnings

import pytest
import torch

import fxprune
from fxprune.analysis.inputs import PREPARE_CALL
from fxprune.errors import InputError


def _torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64, num_classes=10).eval()


def _torchvision_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2],
                           window_size=[4, 4], num_classes=10).eval()


@pytest.mark.parametrize("build, opaque, heads", [
    (_torchvision_vit, "nn.MultiheadAttention", [2, 2]),
    (_torchvision_swin, "shifted_window_attention", [2, 2])])
def test_raw_trace_names_the_opaque_attention(build, opaque, heads):
    model, x = build(), torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"2 opaque attention call\(s\) not analysed .*"
                      + opaque + ".*fxprune.pipeline.prepare"):
        raw = fxprune.analyze(fxprune.trace(model, x))
    assert raw.attention == [] and [w for _, w in raw.unprepared] == [opaque, opaque]
    text = str(raw)
    assert "attention not analysed (2 opaque call(s)" in text and PREPARE_CALL in text
    assert raw.to_dict()["unprepared_attention"][0]["what"] == opaque
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the prepared path has nothing to warn about
        found = fxprune.analyze(model, x)
    assert [s.num_heads for s in found.attention] == heads and found.unprepared == []
    assert isinstance(found.graph_module, torch.fx.GraphModule)
    assert found.graph_module.meta["fxprune.analysis"] is found


def test_exported_program_and_its_graph_module():
    model, x = _torchvision_vit(), torch.randn(1, 3, 32, 32)
    ep = torch.export.export(model, (x,))
    assert [s.num_heads for s in fxprune.analyze(ep).attention] == [2, 2]  # its own inputs
    for call in (lambda: fxprune.analyze(ep.graph_module),
                 lambda: fxprune.trace(ep.graph_module, x)):
        with pytest.raises(InputError, match=r"(?s)ExportedProgram.s graph_module: its parameters "
                           r"are graph inputs \(p_.*pass the ExportedProgram itself"):
            call()


def test_analyze_refuses_a_model_without_inputs():
    with pytest.raises(InputError, match="without example inputs"):
        fxprune.analyze(torch.nn.Linear(2, 2))
    with pytest.raises(InputError, match="expected a GraphModule, got str"):
        fxprune.analyze("model")


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("vit_b_16", 224), ("swin_t", 224)])
def test_torchvision_models_full_size(name, size, one_thread):
    import torchvision

    model, x = getattr(torchvision.models, name)().eval(), torch.randn(1, 3, size, size)
    with pytest.warns(UserWarning, match="opaque attention"):
        raw = fxprune.analyze(fxprune.trace(model, x))
    assert raw.attention == [] and raw.unprepared
    assert len(fxprune.analyze(model, x).attention) == 12
