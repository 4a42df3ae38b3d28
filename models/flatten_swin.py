"""FLatten-Swin: a Swin Transformer whose first stages use focused linear attention.

FLatten Transformer (Han et al., ICCV 2023) replaces the shifted-window softmax attention of
Swin's high-resolution stages by :class:`~fxprune.models.flatten_attention.FocusedLinearAttention`
over the whole feature map (one global window, no shift: 56x56 and 28x28 tokens at 224px); the
later stages keep Swin's window attention (window 7, every second block shifted). Everything
else is Swin: a patch-embedding conv with LayerNorm, pre-norm blocks with a 4x MLP, patch
merging between stages, a final norm, mean pooling and a linear head. Weights are random.

Written from the paper's description to trace with ``torch.fx.symbolic_trace``: no Python
control flow depends on tensor values, and every size except the batch is a configuration int.

Example:
    >>> import torch
    >>> from fxprune.models.flatten_swin import flatten_swin_nano
    >>> model = flatten_swin_nano()
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> gm = torch.fx.symbolic_trace(model)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .flatten_attention import (
    FocusedLinearAttention,
    WindowAttention,
    check_positive_int,
    shift_mask,
    window_partition,
    window_reverse,
)
from .reference import Mlp

__all__ = ["FLattenBlock", "FLattenSwin", "PatchEmbed", "PatchMerging", "SwinBlock",
           "flatten_swin_base", "flatten_swin_nano", "flatten_swin_small", "flatten_swin_tiny"]


def clip_window(resolution: tuple[int, int], window_size: int) -> tuple[int, bool]:
    """Swin's rule: a map no bigger than the window is one window, and is not shifted.

    Returns ``(window, may_shift)``.

    Example:
        >>> clip_window((14, 14), 7), clip_window((7, 7), 7), clip_window((2, 2), 4)
        ((7, True), (7, False), (2, False))
    """
    smallest = min(resolution)
    if smallest <= window_size:
        return smallest, False
    return window_size, True


class FLattenBlock(nn.Module):
    """Pre-norm block with focused linear attention over the whole ``H x W`` map.

    Example:
        >>> FLattenBlock(32, 2, (4, 4))(torch.randn(2, 16, 32)).shape
        torch.Size([2, 16, 32])
    """

    def __init__(self, dim: int, num_heads: int, resolution: tuple[int, int],
                 mlp_ratio: float = 4.0, focusing_factor: float = 3, kernel_size: int = 5,
                 qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = FocusedLinearAttention(dim, num_heads, resolution,
                                           focusing_factor=focusing_factor,
                                           kernel_size=kernel_size, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SwinBlock(nn.Module):
    """Pre-norm Swin block: window attention (shifted by half a window when ``shift``), MLP.

    The window is clipped to the map (see :func:`clip_window`); the shift mask is a buffer
    computed once, so the forward has no data-dependent control flow.

    Example:
        >>> blk = SwinBlock(32, 2, (4, 4), window_size=2, shift=True)
        >>> blk.shift_size, tuple(blk.attn_mask.shape)
        (1, (4, 4, 4))
        >>> blk(torch.randn(2, 16, 32)).shape
        torch.Size([2, 16, 32])
    """

    def __init__(self, dim: int, num_heads: int, resolution: tuple[int, int],
                 window_size: int = 7, shift: bool = False, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True):
        super().__init__()
        check_positive_int("window_size", window_size)
        self.dim = dim
        self.resolution = (int(resolution[0]), int(resolution[1]))
        H, W = self.resolution
        self.window_size, may_shift = clip_window(self.resolution, window_size)
        if H % self.window_size or W % self.window_size:
            raise ValueError(f"window_size {self.window_size} does not divide the block's "
                             f"resolution {H}x{W}")
        self.shift_size = self.window_size // 2 if shift and may_shift else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shift_mask(H, W, self.window_size, self.shift_size) if self.shift_size else None
        self.register_buffer("attn_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (H, W), C, w, s = self.resolution, self.dim, self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).reshape(-1, H, W, C)
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        windows = self.attn(window_partition(x, H, W, w, C), self.attn_mask)
        x = window_reverse(windows, H, W, w, C)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        x = shortcut + x.reshape(-1, H * W, C)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Strided conv into ``patch_size`` patches, then LayerNorm: ``(B, C_in, H, W) -> (B, N, D)``.

    Example:
        >>> PatchEmbed(16, 4, 3, 24)(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 16, 24])
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.grid_size = img_size // patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class PatchMerging(nn.Module):
    """Swin's downsampling: each 2x2 neighbourhood's tokens concatenated (``4C``), LayerNorm,
    ``Linear(4C, 2C, bias=False)``: ``(B, H*W, C) -> (B, H*W/4, 2C)``.

    Example:
        >>> PatchMerging((4, 6), 8)(torch.randn(2, 24, 8)).shape
        torch.Size([2, 6, 16])
    """

    def __init__(self, resolution: tuple[int, int], dim: int):
        super().__init__()
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.dim = dim
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (H, W), C = self.resolution, self.dim
        x = x.reshape(-1, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5)
        x = x.reshape(-1, (H // 2) * (W // 2), 4 * C)
        return self.reduction(self.norm(x))


class Stage(nn.Module):
    """The blocks of one resolution, then (except in the last stage) patch merging."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        return x if self.downsample is None else self.downsample(x)


