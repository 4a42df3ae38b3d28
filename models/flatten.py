"""FLatten Transformer models: one import for :mod:`.flatten_attention` and :mod:`.flatten_swin`.

Example:
    >>> import torch
    >>> from fxprune.models.flatten import flatten_swin_nano
    >>> flatten_swin_nano()(torch.randn(1, 3, 32, 32)).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

from .flatten_attention import (
    FocusedLinearAttention,
    WindowAttention,
    shift_mask,
    window_partition,
    window_reverse,
)
from .flatten_swin import (
    FLattenBlock,
    FLattenSwin,
    PatchEmbed,
    PatchMerging,
    SwinBlock,
    flatten_swin_base,
    flatten_swin_nano,
    flatten_swin_small,
    flatten_swin_tiny,
)

__all__ = ["FLattenBlock", "FLattenSwin", "FocusedLinearAttention", "PatchEmbed",
           "PatchMerging", "SwinBlock", "WindowAttention", "flatten_swin_base",
           "flatten_swin_nano", "flatten_swin_small", "flatten_swin_tiny", "shift_mask",
           "window_partition", "window_reverse"]
