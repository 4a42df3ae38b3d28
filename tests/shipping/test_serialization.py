"""Saving without pickle: ``fxprune.save`` writes safetensors weights + ``plan.json``
(+ ``program.pt2``); ``fxprune.load`` rebuilds from a model factory (the plan re-applied, the
weights loaded) or loads the program with ``weights_only`` loading. Round trips on DeiT-S,
Swin-T and FLatten-Swin-T at small inputs; the exported program (dynamic batch) and ONNX
(onnxruntime against PyTorch) of the three are ``slow``."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

import fxprune
from fxprune.errors import InputError, PlanError
from fxprune.models.reference import tiny_vit
from fxprune.serialization import save_artifact


def _factory(case: str):
    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if case == "tiny_vit":
                return tiny_vit().eval()
            if case == "flatten_swin_tiny":
                from fxprune.models.flatten import flatten_swin_tiny

                return flatten_swin_tiny(img_size=64, window_size=2, num_classes=10).eval()
            import timm

            if case == "deit_small":
                return timm.create_model("deit_small_patch16_224", pretrained=False,
                                         img_size=32, num_classes=10).eval()
            return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False,
                                     img_size=64, window_size=2, num_classes=10).eval()
    return build


SIZES = {"tiny_vit": 32, "deit_small": 32, "swin_tiny": 64, "flatten_swin_tiny": 64}


def _pruned(case):
    x = torch.randn(1, 3, SIZES[case], SIZES[case], generator=torch.Generator().manual_seed(1))
    return fxprune.prune(_factory(case)(), x, macs_ratio=0.7), x


@pytest.fixture(scope="module")
def tiny():
    return _pruned("tiny_vit")


def test_save_writes_no_pickle_and_loads_both_ways(tiny, tmp_path):
    pruned, x = tiny
    written = fxprune.save(pruned, tmp_path)
    assert sorted(written) == ["model.safetensors", "plan.json", "program.pt2"]
    assert json.loads((tmp_path / "plan.json").read_text())["params"]
    assert json.loads((tmp_path / "fxprune.json").read_text())["program"] == "program.pt2"
    rebuilt = fxprune.load(tmp_path, model_factory=_factory("tiny_vit"))
    assert rebuilt.code == pruned.code
    assert torch.equal(rebuilt(x), pruned(x))
    program = fxprune.load(tmp_path)
    x4 = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(program(x4), pruned(x4), rtol=1e-5, atol=1e-6)


def test_load_never_unpickles(tiny, tmp_path, monkeypatch):
    pruned, x = tiny
    fxprune.save(pruned, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("fxprune.load unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    original = torch.load

    def weights_only_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "torch.load without weights_only"
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", weights_only_load)
    fxprune.load(tmp_path, model_factory=_factory("tiny_vit"))
    fxprune.load(tmp_path)


def test_load_refuses_the_wrong_architecture_and_missing_files(tiny, tmp_path):
    pruned, _ = tiny
    fxprune.save(pruned, tmp_path, program=False)
    with pytest.raises(PlanError, match=r"parameter 'blocks\.0\.mlp\.fc1\.weight' has shape"):
        fxprune.load(tmp_path, model_factory=lambda: tiny_vit(mlp_ratio=2.0))
    with pytest.raises(InputError, match="no program.pt2"):
        fxprune.load(tmp_path)
    with pytest.raises(InputError, match="has no plan.json"):
        fxprune.load(tmp_path / "nothing")
    with pytest.raises(InputError, match="carries no fxprune plan"):
        fxprune.save(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), tmp_path / "plain")


@pytest.mark.parametrize("case", ["deit_small", "swin_tiny", "flatten_swin_tiny"])
def test_directory_round_trip_real_models(case, tmp_path, one_thread):
    pruned, x = _pruned(case)
    fxprune.save(pruned, tmp_path, program=False)
    rebuilt = fxprune.load(tmp_path, model_factory=_factory(case))
    assert rebuilt.code == pruned.code
    assert torch.equal(rebuilt(x), pruned(x))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["deit_small", "swin_tiny", "flatten_swin_tiny"])
def test_program_and_onnx_real_models(case, tmp_path, one_thread):
    ort = pytest.importorskip("onnxruntime")
    pruned, x = _pruned(case)
    save_artifact(pruned, tmp_path / "m.pt2", x)
    save_artifact(pruned, tmp_path / "m.onnx", x)
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for batch in (1, 3):
        xb = torch.randn(batch, *x.shape[1:])
        with torch.no_grad():
            want = pruned(xb)
        torch.testing.assert_close(program(xb), want, rtol=1e-4, atol=1e-5)
        got = session.run(None, {session.get_inputs()[0].name: xb.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-3, atol=1e-4)


def test_refined_model_with_reweight_round_trips(tmp_path):
    """refine's reweight modules are part of the plan (``after``): loading from a factory
    re-slices, re-adds them, and the saved weights fill them."""
    import warnings

    from fxprune.amap.search import refine, search

    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(4))
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = search(_factory("tiny_vit")(), loader, x[:1], macs_ratio=0.6, epochs=4,
                     indicator_lr=0.2, progress=False)
        model, _ = refine(res, loader, epochs=1)
    assert res.masks and model.meta["fxprune.plan_data"].after == ["reweight"]
    fxprune.save(model, tmp_path, x[:1], program=False)
    again = fxprune.load(tmp_path, model_factory=_factory("tiny_vit"))
    assert again.code == model.code
    assert torch.equal(again(x[:2]), model.eval()(x[:2]))
