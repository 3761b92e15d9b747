"""Decoder input assembly: un-shuffle, fill mask tokens, add the position embedding.

Order: ``decoder_input_ref`` (MAE's gather/cat/add), the ``@triton.jit`` forward and backward
kernels, their launchers, the ``mcf::decoder_input_fwd`` / ``_bwd`` custom ops, autograd, the
functional API.
"""

from __future__ import annotations

import contextlib

import torch
from mcf.kernels import _triton_utils as tu
from mcf.kernels._triton_utils import cast, jit, tl, triton
from mcf.kernels.dispatch import triton_status


def decoder_input_ref(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor,
    keep_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """MAE's gather/cat/add sequence, generalised to per-sample visible counts.

    Args:
        x: ``[B, 1 + K, C]`` class token then the K (padded) visible tokens, in shuffled order.
        mask_token: ``[1, 1, C]``.
        ids_restore: ``[B, L]`` int64; position l takes shuffled index ``ids_restore[b, l]``.
        pos_embed: ``[1, 1 + L, C]`` (class position first).
        keep_lens: ``[B]`` visible tokens per sample (indices >= keep_lens[b] are mask tokens);
            None means all K are visible.
    Returns:
        ``[B, 1 + L, C]``.
    """
    B, K1, C = x.shape
    L = ids_restore.shape[1]
    vis = x[:, 1:, :]
    if keep_lens is not None:  # padded visible slots become mask tokens
        slot = torch.arange(K1 - 1, device=x.device)
        vis = torch.where((slot[None, :] < keep_lens[:, None])[..., None], vis, mask_token.to(vis.dtype))
    tokens = torch.cat([vis, mask_token.to(x.dtype).expand(B, L + 1 - K1, C)], dim=1)  # (B, L, C)
    tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(B, L, C))
    return torch.cat([x[:, :1, :], tokens], dim=1) + pos_embed.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels. Output row 0 is the class token; output row 1 + l takes slot j = ids_restore[b, l]
# of the shuffled sequence: x[b, 1 + j] when j < keep[b] (keep = min(keep_lens[b], K)), else the
# mask token. ids_restore must be a permutation of range(L) per sample (MAE's argsort), so the
# backward scatter writes every visible slot exactly once.
# ----------------------------------------------------------------------------------------------


