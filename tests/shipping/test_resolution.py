"""Input flexibility: a pruned model takes the input sizes its graph allows. Where the graph
was traced with sizes as constants (torchvision's Swin: its window attention is inlined with
the traced spatial size), the limitation is stated: a warning from ``fxprune.prune``, the
calls in ``meta["fxprune.fixed_sizes"]`` and the plan's ``info``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxprune
from exactness import outputs, rel_err, zeroed_original
from fxprune.meta import FIXED_SIZES_KEY, PLAN_DATA_KEY


class _Block(nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class _AnySizeViT(nn.Module):
    """No position table: any multiple of the patch size is a valid input."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 4, 4)
        self.blocks = nn.Sequential(_Block(), _Block())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


def test_pruned_model_keeps_the_input_flexibility_of_its_graph():
    torch.manual_seed(0)
    model = _AnySizeViT().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing fixed: nothing to warn about
        pruned = fxprune.prune(model, torch.randn(1, 3, 16, 16), macs_ratio=0.6, align=4)
    assert FIXED_SIZES_KEY not in pruned.meta
    zeroed = zeroed_original(model, pruned.meta["fxprune.plan"])
    for size in (16, 24, 32):
        x = torch.randn(3, 3, size, size)
        assert rel_err(outputs(pruned, x), outputs(zeroed, x)) < 1e-5


def test_traced_sizes_baked_in_are_stated():
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                            window_size=[4, 4], num_classes=10).eval()
    with pytest.warns(UserWarning, match=r"runs at the traced input size only \(\(3, 32, 32\) "
                      r"after the batch dim; any batch size\).*shifted_window_attention"):
        pruned = fxprune.prune(model, torch.randn(1, 3, 32, 32), macs_ratio=0.7, align=1)
    fixed = pruned.meta[FIXED_SIZES_KEY]
    assert any(f.startswith("shifted_window_attention") for f in fixed)
    assert pruned.meta[PLAN_DATA_KEY].info["fixed_sizes"] == fixed
    assert pruned(torch.randn(3, 3, 32, 32)).shape == (3, 10)   # the batch stays free
    bigger = torch.randn(1, 3, 48, 48)
    assert model(bigger).shape == (1, 10)                       # the dense model takes 48
    with pytest.raises(RuntimeError):                           # the pruned one does not
        pruned(bigger)
