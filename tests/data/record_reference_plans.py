"""Record the plans and pruned weights of three real models, to check that a refactor of
fxprune changes neither (``tests/planning/test_reference_plans.py`` compares against the JSON).

    python tests/data/record_reference_plans.py tests/data/reference_plans.json

Only public API is used, so the script runs on any fxprune version that has ``prune``.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch

import fxprune

CASES = {
    "deit_small": ("timm", "deit_small_patch16_224", 224),
    "swin_tiny": ("timm", "swin_tiny_patch4_window7_224", 224),
    "flatten_swin_tiny": ("fxprune", "flatten_swin_tiny", 224),
}


def build(case: str):
    source, name, size = CASES[case]
    torch.manual_seed(0)
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
    else:
        from fxprune.models import flatten

        model = getattr(flatten, name)()
    return model.eval(), torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def pruned_and_original(case: str):
    """The case's pruned model and the original it was pruned from."""
    model, x = build(case)
    return fxprune.prune(model, x, macs_ratio=0.7, criterion="similarity", align=8), model


def fingerprint(case: str, pruned=None) -> dict:
    """Digests of the plan's kept indices and the pruned tensors' shapes. Weight VALUES are
    not recorded: random initialisation differs in the last bits between CPUs (vectorised
    kernels), so the test checks instead that every pruned tensor is exactly the original's
    entries at the plan's indices."""
    if pruned is None:
        pruned, _ = pruned_and_original(case)
    plan = {name: {str(dim): digest(kept.to(torch.int64)) for dim, kept in sorted(dims.items())}
            for name, dims in sorted(pruned.meta["fxprune.plan"].items())}
    shapes = {name: list(t.shape) for name, t in sorted(pruned.state_dict().items())}
    return {"plan": plan, "shapes": shapes}


if __name__ == "__main__":
    out = {case: fingerprint(case) for case in CASES}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    print({case: len(v["plan"]) for case, v in out.items()})
