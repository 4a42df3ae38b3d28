"""Small reference vision transformers, in plain PyTorch.

These models are what the library's own tests, examples and demo run on. They follow the layout
of a timm ``VisionTransformer`` (patch-embedding conv, class token, learned position embedding,
pre-norm blocks with a fused ``qkv`` Linear and ``F.scaled_dot_product_attention``, an MLP of
``fc1 -> GELU -> fc2``, a final norm and a linear head) but have no timm dependency, and are
written to trace with ``torch.fx.symbolic_trace``: no Python control flow depends on tensor
values, only on the configuration.

Example:
    >>> import torch
    >>> from fxprune.models.reference import tiny_vit
    >>> model = tiny_vit()
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> gm = torch.fx.symbolic_trace(model)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "Block", "Mlp", "PatchEmbed", "VisionTransformer", "digits_vit",
           "tiny_vit"]


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv: ``(B, C_in, H, W) -> (B, N, D)``.

    Example:
        >>> PatchEmbed(32, 8, 3, 48)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 16, 48])
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size * self.grid_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head softmax self-attention with a fused qkv projection.

    With ``qk_dim=None`` every head has ``dim // num_heads`` channels for q, k and v, and the
    projection output is reshaped to ``(B, N, 3, H, D)``, permuted and unbound (as in timm).
    With ``qk_dim`` set, q and k have ``qk_dim`` channels per head while v keeps
    ``dim // num_heads``; the fused projection then has ``H * (2 * qk_dim + v_dim)`` outputs and
    is split with ``torch.split``. Scores are scaled by ``qk_dim ** -0.5`` (the SDPA default).

    Example:
        >>> attn = Attention(48, num_heads=3, qk_dim=8)
        >>> attn.qkv.out_features, attn(torch.randn(2, 5, 48)).shape
        (96, torch.Size([2, 5, 48]))
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 qk_dim: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.v_head_dim = dim // num_heads
        self.fused_split = qk_dim is not None
        self.qk_head_dim = self.v_head_dim if qk_dim is None else qk_dim
        out = num_heads * (2 * self.qk_head_dim + self.v_head_dim)
        self.qkv = nn.Linear(dim, out, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * self.v_head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H = self.num_heads
        if self.fused_split:
            q, k, v = torch.split(
                self.qkv(x),
                [H * self.qk_head_dim, H * self.qk_head_dim, H * self.v_head_dim], dim=-1)
            q = q.reshape(B, N, H, self.qk_head_dim).permute(0, 2, 1, 3)
            k = k.reshape(B, N, H, self.qk_head_dim).permute(0, 2, 1, 3)
            v = v.reshape(B, N, H, self.v_head_dim).permute(0, 2, 1, 3)
        else:
            qkv = self.qkv(x).reshape(B, N, 3, H, self.v_head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, H * self.v_head_dim)
        return self.proj(x)


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2``.

    Example:
        >>> Mlp(48, 192)(torch.randn(2, 5, 48)).shape
        torch.Size([2, 5, 48])
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Example:
        >>> Block(48, 3, mlp_ratio=4.0)(torch.randn(2, 5, 48)).shape
        torch.Size([2, 5, 48])
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_dim=qk_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """A small ViT. Classifies from the class token, or by mean pooling without one.

    Example:
        >>> model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1,
        ...                           num_heads=2, class_token=False)
        >>> model(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, img_size: int = 32, patch_size: int = 8, in_chans: int = 3,
                 num_classes: int = 10, embed_dim: int = 48, depth: int = 2, num_heads: int = 3,
                 mlp_ratio: float = 4.0, qk_dim: int | None = None, qkv_bias: bool = True,
                 class_token: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_tokens = self.patch_embed.num_patches + (1 if class_token else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_dim=qk_dim)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.head(x)


def tiny_vit(img_size: int = 32, patch_size: int = 8, in_chans: int = 3, num_classes: int = 10,
             embed_dim: int = 48, depth: int = 2, num_heads: int = 3, mlp_ratio: float = 4.0,
             qk_dim: int | None = None, qkv_bias: bool = True,
             class_token: bool = True) -> VisionTransformer:
    """A tiny ViT (defaults: 32x32 RGB, 16 patches + class token, width 48, 2 blocks, 3 heads).

    ``qk_dim`` (per head) lets the q/k head dim differ from the v head dim
    (``embed_dim // num_heads``).

    Example:
        >>> model = tiny_vit(qk_dim=16)
        >>> model.blocks[0].attn.qkv.out_features   # 3 heads * (16 + 16 + 16)
        144
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                             num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, qk_dim=qk_dim,
                             qkv_bias=qkv_bias, class_token=class_token)


def digits_vit(**overrides) -> VisionTransformer:
    """ViT for scikit-learn's 8x8 grayscale digits: patch 2 (16 patches + class token),
    width 64, 4 blocks, 4 heads, MLP ratio 2, 10 classes. Keyword arguments override.

    Example:
        >>> model = digits_vit()
        >>> model(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    cfg = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4,
               num_heads=4, mlp_ratio=2.0)
    cfg.update(overrides)
    return VisionTransformer(**cfg)
