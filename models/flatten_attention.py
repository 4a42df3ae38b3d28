"""The two attention kinds of FLatten-Swin: focused linear attention and Swin window attention.

:class:`FocusedLinearAttention` is FLatten Transformer's attention (Han et al., ICCV 2023): a
kernelised linear attention whose feature map ``ReLU(x)**p`` (renormalised to keep ``|x|``)
sharpens the attention distribution, plus a depthwise conv on ``v`` that restores the rank the
linear form loses. It attends over the whole token map at once, so its cost is linear in the
number of tokens. :class:`WindowAttention` is Swin's softmax attention inside non-overlapping
windows with a learned relative position bias per head.

Both trace with ``torch.fx.symbolic_trace``: the batch size is the only size read off the input;
every other size is an int fixed by the configuration, so a pass can find (and rewrite) head
counts and widths as graph constants.

Example:
    >>> import torch
    >>> from fxprune.models.flatten_attention import FocusedLinearAttention, WindowAttention
    >>> FocusedLinearAttention(32, num_heads=2, resolution=(4, 4))(torch.randn(2, 16, 32)).shape
    torch.Size([2, 16, 32])
    >>> WindowAttention(32, num_heads=2, window_size=2)(torch.randn(8, 4, 32)).shape
    torch.Size([8, 4, 32])
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FocusedLinearAttention", "WindowAttention", "check_positive_int",
           "relative_position_index", "shift_mask", "window_partition", "window_reverse"]


def check_positive_int(name: str, value, allowed: str = "a positive int") -> int:
    """Return ``value`` if it is an int >= 1, else raise a ValueError naming ``name``.

    Example:
        >>> check_positive_int("depth", 0)
        Traceback (most recent call last):
        ...
        ValueError: depth must be a positive int, got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def _check_heads(dim: int, num_heads: int) -> None:
    check_positive_int("dim", dim)
    check_positive_int("num_heads", num_heads)
    if dim % num_heads:
        raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads} "
                         f"(every head needs dim / num_heads channels)")


class FocusedLinearAttention(nn.Module):
    """FLatten's focused linear attention over an ``H x W`` token map: ``(B, N, C) -> (B, N, C)``.

    ``q`` and ``k`` go through ``ReLU + 1e-6``, are divided by a learned per-channel
    ``softplus(scale)`` and focused with ``x -> x**p * |x| / |x**p|`` (norms over all ``C``
    channels). Per head, ``out = q (k^T v) / (q . mean(k))``, computed without the ``N x N``
    matrix, plus a depthwise ``kernel_size`` conv of ``v``'s map; the conv has ``C / num_heads``
    channels and is shared by all heads. ``k`` gets a learned positional encoding
    ``(1, N, C)`` before the kernel.

    Example:
        >>> attn = FocusedLinearAttention(48, num_heads=3, resolution=(4, 2))
        >>> attn.dwc.weight.shape, attn.positional_encoding.shape
        (torch.Size([16, 1, 5, 5]), torch.Size([1, 8, 48]))
        >>> attn(torch.randn(2, 8, 48)).shape
        torch.Size([2, 8, 48])
    """

    def __init__(self, dim: int, num_heads: int, resolution: tuple[int, int],
                 focusing_factor: float = 3, kernel_size: int = 5, qkv_bias: bool = True):
        super().__init__()
        _check_heads(dim, num_heads)
        if not (isinstance(resolution, (tuple, list)) and len(resolution) == 2
                and all(isinstance(r, numbers.Integral) and not isinstance(r, bool) and r > 0
                        for r in resolution)):
            raise ValueError(f"resolution must be a pair of positive ints (H, W), "
                             f"got {resolution!r}")
        if (isinstance(focusing_factor, bool) or not isinstance(focusing_factor, numbers.Real)
                or not math.isfinite(focusing_factor) or focusing_factor <= 0):
            raise ValueError(f"focusing_factor must be a finite number > 0 (FLatten uses 3), "
                             f"got {focusing_factor!r}")
        check_positive_int("kernel_size", kernel_size, "a positive odd int (FLatten uses 5)")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int (FLatten uses 5), "
                             f"got {kernel_size!r}: an even kernel cannot keep the map's size")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.num_tokens = self.resolution[0] * self.resolution[1]
        self.focusing_factor = focusing_factor
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.positional_encoding = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size,
                             padding=kernel_size // 2, groups=self.head_dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.positional_encoding, std=0.02)

    def _focus(self, t: torch.Tensor) -> torch.Tensor:
        norm = t.norm(dim=-1, keepdim=True)
        t = t ** self.focusing_factor
        return (t / t.norm(dim=-1, keepdim=True)) * norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        N, C, h, d = self.num_tokens, self.dim, self.num_heads, self.head_dim
        H, W = self.resolution
        q, k, v = self.qkv(x).reshape(B, N, 3, C).unbind(2)
        k = k + self.positional_encoding
        scale = F.softplus(self.scale)
        q = (F.relu(q) + 1e-6) / scale
        k = (F.relu(k) + 1e-6) / scale
        q = self._focus(q)
        k = self._focus(k)
        q = q.reshape(B, N, h, d).transpose(1, 2)
        k = k.reshape(B, N, h, d).transpose(1, 2)
        v = v.reshape(B, N, h, d).transpose(1, 2)
        z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        # both factors scaled by N**-0.5 so k^T v stays O(1) whatever the map size
        kv = (k.transpose(-2, -1) * (N ** -0.5)) @ (v * (N ** -0.5))
        out = q @ kv * z
        fm = v.transpose(-2, -1).reshape(B * h, d, H, W)
        fm = self.dwc(fm).reshape(B, h, d, N).transpose(-2, -1)
        out = out + fm
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out)