class FLattenSwin(nn.Module):
    """FLatten-Swin (see the module docstring). Stages ``< linear_stages`` use focused linear
    attention, the others shifted-window attention.

    ``img_size`` must be a multiple of ``patch_size``, the patch grid a multiple of
    ``2 ** (len(depths) - 1)`` (each merging halves it), and ``window_size`` (after clipping
    to small maps) must divide the map of every window-attention stage.

    Example:
        >>> model = FLattenSwin(img_size=16, patch_size=2, num_classes=5, embed_dim=8,
        ...                     depths=(1, 2), num_heads=(2, 2), window_size=2,
        ...                     linear_stages=1)
        >>> [s.blocks[-1].attn.__class__.__name__ for s in model.stages]
        ['FocusedLinearAttention', 'WindowAttention']
        >>> model(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 5])
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, focusing_factor: float = 3,
                 kernel_size: int = 5, linear_stages: int = 2):
        super().__init__()
        resolutions, windows = self._validate(img_size, patch_size, in_chans, num_classes,
                                              embed_dim, depths, num_heads, window_size,
                                              mlp_ratio, linear_stages)
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.linear_stages = linear_stages
        self.windows = windows
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        stages = []
        for i, (depth, heads, res) in enumerate(zip(depths, num_heads, resolutions)):
            dim = embed_dim * 2 ** i
            if i < linear_stages:
                blocks = [FLattenBlock(dim, heads, res, mlp_ratio=mlp_ratio,
                                       focusing_factor=focusing_factor, kernel_size=kernel_size)
                          for _ in range(depth)]
            else:
                blocks = [SwinBlock(dim, heads, res, window_size=window_size, shift=j % 2 == 1,
                                    mlp_ratio=mlp_ratio)
                          for j in range(depth)]
            last = i == len(depths) - 1
            stages.append(Stage(blocks, None if last else PatchMerging(res, dim)))
        self.stages = nn.Sequential(*stages)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)
        self._init_weights()

    @staticmethod
    def _validate(img_size, patch_size, in_chans, num_classes, embed_dim, depths, num_heads,
                  window_size, mlp_ratio, linear_stages):
        for name, value in (("img_size", img_size), ("patch_size", patch_size),
                            ("in_chans", in_chans), ("num_classes", num_classes),
                            ("embed_dim", embed_dim), ("window_size", window_size)):
            check_positive_int(name, value)
        depths, num_heads = tuple(depths), tuple(num_heads)
        if not depths or len(depths) != len(num_heads):
            raise ValueError(f"depths and num_heads need one entry per stage, got depths "
                             f"{depths} and num_heads {num_heads}")
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            check_positive_int(f"depths[{i}]", depth)
            check_positive_int(f"num_heads[{i}]", heads)
            dim = embed_dim * 2 ** i
            if dim % heads:
                raise ValueError(f"stage {i + 1} has width embed_dim * 2**{i} = {dim}, which "
                                 f"is not divisible by num_heads[{i}] = {heads}")
        if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
            raise ValueError(f"mlp_ratio must be a number > 0, got {mlp_ratio!r}")
        stages = len(depths)
        if isinstance(linear_stages, bool) or not isinstance(linear_stages, int) \
                or not 0 <= linear_stages <= stages:
            raise ValueError(f"linear_stages must be an int in [0, {stages}] (the number of "
                             f"stages), got {linear_stages!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        grid = img_size // patch_size
        if grid % 2 ** (stages - 1):
            raise ValueError(f"the patch grid {grid} (img_size {img_size} / patch_size "
                             f"{patch_size}) must be divisible by 2**{stages - 1} = "
                             f"{2 ** (stages - 1)}: each of the {stages - 1} patch mergings "
                             f"halves it")
        resolutions = [(grid >> i, grid >> i) for i in range(stages)]
        windows = []
        for i, res in enumerate(resolutions):
            if i < linear_stages:
                windows.append(res[0])  # one global window
                continue
            window, _ = clip_window(res, window_size)
            if res[0] % window or res[1] % window:
                raise ValueError(f"window_size {window_size} does not divide stage {i + 1}'s "
                                 f"resolution {res[0]}x{res[1]} (img_size {img_size}); use a "
                                 f"window that divides {res[0]}, or another img_size")
            windows.append(window)
        return resolutions, tuple(windows)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        # Under torch.fx symbolic tracing the input is a Proxy with no shape to check (and an
        # `if` on it would fail). Under torch.export, fake or meta tensors the dims are ints or
        # SymInts and the comparison below works as on real tensors.
        if isinstance(x, torch.fx.Proxy):
            return
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"FLattenSwin expects input of shape (B, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}) (B, in_chans, img_size, img_size), "
                             f"got {tuple(x.shape)}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self.stages(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.forward_features(x)
        return self.head(x.mean(dim=1))


def _build(defaults: dict, img_size: int, num_classes: int, overrides: dict) -> FLattenSwin:
    return FLattenSwin(img_size=img_size, num_classes=num_classes, **{**defaults, **overrides})


def flatten_swin_tiny(img_size: int = 224, num_classes: int = 1000, **kw) -> FLattenSwin:
    """FLatten-Swin-T: embed 96, depths 2-2-6-2, heads 3-6-12-24 (29M params, 4.5 GMACs at
    224px). Keyword arguments override :class:`FLattenSwin`'s.

    Example:
        >>> with torch.device("meta"):
        ...     model = flatten_swin_tiny()
        >>> round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        29.2
    """
    return _build(dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
                  img_size, num_classes, kw)


def flatten_swin_small(img_size: int = 224, num_classes: int = 1000, **kw) -> FLattenSwin:
    """FLatten-Swin-S: embed 96, depths 2-2-18-2, heads 3-6-12-24 (51M params, 8.7 GMACs)."""
    return _build(dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
                  img_size, num_classes, kw)


def flatten_swin_base(img_size: int = 224, num_classes: int = 1000, **kw) -> FLattenSwin:
    """FLatten-Swin-B: embed 128, depths 2-2-18-2, heads 4-8-16-32 (89M params, 15.4 GMACs)."""
    return _build(dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
                  img_size, num_classes, kw)


def flatten_swin_nano(img_size: int = 32, num_classes: int = 10, in_chans: int = 3,
                      patch_size: int = 2, **kw) -> FLattenSwin:
    """A tiny FLatten-Swin for tests and small data: patch 2, embed 16, one block per stage,
    heads 2-2-4-4, window 4 (32px: 16x16 and 8x8 linear-attention maps, then 4x4 and 2x2 maps
    in one window each). For scikit-learn's 8x8 grey digits use
    ``flatten_swin_nano(img_size=8, in_chans=1, patch_size=1)``.

    Example:
        >>> model = flatten_swin_nano(img_size=8, in_chans=1, patch_size=1)
        >>> model.windows, model(torch.randn(2, 1, 8, 8)).shape
        ((8, 4, 2, 1), torch.Size([2, 10]))
    """
    defaults = dict(in_chans=in_chans, patch_size=patch_size, embed_dim=16, depths=(1, 1, 1, 1),
                    num_heads=(2, 2, 4, 4), window_size=4)
    return _build(defaults, img_size, num_classes, kw)
