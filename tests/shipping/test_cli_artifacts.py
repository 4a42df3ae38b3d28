"""``fxprune prune``: artifacts chosen by ``--out``'s suffix (a directory of safetensors +
plan, ``.pt2`` with a dynamic batch, ``.onnx`` checked with onnxruntime), the pruning flags
(``--dense-sites``, ``--heads``, ``--keep-dense``), warnings in ``--json``, and factories that
return a Module, a GraphModule or an ExportedProgram."""

from __future__ import annotations

import json

import pytest
import torch

import fxprune
from fxprune.app.cli import build_parser, main
from fxprune.models.reference import tiny_vit

FACTORIES = '''
import torch
from torch import nn

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).eval()

def module():
    return _mlp(), torch.randn(2, 8)

def graph_module():
    return torch.fx.symbolic_trace(_mlp()), torch.randn(2, 8)

def exported():
    return torch.export.export(_mlp(), (torch.randn(2, 8),))

def exported_module():
    return torch.export.export(_mlp(), (torch.randn(2, 8),)).module(), torch.randn(2, 8)
'''


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def factories(tmp_path):
    f = tmp_path / "factories.py"
    f.write_text(FACTORIES)
    return f


@pytest.mark.parametrize("factory", ["module", "graph_module", "exported", "exported_module"])
def test_factory_may_return_module_graph_module_or_exported_program(capsys, factories,
                                                                    factory):
    rc, out, err = run_cli(capsys, "prune", f"{factories}:{factory}", "--macs-ratio", "0.5",
                           "--criterion", "l1", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["macs_pruned"] <= 0.5 * d["macs_dense"] and d["warnings"] == []
    first = d["plan"][0]  # fc1's rows: half of the 32 hidden units kept
    assert first["kept"] == 16 and first["of"] == 32  # an ExportedProgram too (its state_dict)


def test_json_lists_warnings(capsys):
    # the frozen residual stream makes 0.1 unreachable: prune warns, --json carries it
    rc, out, err = run_cli(capsys, "prune", "fxprune:tiny_vit", "--macs-ratio", "0.1",
                           "--json")
    assert rc == 0, err
    notes = json.loads(out)["warnings"]
    assert len(notes) == 1 and "reached macs_ratio" in notes[0]


def test_criterion_help_lists_every_criterion():
    sub = build_parser()._subparsers._group_actions[0].choices["prune"]
    text = sub.format_help()
    for name in ("similarity", "l1", "random", "toast"):
        assert name in text
    for flag in ("--dense-sites", "--heads", "--keep-dense"):
        assert flag in text


def test_dense_sites_heads_and_keep_dense(capsys):
    def plan_params(*flags):
        rc, out, err = run_cli(capsys, "prune", "fxprune:tiny_vit", "--macs-ratio", "0.8",
                               "--align", "4", "--json", *flags)
        assert rc == 0, err
        d = json.loads(out)
        return {r["param"] for r in d["plan"]}, d["summary"]

    params, _ = plan_params("--dense-sites", "0")
    assert params and not any(p.startswith("blocks.0.attn") for p in params)
    params, _ = plan_params("--keep-dense", "blocks.0.*", "--keep-dense", "blocks.1.mlp.*")
    assert params and not any(p.startswith(("blocks.0.", "blocks.1.mlp.")) for p in params)
    _, summary = plan_params("--heads", "whole", "--keep-dense", "*.mlp.*")
    sites = [r for r in summary if "site" in r]
    assert all(r["qk_dim_after"] == r["qk_dim"] for r in sites)
    assert any(r["heads_after"] < r["heads"] for r in sites)


def test_typed_error_is_a_clean_message(capsys):
    rc, out, err = run_cli(capsys, "prune", "fxprune:tiny_vit", "--keep-dense", "*")
    assert rc == 2 and out == ""
    assert "no prunable channel group" in err and "Traceback" not in err


def test_out_directory_round_trip(tmp_path, capsys):
    out_dir = tmp_path / "pruned"
    rc, out, err = run_cli(capsys, "prune", "fxprune:tiny_vit", "--align", "4", "--out",
                           str(out_dir))
    assert rc == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "fxprune.json", "model.safetensors", "plan.json", "program.pt2"]
    x = torch.randn(3, 3, 32, 32)
    rebuilt = fxprune.load(out_dir, model_factory=tiny_vit)
    program = fxprune.load(out_dir)  # no factory: program.pt2, batch 3 (dynamic)
    torch.testing.assert_close(program(x), rebuilt(x), rtol=1e-5, atol=1e-5)


def test_out_pt2_has_a_dynamic_batch(tmp_path, capsys):
    pt2 = tmp_path / "pruned.pt2"
    rc, out, err = run_cli(capsys, "prune", "fxprune:tiny_vit", "--align", "4", "--out",
                           str(pt2))
    assert rc == 0, err
    m = torch.export.load(str(pt2)).module()
    for batch in (1, 5):
        assert m(torch.randn(batch, 3, 32, 32)).shape == (batch, 10)


def test_out_onnx_matches_pytorch(tmp_path, capsys, factories):
    ort = pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "pruned.onnx"
    rc, out, err = run_cli(capsys, "prune", f"{factories}:module", "--macs-ratio", "0.5",
                           "--out", str(onnx_path))
    assert rc == 0, err
    assert onnx_path.read_bytes()[:2] != b"\x80\x02"  # not a pickle under an .onnx name
    session = ort.InferenceSession(str(onnx_path))
    x = torch.randn(5, 8)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    rc, out, err = run_cli(capsys, "prune", f"{factories}:module", "--macs-ratio", "0.5",
                           "--out", str(tmp_path / "ref"))
    assert rc == 0, err
    reference = fxprune.load(tmp_path / "ref")
    torch.testing.assert_close(torch.from_numpy(got), reference(x), rtol=1e-4, atol=1e-5)


def test_unknown_suffix_is_refused(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "prune", "fxprune:tiny_vit", "--out",
                           str(tmp_path / "pruned.bin"))
    assert rc == 2 and "unknown output suffix '.bin'" in err