def relative_position_index(window_size: int) -> torch.Tensor:
    """``(w*w, w*w)`` index into a ``((2w-1)**2, heads)`` bias table: the entry for tokens
    ``i, j`` of a window encodes their offset ``(dy, dx)``, each in ``[-(w-1), w-1]``.

    Example:
        >>> relative_position_index(2)
        tensor([[4, 3, 1, 0],
                [5, 4, 2, 1],
                [7, 6, 4, 3],
                [8, 7, 5, 4]])
    """
    w = window_size
    pos = torch.arange(w * w)
    y, x = pos // w, pos % w
    dy = y[:, None] - y[None, :] + (w - 1)
    dx = x[:, None] - x[None, :] + (w - 1)
    return dy * (2 * w - 1) + dx


class WindowAttention(nn.Module):
    """Swin's multi-head softmax attention inside windows: ``(B * nW, w*w, C) -> same``.

    Scores are ``q k^T * head_dim**-0.5`` plus a learned bias per head and relative offset;
    ``mask`` (``(nW, w*w, w*w)``, 0 or a large negative number, see :func:`shift_mask`) keeps
    shifted windows from mixing regions that are not adjacent in the image.

    Example:
        >>> attn = WindowAttention(32, num_heads=4, window_size=3)
        >>> attn.relative_position_bias_table.shape
        torch.Size([25, 4])
        >>> attn(torch.randn(2, 9, 32)).shape
        torch.Size([2, 9, 32])
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True):
        super().__init__()
        _check_heads(dim, num_heads)
        check_positive_int("window_size", window_size)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.num_tokens = window_size * window_size
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        N, C, h, d = self.num_tokens, self.dim, self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(-1, N, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(N, N, h).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            # windows of one image are consecutive in the batch dim (see window_partition)
            attn = attn.view(-1, mask.shape[0], h, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, h, N, N)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(-1, N, C)
        return self.proj(out)


def window_partition(x: torch.Tensor, height: int, width: int, window: int,
                     channels: int) -> torch.Tensor:
    """``(B, H, W, C) -> (B * nW, w*w, C)``, the windows of each image consecutive, row-major.

    Example:
        >>> window_partition(torch.arange(16.).view(1, 4, 4, 1), 4, 4, 2, 1)[1].flatten()
        tensor([2., 3., 6., 7.])
    """
    x = x.reshape(-1, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_reverse(windows: torch.Tensor, height: int, width: int, window: int,
                   channels: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, w*w, C) -> (B, H, W, C)``.

    Example:
        >>> x = torch.randn(2, 4, 6, 3)
        >>> torch.equal(window_reverse(window_partition(x, 4, 6, 2, 3), 4, 6, 2, 3), x)
        True
    """
    x = windows.reshape(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def shift_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """Additive attention mask ``(nW, w*w, w*w)`` for windows of a map rolled by ``-shift``.

    After the roll, the last ``window`` rows (and columns) of the map hold pixels from up to
    two regions of the image that are not neighbours (the wrapped-around strip of ``shift``
    rows and the rows before it). Tokens of different regions get -100 (``exp`` of which is 0
    in fp32 next to any real score), tokens of the same region 0.

    Example:
        >>> m = shift_mask(4, 4, 2, 1)
        >>> m.shape, int((m[0] != 0).sum()), int((m[3] != 0).sum())
        (torch.Size([4, 4, 4]), 0, 12)
    """
    def region(size: int) -> torch.Tensor:
        pos = torch.arange(size)
        return (pos >= size - window).long() + (pos >= size - shift).long()

    label = region(height)[:, None] * 3 + region(width)[None, :]
    label = window_partition(label.view(1, height, width, 1), height, width, window, 1)
    label = label.squeeze(-1)
    different = label.unsqueeze(1) != label.unsqueeze(2)
    return torch.zeros(different.shape).masked_fill(different, -100.0)
