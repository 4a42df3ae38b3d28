"""Plans of DeiT-S, Swin-T (timm) and FLatten-Swin-T are identical to the ones recorded
before fxprune's package layout was reorganised (``tests/data/record_reference_plans.py``
wrote ``tests/data/reference_plans.json``), and their pruned weights are exactly the
original's entries at the plan's indices. The recording held weight digests once; random
initialisation differs in the last bits between CPUs, so those were replaced by the shapes
(derived from the same plans) and the check against the original model."""

import json
from pathlib import Path

import pytest
import torch

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
    recorder = _recorder()
    pruned, original = recorder.pruned_and_original(case)
    now = recorder.fingerprint(case, pruned)
    assert now["plan"] == recorded["plan"]
    assert now["shapes"] == recorded["shapes"]
    # the weights: exactly the original's entries at the plan's indices, nothing rescaled
    plan, dense = pruned.meta["fxprune.plan"], original.state_dict()
    checked = 0
    for name, tensor in pruned.state_dict().items():
        if name not in dense:  # a constant the trace lifted (_tensor_constant0): not a weight
            assert name.startswith("_tensor_constant"), name
            continue
        checked += 1
        expected = dense[name]
        for dim, kept in plan.get(name, {}).items():
            expected = expected.index_select(int(dim), kept)
        assert torch.equal(tensor, expected), name
    # every parameter was checked (buffers the trace turned into constants are not weights)
    params = {name for name, _ in original.named_parameters()}
    assert params <= set(pruned.state_dict()) and checked >= len(params)