@jit
def _decoder_input_fwd_kernel(
    X, MaskTok, Ids, Pos, KeepLens, Out,
    stride_xb, stride_xs, stride_xc,
    stride_ib, stride_il,
    stride_ps, stride_pc,
    L, K, C,
    HAS_KEEP: tl.constexpr, EMULATE_RTNE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: (B, cdiv(1 + L, BLOCK_L), cdiv(C, BLOCK_C)); Out is contiguous (B, 1 + L, C)
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets
    rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)  # output rows 0..L
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < L + 1
    col_ok = cols < C
    keep = K
    if HAS_KEEP:
        keep = tl.minimum(tl.load(KeepLens + b).to(tl.int32), K)
    ids = tl.load(Ids + b * stride_ib + (rows - 1) * stride_il, mask=row_ok & (rows >= 1), other=0).to(tl.int32)
    from_x = row_ok & ((rows == 0) | ((ids >= 0) & (ids < keep)))
    src = tl.where(rows == 0, 0, ids + 1)
    x = tl.load(
        X + b * stride_xb + src[:, None] * stride_xs + cols[None, :] * stride_xc,
        mask=from_x[:, None] & col_ok[None, :],
        other=0.0,
    )
    out_ty = Out.dtype.element_ty
    # cast like the reference: mask token and position embedding to x's dtype, then add (in fp32)
    tok = cast(tl.load(MaskTok + cols, mask=col_ok, other=0.0), out_ty, EMULATE_RTNE)
    tok = tl.where(from_x[:, None], x, tok[None, :])
    pos = tl.load(
        Pos + rows[:, None] * stride_ps + cols[None, :] * stride_pc, mask=row_ok[:, None] & col_ok[None, :], other=0.0
    )
    pos = cast(pos, out_ty, EMULATE_RTNE)
    out = tok.to(tl.float32) + pos.to(tl.float32)
    tl.store(
        Out + b * (L + 1) * C + rows[:, None] * C + cols[None, :],
        cast(out, out_ty, EMULATE_RTNE),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@jit
def _decoder_input_bwd_kernel(
    G, Ids, KeepLens, GX, GMask,
    stride_gb, stride_gs, stride_gc,
    stride_ib, stride_il,
    L, K, C,
    HAS_KEEP: tl.constexpr, EMULATE_RTNE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: (B, cdiv(C, BLOCK_C)). GX (B, 1 + K, C) gets the un-shuffle scattered back (zeros in the
    # padded slots j >= keep); GMask (B, C) fp32 the per-sample sum over mask-token positions.
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    keep = K
    if HAS_KEEP:
        keep = tl.minimum(tl.load(KeepLens + b).to(tl.int32), K)
    g_base = G + b * stride_gb
    gx_base = GX + b * (K + 1) * C
    g0 = tl.load(g_base + cols * stride_gc, mask=col_ok, other=0.0)
    tl.store(gx_base + cols, cast(g0, GX.dtype.element_ty, EMULATE_RTNE), mask=col_ok)
    acc = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, L, BLOCK_L):
        pos = start + tl.arange(0, BLOCK_L)  # output row 1 + pos
        ok = pos < L
        ids = tl.load(Ids + b * stride_ib + pos * stride_il, mask=ok, other=0).to(tl.int32)
        g = tl.load(
            g_base + (pos[:, None] + 1) * stride_gs + cols[None, :] * stride_gc,
            mask=ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        visible = (ids >= 0) & (ids < keep)
        slot_ok = ok & (ids >= 0) & (ids < K)
        gx = tl.where(visible[:, None], g, 0.0)
        tl.store(
            gx_base + (ids[:, None] + 1) * C + cols[None, :],
            cast(gx, GX.dtype.element_ty, EMULATE_RTNE),
            mask=slot_ok[:, None] & col_ok[None, :],
        )
        acc += tl.sum(tl.where((ok & ~visible)[:, None], g, 0.0), axis=0)
    tl.store(GMask + b * C + cols, acc, mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _blocks(C: int, interpreted: bool) -> tuple[int, int]:
    """(BLOCK_L, BLOCK_C): a memory-bound copy, so wide channel tiles; small ones in the interpreter."""
    if interpreted:
        return 16, 32
    return 16, min(256, triton.next_power_of_2(C))


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _decoder_input_fwd(x, mask_token, ids_restore, pos_embed, keep_lens) -> torch.Tensor:
    B, K1, C = x.shape
    L = ids_restore.shape[1]
    out = tu.empty((B, L + 1, C), x.dtype, x.device)
    if out.numel() == 0:
        return out
    mask_token = mask_token.reshape(C).contiguous()
    pos = pos_embed.reshape(L + 1, C)
    bl, bc = _blocks(C, tu.is_interpreted(_decoder_input_fwd_kernel))
    with _on_device(x):
        _decoder_input_fwd_kernel[(B, triton.cdiv(L + 1, bl), triton.cdiv(C, bc))](
            x, mask_token, ids_restore, pos, keep_lens if keep_lens is not None else ids_restore, out, *x.stride(),
            *ids_restore.stride(), *pos.stride(), L, K1 - 1, C, HAS_KEEP=keep_lens is not None,
            EMULATE_RTNE=tu.emulate_rtne(_decoder_input_fwd_kernel), BLOCK_L=bl, BLOCK_C=bc,
        )
    return out


def _decoder_input_bwd(grad, ids_restore, keep_lens, num_x_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, L1, C = grad.shape
    gx = tu.empty((B, num_x_tokens, C), grad.dtype, grad.device)
    gmask = tu.empty((B, C), torch.float32, grad.device)
    if grad.numel() == 0:
        return gx.zero_(), gmask.zero_()
    bl, bc = _blocks(C, tu.is_interpreted(_decoder_input_bwd_kernel))
    with _on_device(grad):
        _decoder_input_bwd_kernel[(B, triton.cdiv(C, bc))](
            grad, ids_restore, keep_lens if keep_lens is not None else ids_restore, gx, gmask, *grad.stride(),
            *ids_restore.stride(), L1 - 1, num_x_tokens - 1, C, HAS_KEEP=keep_lens is not None,
            EMULATE_RTNE=tu.emulate_rtne(_decoder_input_bwd_kernel), BLOCK_L=bl, BLOCK_C=bc,
        )
    return gx, gmask


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "mcf::decoder_input_fwd", mutates_args=(),
    schema="(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor pos_embed, Tensor? keep_lens) -> Tensor",
)
def decoder_input_fwd(x, mask_token, ids_restore, pos_embed, keep_lens):
    """``[B, 1 + L, C]`` in x's dtype; arguments as in ``decoder_input_ref``."""
    return _decoder_input_fwd(x, mask_token, ids_restore, pos_embed, keep_lens)


@decoder_input_fwd.register_fake
def _(x, mask_token, ids_restore, pos_embed, keep_lens):
    return x.new_empty((x.shape[0], ids_restore.shape[1] + 1, x.shape[2]))


@torch.library.custom_op(
    "mcf::decoder_input_bwd", mutates_args=(),
    schema="(Tensor grad, Tensor ids_restore, Tensor? keep_lens, int num_x_tokens) -> (Tensor, Tensor)",
)
def decoder_input_bwd(grad, ids_restore, keep_lens, num_x_tokens):
    """``(grad_x [B, num_x_tokens, C] in grad's dtype, grad_mask_token per sample [B, C] fp32)``."""
    return _decoder_input_bwd(grad, ids_restore, keep_lens, num_x_tokens)


@decoder_input_bwd.register_fake
def _(grad, ids_restore, keep_lens, num_x_tokens):
    B, _, C = grad.shape
    return grad.new_empty((B, num_x_tokens, C)), grad.new_empty((B, C), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Autograd: grad_x from the kernel's scatter, grad_mask_token = the sum of the kernel's per-sample
# sums, grad_pos_embed = the batch sum of the output gradient (a plain reduction).
# ----------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, mask_token, ids_restore, pos_embed, keep_lens = inputs
    ctx.save_for_backward(ids_restore, keep_lens)
    ctx.num_x_tokens = x.shape[1]
    ctx.mask_token_meta = (mask_token.shape, mask_token.dtype)
    ctx.pos_embed_meta = (pos_embed.shape, pos_embed.dtype)


def _backward(ctx, grad):
    ids_restore, keep_lens = ctx.saved_tensors
    gx = gmask = gpos = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        gx, gmask_b = torch.ops.mcf.decoder_input_bwd(grad, ids_restore, keep_lens, ctx.num_x_tokens)
        shape, dtype = ctx.mask_token_meta
        gmask = gmask_b.sum(0).reshape(shape).to(dtype) if ctx.needs_input_grad[1] else None
        gx = gx if ctx.needs_input_grad[0] else None
    if ctx.needs_input_grad[3]:
        shape, dtype = ctx.pos_embed_meta
        gpos = grad.sum(0, dtype=torch.float32).reshape(shape).to(dtype)
    return gx, gmask, None, gpos, None


decoder_input_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------


def decoder_input(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor,
    keep_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """``decoder_input_ref`` in one Triton pass (un-shuffle, mask tokens, position embedding).

    Args:
        x: ``[B, 1 + K, C]`` class token then the K (padded) visible tokens, in shuffled order.
        mask_token: ``[1, 1, C]``.
        ids_restore: ``[B, L]`` integer, a permutation of ``range(L)`` per sample (L >= K).
        pos_embed: ``[1, 1 + L, C]`` (class position first).
        keep_lens: ``[B]`` visible tokens per sample (slots >= keep_lens[b] are mask tokens);
            None means all K are visible.
    Returns:
        ``[B, 1 + L, C]`` in x's dtype; bit-identical to the reference in the same dtype.
        Differentiable in x, mask_token and pos_embed.
    Raises:
        RuntimeError: Triton cannot run on x's device (the reason from ``triton_status``).
        ValueError: inconsistent shapes or devices.
    """
    if x.dim() != 3 or ids_restore.dim() != 2 or ids_restore.shape[0] != x.shape[0]:
        raise ValueError(
            f"x must be [B, 1 + K, C] and ids_restore [B, L]; got {tuple(x.shape)}, {tuple(ids_restore.shape)}"
        )
    B, K1, C = x.shape
    L = ids_restore.shape[1]
    if K1 < 1 or L < K1 - 1:
        raise ValueError(f"x has {K1 - 1} visible slots but ids_restore only {L} positions")
    if mask_token.numel() != C or pos_embed.numel() != (L + 1) * C or pos_embed.shape[-1] != C:
        raise ValueError(
            f"mask_token must be [1, 1, {C}] and pos_embed [1, {L + 1}, {C}]; got {tuple(mask_token.shape)}, "
            f"{tuple(pos_embed.shape)}"
        )
    if ids_restore.dtype.is_floating_point or ids_restore.dtype == torch.bool:
        raise ValueError(f"ids_restore must be an integer tensor, not {ids_restore.dtype}")
    if keep_lens is not None and (tuple(keep_lens.shape) != (B,) or keep_lens.dtype.is_floating_point):
        raise ValueError(f"keep_lens must be [B] = [{B}] integer, got {keep_lens.dtype} {tuple(keep_lens.shape)}")
    tensors = (x, mask_token, ids_restore, pos_embed) + ((keep_lens,) if keep_lens is not None else ())
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"decoder_input inputs are on different devices: {[str(t.device) for t in tensors]}")
    if x.dtype not in tu.SUPPORTED_DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16, not {x.dtype}")
    if not torch.compiler.is_compiling():
        ok, reason = triton_status(x.device)
        if not ok:
            raise RuntimeError(f"mcf.kernels.decoder_input cannot run: {reason}")
    return torch.ops.mcf.decoder_input_fwd(x, mask_token, ids_restore, pos_embed, keep_lens)
