"""Transformer primitives with timm's parameter names, so checkpoints map one to one."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from mcf.errors import ConfigError
from mcf.models.attention import attention

LN_EPS = 1e-6


def make_norm(dim: int, impl: str = "torch") -> nn.Module:
    """LayerNorm (eps 1e-6): torch's, or NVIDIA apex's FusedLayerNorm when asked and installed."""
    if impl == "torch":
        return nn.LayerNorm(dim, eps=LN_EPS)
    if impl == "apex":
        try:
            from apex.normalization import FusedLayerNorm
        except ImportError:
            raise ConfigError(
                "model.norm_impl=apex needs NVIDIA apex, which is not installed (it is not on PyPI: build it from "
                "NVIDIA's apex repository, or use norm_impl=torch)"
            ) from None
        return FusedLayerNorm(dim, eps=LN_EPS)
    raise ConfigError(f"unknown model.norm_impl '{impl}' (torch or apex)")


class PatchEmbed(nn.Module):
    """``[N, 3, H, W] -> [N, (H/p)(W/p), D]`` by a stride-p convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, L, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S, C = x.shape
        qkv = self.qkv(x).reshape(B, S, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, S, hd)
        x = attention(q, k, v, key_mask, self.backend)
        return self.proj(x.transpose(1, 2).reshape(B, S, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block`` layout: norm1, attn, norm2, mlp)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_impl: str = "torch", backend: str = "auto"
    ):
        super().__init__()
        self.norm1 = make_norm(dim, norm_impl)
        self.attn = Attention(dim, num_heads, backend)
        self.norm2 = make_norm(dim, norm_impl)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


def call_block(block: nn.Module, checkpointed: bool, *args: torch.Tensor | None) -> torch.Tensor:
    """``block(*args)``; when ``checkpointed`` and autograd is recording, the block's activations are
    not kept but recomputed in the backward (``torch.utils.checkpoint``, non-reentrant: the same
    gradients, one more forward of the block, only its input kept)."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def init_weights_(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform linears, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) or type(m).__name__ == "FusedLayerNorm":
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
