"""The MAE decoder: rebuilds every patch from the visible latent."""

from __future__ import annotations

import torch
import torch.nn as nn

from mcf.kernels import decoder_input, decoder_input_ref
from mcf.models.layers import Block, call_block, init_weights_, make_norm
from mcf.models.pos_embed import sincos_2d


class MAEDecoder(nn.Module):
    """Parameter names follow MAE (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``,
    ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``) so MAE checkpoints map directly."""

    def __init__(self, num_patches: int, patch_size: int, embed_dim: int, decoder_dim: int = 512, depth: int = 8,
                 num_heads: int = 16, mlp_ratio: float = 4.0, in_chans: int = 3, norm_impl: str = "torch",
                 attn_backend: str = "auto", fused_input: bool = False):
        super().__init__()
        grid = int(round(num_patches**0.5))
        self.fused_input = fused_input
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(decoder_dim, grid, cls_token=True))
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_dim, num_heads, mlp_ratio, norm_impl, attn_backend) for _ in range(depth)]
        )
        self.decoder_norm = make_norm(decoder_dim, norm_impl)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * in_chans)
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        init_weights_(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of keeping them."""
        self.grad_checkpointing = enable

    def forward(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, keep_lens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[N, 1 + keep, D]`` latent → ``[N, L, p·p·3]`` prediction of every patch."""
        x = self.decoder_embed(latent)  # (N, 1 + keep, Dd)
        assemble = decoder_input if self.fused_input else decoder_input_ref  # fused: the Triton kernel (backend=triton)
        x = assemble(x, self.mask_token, ids_restore, self.decoder_pos_embed, keep_lens)  # (N, 1 + L, Dd)
        for blk in self.decoder_blocks:
            x = call_block(blk, self.grad_checkpointing, x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]  # class token dropped
