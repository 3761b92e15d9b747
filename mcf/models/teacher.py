"""The frozen perceptual teacher: a timm ViT whose intermediate token features supervise the decoder."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention, VisionTransformer

from mcf.models.arch import ViTArch
from mcf.models.attention import attention
from mcf.models.layers import call_block


def timm_vit(arch: ViTArch) -> VisionTransformer:
    """A headless timm ViT of shape ``arch`` (the layout of the MoCo v3 / MAE / timm checkpoints)."""
    return VisionTransformer(img_size=arch.img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim,
                             depth=arch.depth, num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, qkv_bias=True,
                             num_classes=0, global_pool="token", norm_layer=partial(nn.LayerNorm, eps=1e-6))


class DispatchedAttention(nn.Module):
    """timm's ``Attention`` (the same submodules, so the same state-dict keys) computing through
    mcf's attention dispatch (``backend``: ``auto`` by default) instead of always calling SDPA."""

    def __init__(self, timm_attn: Attention, backend: str = "auto"):
        super().__init__()
        if timm_attn.gate is not None or timm_attn.attn_drop.p:
            raise ValueError("DispatchedAttention takes timm attention without a gate or attention dropout")
        self.num_heads, self.head_dim, self.attn_dim = timm_attn.num_heads, timm_attn.head_dim, timm_attn.attn_dim
        self.backend = backend
        self.qkv, self.q_norm, self.k_norm = timm_attn.qkv, timm_attn.q_norm, timm_attn.k_norm
        self.norm, self.proj, self.proj_drop = timm_attn.norm, timm_attn.proj, timm_attn.proj_drop

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("the teacher attends to every token: no attention mask")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(qkv[0]), self.k_norm(qkv[1])  # (B, H, N, hd)
        x = attention(q, k, qkv[2], None, self.backend)
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))))


# the teachers' architectures: a ViT like any other (timm's, where the encoders are mcf's MaskedViT)
TEACHERS: dict[str, ViTArch] = {
    "vit_base_patch16": ViTArch(),  # the paper's MoCo v3 ViT-B/16
    "vit_small_patch16": ViTArch(embed_dim=384, num_heads=6),
    "vit_large_patch16": ViTArch(embed_dim=1024, depth=24, num_heads=16),
    "vit_tiny_debug": ViTArch(img_size=32, patch_size=4, embed_dim=64, depth=12, num_heads=2),
}


class PerceptualTeacher(nn.Module):
    """A frozen timm ViT: no gradients, always in eval mode, never in the optimizer or the run state.

    ``features(x, layers)`` returns the token outputs (class token included, before the final norm)
    of the given blocks, ``[N, 1 + L, D]`` each.
    """

    def __init__(self, spec: ViTArch, name: str = "custom"):
        super().__init__()
        self.spec, self.name = spec, name
        self.model = timm_vit(spec)
        for blk in self.model.blocks:
            blk.attn = DispatchedAttention(blk.attn)
        self.grad_checkpointing = False
        self.requires_grad_(False)
        self.eval()

    @property
    def img_size(self) -> int:
        return self.spec.img_size

    def train(self, mode: bool = True) -> PerceptualTeacher:  # noqa: ARG002 - frozen: stays in eval mode
        return super().train(False)

    def set_attention_backend(self, backend: str) -> None:
        """``auto | sdpa | sdpa_fp32 | math | triton`` for every block (see ``mcf.models.attention``)."""
        for blk in self.model.blocks:
            blk.attn.backend = backend

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward through the rebuilt image instead of keeping its
        activations (the pass over the original image runs without autograd and keeps none)."""
        self.grad_checkpointing = enable

    def features(self, x: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        m = self.model
        x = m.patch_embed(x)
        x = m._pos_embed(x)  # class token + position embedding, as timm does
        x = m.norm_pre(x)
        wanted, out, last = set(layers), [], max(layers)
        for i, blk in enumerate(m.blocks):
            x = call_block(blk, self.grad_checkpointing, x)
            if i in wanted:
                out.append(x)
            if i == last:
                break
        return out
