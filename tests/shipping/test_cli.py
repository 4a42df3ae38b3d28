"""The ``fxprune`` command line and model specs: output, JSON, exit codes, error messages."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.app.cli import main
from fxprune.app.models_registry import load_model, parse_spec
from fxprune.errors import InputError
from fxprune.models.reference import tiny_vit

REPO = Path(__file__).resolve().parents[2]
HAS_PRUNE = any(importlib.util.find_spec(m) is not None
                for m in ("fxprune.planning.oneshot", "fxprune.prune"))

FACTORY_FILE = '''
import torch
from torch import nn

def pair():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 24), nn.GELU(), nn.Linear(24, 8)), torch.randn(2, 8)

def with_attribute():
    model = nn.Sequential(nn.Linear(8, 24), nn.GELU(), nn.Linear(24, 8))
    model.example_input = torch.randn(2, 8)
    return model

def no_input():
    return nn.Linear(8, 8)

def helper_not_model():
    return 3
'''


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_analyze_prints_the_table(capsys):
    rc, out, err = run_cli(capsys, "analyze", "fxprune:tiny_vit")
    assert rc == 0, err
    assert out.startswith("model: fxprune:tiny_vit  input: (1, 3, 32, 32)  MACs: ")
    assert "attention sites:" in out and "channel groups:" in out
    assert out.count("softmax") == 2


def test_analyze_json(capsys):
    rc, out, err = run_cli(capsys, "analyze", "fxprune:tiny_vit", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["sites"] == 2 and len(d["attention"]) == 2
    assert [s["num_heads"] for s in d["attention"]] == [3, 3]
    assert d["input_shape"] == [[1, 3, 32, 32]]
    assert d["macs"] == fxprune.count_macs(tiny_vit(), torch.randn(1, 3, 32, 32))
    kinds = [g["kind"] for g in d["groups"]]
    assert kinds.count("qk") == 2 and kinds.count("v") == 2 and kinds.count("mlp") == 2


def test_analyze_input_size_override(capsys):
    rc, out, err = run_cli(capsys, "analyze", "fxprune:tiny_vit", "--input-size", "64", "64",
                           "--json")
    assert rc == 0, err
    assert json.loads(out)["input_shape"] == [[1, 3, 64, 64]]
    rc, _, err = run_cli(capsys, "analyze", "fxprune:tiny_vit", "--input-size", "33", "33")
    assert rc == 2 and "patch_size" in err and "Traceback" not in err


def test_bad_spec_exits_2_with_a_message(capsys):
    rc, out, err = run_cli(capsys, "analyze", "nope:vit")
    assert rc == 2 and out == ""
    assert err.startswith("fxprune: error: [fxprune.load_model] unknown model spec 'nope:vit'")
    assert "timm:<name>" in err and "Traceback" not in err
    assert "\n\n" not in err.strip()  # one paragraph


def test_debug_shows_the_traceback(capsys):
    rc, _, err = run_cli(capsys, "--debug", "analyze", "nope:vit")
    assert rc == 2 and "Traceback" in err and "InputError" in err
    rc, _, err = run_cli(capsys, "analyze", "nope:vit", "--debug")
    assert rc == 2 and "Traceback" in err


@pytest.mark.parametrize("spec, needle", [
    ("deit_small_patch16_224", "did you mean timm:deit_small_patch16_224"),
    ("tiny_vit", "did you mean fxprune:tiny_vit"),
    ("fxprune:tiny", "close: tiny_vit"),
    ("timm:", "names no model"),
    ("missing_file.py:build", "does not exist"),
    ("model.py", "names a file but no factory"),
])
def test_spec_errors_say_what_to_type(capsys, spec, needle):
    rc, _, err = run_cli(capsys, "analyze", spec)
    assert rc == 2 and needle in err, err


def test_unknown_timm_model_suggests_list_models(capsys):
    pytest.importorskip("timm")
    rc, _, err = run_cli(capsys, "analyze", "timm:deit_smal")
    assert rc == 2
    assert "timm has no model named 'deit_smal'" in err
    assert "deit_small_patch16_224" in err and "timm.list_models('*deit*')" in err


def test_unknown_torchvision_model(capsys):
    pytest.importorskip("torchvision")
    rc, _, err = run_cli(capsys, "analyze", "torchvision:vit_b_1")
    assert rc == 2 and "vit_b_16" in err and "list_models" in err


def test_file_specs(tmp_path, capsys):
    f = tmp_path / "mymodels.py"
    f.write_text(FACTORY_FILE)
    for factory in ("pair", "with_attribute"):
        rc, out, err = run_cli(capsys, "analyze", f"{f}:{factory}", "--json")
        assert rc == 0, err
        d = json.loads(out)
        assert d["sites"] == 0 and d["input_shape"] == [[2, 8]]
        assert [(g["kind"], g["size"]) for g in d["groups"]] == [("mlp", 24)]
    rc, _, err = run_cli(capsys, "analyze", f"{f}:nothere")
    assert rc == 2 and "has no callable 'nothere'" in err and "pair, with_attribute" in err
    rc, _, err = run_cli(capsys, "analyze", f"{f}:no_input")
    assert rc == 2 and "without an example input" in err
    rc, _, err = run_cli(capsys, "analyze", f"{f}:helper_not_model")
    assert rc == 2 and "returned a value of type int" in err


def test_load_model_and_parse_spec():
    assert parse_spec("timm:vit_base_patch16_224") == ("timm", "vit_base_patch16_224")
    assert parse_spec("a/b.py:make") == ("file", "a/b.py:make")
    model, x = load_model("fxprune:digits_vit")
    assert tuple(x.shape) == (1, 1, 8, 8) and not model.training
    _, x2 = load_model("fxprune:reference.digits_vit")
    assert torch.equal(x, x2)  # fixed seed, and the module-qualified form is the same factory
    with pytest.raises(InputError, match="two positive ints"):
        load_model("fxprune:tiny_vit", input_size=(0, 4))


def test_analyze_timm_deit_small_json(capsys):
    pytest.importorskip("timm")
    rc, out, err = run_cli(capsys, "analyze", "timm:deit_small_patch16_224", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["sites"] == 12 and d["input_shape"] == [[1, 3, 224, 224]]
    assert {(s["kind"], s["num_heads"], s["qk_head_dim"], s["v_head_dim"])
            for s in d["attention"]} == {("softmax", 6, 64, 64)}
    assert 4.5e9 < d["macs"] < 4.7e9  # DeiT-S: about 4.6 GMACs


def test_python_dash_m_fxprune():
    """``python -m fxprune`` reaches the CLI and its exit status (a bad spec: no tracing, so
    the subprocess stays cheap; the success path is covered in-process above)."""
    proc = subprocess.run([sys.executable, "-m", "fxprune", "analyze", "nope:vit"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("fxprune: error: [fxprune.load_model] unknown model spec")
    assert "Traceback" not in proc.stderr


def test_prune_argument_checks(capsys):
    rc, _, err = run_cli(capsys, "prune", "fxprune:tiny_vit", "--macs-ratio", "1.5")
    assert rc == 2 and "--macs-ratio must be in (0, 1]" in err
    with pytest.raises(SystemExit) as info:  # argparse usage errors exit 2 as well
        main(["prune"])
    assert info.value.code == 2


@pytest.mark.skipif(not HAS_PRUNE, reason="fxprune.prune not written yet")
def test_prune_json_and_export_save(tmp_path, capsys):
    pt2 = tmp_path / "pruned.pt2"
    rc, out, err = run_cli(capsys, "prune", "fxprune:tiny_vit", "--macs-ratio", "0.7",
                           "--criterion", "l1", "--align", "8", "--json", "--out", str(pt2))
    assert rc == 0, err
    d = json.loads(out)
    assert d["macs_pruned"] < d["macs_dense"] and d["out"] == str(pt2)
    assert d["plan"] and all(r["kept"] <= r["of"] for r in d["plan"])
    _, x = load_model("fxprune:tiny_vit")
    ep = torch.export.load(str(pt2))
    assert fxprune.count_macs(ep, x) == d["macs_pruned"]
    rc, out, err = run_cli(capsys, "prune", "fxprune:tiny_vit", "--criterion", "l1")
    assert rc == 0, err
    assert out.startswith("model: fxprune:tiny_vit") and "MACs:" in out


@pytest.mark.skipif(not HAS_PRUNE, reason="fxprune.prune not written yet")
def test_prune_torch_save_and_reload(tmp_path, capsys):
    pt = tmp_path / "pruned.pt"
    rc, out, err = run_cli(capsys, "prune", "fxprune:tiny_vit", "--out", str(pt))
    assert rc == 0, err
    assert f"saved: {pt}" in out
    _, x = load_model("fxprune:tiny_vit")
    gm = torch.load(pt, weights_only=False)
    assert isinstance(gm, torch.fx.GraphModule) and gm(x).shape == (1, 10)


@pytest.mark.slow
def test_analyze_torchvision_vit_b_16(capsys):
    pytest.importorskip("torchvision")
    rc, out, err = run_cli(capsys, "analyze", "torchvision:vit_b_16", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["sites"] == 12 and d["prepared"]
    assert any(p["pass"] == "decompose-mha" and p["modified"] for p in d["prepare_passes"])


def test_hf_spec_prunes_a_saved_hugging_face_model(tmp_path, capsys):
    """``hf:<directory>``: a model written by ``save_pretrained`` (its own weights), pruned
    from the command line and saved; the saved model equals the zeroed original."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=16, patch_size=8,
                                    num_labels=3)
    transformers.ViTForImageClassification(config).eval().save_pretrained(tmp_path / "vit")
    out = tmp_path / "pruned"
    assert main(["prune", f"hf:{tmp_path / 'vit'}", "--macs-ratio", "0.7", "--align", "1",
                 "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["input_shape"] == [[1, 3, 16, 16]]
    assert abs(result["macs_ratio"] - 0.7) <= 0.02
    original = transformers.ViTForImageClassification.from_pretrained(tmp_path / "vit").eval()
    pruned = fxprune.load(out)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got = pruned(x)
        got = got.logits if hasattr(got, "logits") else got
        plan = fxprune.Plan.from_json((out / "plan.json").read_text())
        want = fxprune.zeroed_copy(original, plan)(x).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_hf_spec_that_is_not_there_is_an_input_error(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["analyze", f"hf:{tmp_path / 'missing'}"]) == 2
    assert "Hugging Face has no model" in capsys.readouterr().err
