"""Plans and pruned weights of DeiT-S, Swin-T (timm) and FLatten-Swin-T are identical to
the ones recorded before fxprune's package layout was reorganised
(``tests/data/record_reference_plans.py`` wrote ``tests/data/reference_plans.json``)."""

import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"


def _recorder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("record_reference_plans",
                                                  DATA / "record_reference_plans.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", ["deit_small", "swin_tiny", "flatten_swin_tiny"])
def test_plan_and_weights_match_recording(case, one_thread):
    recorded = json.loads((DATA / "reference_plans.json").read_text())[case]
    now = _recorder().fingerprint(case)
    assert now["plan"] == recorded["plan"]
    assert now["weights"] == recorded["weights"]
