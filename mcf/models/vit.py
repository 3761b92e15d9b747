"""The MAE-style ViT encoder (timm parameter layout) with random masking."""

from __future__ import annotations

import torch
import torch.nn as nn

from mcf.models.layers import Block, PatchEmbed, call_block, init_weights_, make_norm
from mcf.models.masking import Masking, random_masking
from mcf.models.pos_embed import sincos_2d


class MaskedViT(nn.Module):
    """ViT encoder with fixed sin-cos position embeddings, applied to the visible patches only.

    Parameter names match timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
    ``pos_embed``, ``blocks.i.*``, ``norm``), so the exported state dict loads into timm as is.
    """

    def __init__(
        self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, depth: int = 12,
        num_heads: int = 12, mlp_ratio: float = 4.0, norm_impl: str = "torch", attn_backend: str = "auto",
    ):
        super().__init__()
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed (never trained) sin-cos embedding: a buffer, so it is saved but not optimised.
        self.register_buffer("pos_embed", sincos_2d(embed_dim, self.patch_embed.grid_size, cls_token=True))
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, norm_impl, attn_backend) for _ in range(depth)]
        )
        self.norm = make_norm(embed_dim, norm_impl)
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear, as in MAE
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        init_weights_(self.blocks)
        init_weights_(self.norm)

    def set_attention_backend(self, backend: str) -> None:
        for blk in self.blocks:
            blk.attn.backend = backend

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of keeping them (timm's switch)."""
        self.grad_checkpointing = enable

    def forward(self, images: torch.Tensor, ratio: float = 0.75, noise: torch.Tensor | None = None,
                ratios: torch.Tensor | None = None) -> tuple[torch.Tensor, Masking, torch.Tensor | None]:
        """Encode the visible patches of ``images`` ``[N, 3, H, W]``.

        ``ratio`` is the mask ratio, or with per-sample ``ratios`` (``[N]``) their lower bound, which
        sets the padded length of the visible sets (:func:`random_masking`'s ``min_ratio``).
        Returns the normed latent ``[N, 1 + keep, D]`` (class token first), the masking, and the key
        mask ``[N, 1 + keep]`` (None unless per-sample ratios pad the visible sets).
        """
        x = self.patch_embed(images)  # (N, L, D), in the compute dtype (bf16 under autocast)
        # the position table in the patches' dtype, not the images': an fp32 add would promote the
        # whole residual stream to fp32 under autocast and cast it back before every Linear
        x = x + self.pos_embed[:, 1:, :].to(x.dtype)
        N, L, D = x.shape
        if noise is None:
            noise = torch.rand(N, L, device=x.device)
        m = random_masking(noise, ratio, ratios, min_ratio=ratio)
        x = torch.gather(x, 1, m.ids_shuffle[:, : m.keep, None].expand(N, m.keep, D))  # (N, keep, D)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).to(x.dtype).expand(N, -1, -1)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + keep, D)
        key_mask = None
        if m.keep_lens is not None:
            slot = torch.arange(m.keep + 1, device=x.device)
            key_mask = slot[None, :] <= m.keep_lens[:, None]  # class token + each sample's visible prefix
        for blk in self.blocks:
            x = call_block(blk, self.grad_checkpointing, x, key_mask)
        return self.norm(x), m, key_mask

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """All patches, no masking: ``[N, 1 + L, D]`` after the final norm (timm's forward_features)."""
        x = self.patch_embed(images)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = call_block(blk, self.grad_checkpointing, x)
        return self.norm(x)
