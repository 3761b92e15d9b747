"""Masked multi-head attention: the reference, then FlashAttention-style Triton kernels.

Order: ``masked_attention_ref`` (plain PyTorch, the ``math`` backend), the ``@triton.jit`` kernels
(forward; backward preprocess, dK/dV, dQ), their launchers, the ``mcf::masked_attention_fwd`` /
``_bwd`` custom ops with fake implementations, their autograd, and the functional API.
"""

from __future__ import annotations

import contextlib
import math

import torch
from mcf.kernels import _triton_utils as tu
from mcf.kernels._triton_utils import cast, jit, tl, triton
from mcf.kernels.dispatch import MAX_HEAD_DIM, triton_status


def masked_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention with an optional per-sample key mask, in plain PyTorch.

    Args:
        q, k, v: ``[B, H, S, D]``.
        key_mask: ``[B, S]`` bool, True where the key may be attended; None attends to all keys.
    Returns:
        ``[B, H, S, D]`` in the dtype of ``q``; a row with no valid key is all zeros.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, S, S)
    if key_mask is None:
        return torch.matmul(scores.softmax(dim=-1), v)
    keep = key_mask[:, None, None, :]  # (B, 1, 1, S)
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = scores.softmax(dim=-1).nan_to_num(0.0)  # rows with no valid key → zeros
    return torch.matmul(probs, v)


# ----------------------------------------------------------------------------------------------
# Triton kernels. Scores are kept in log2 units (scaled by sm_scale * log2(e)) so the softmax uses
# exp2; the saved logsumexp is in natural units. Key validity is (key < S_K) & (key < kv_len[b]) &
# key_mask[b, key]; a key block with no valid key is skipped, a row with no valid key gets out = 0
# and lse = +inf, so exp(s - lse) = 0 in the backward and its gradients are 0.
# ----------------------------------------------------------------------------------------------


@jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # UPCAST_DOT: only in the interpreter, whose bf16 tl.dot is wrong (triton 3.8); bf16 values are
    # exact in fp32 and the product accumulates in fp32 either way, as on the GPU.
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@jit
def _key_validity(Mask, KvLen, b, offs_n, S_K, stride_mb, stride_ms, HAS_MASK: tl.constexpr, HAS_KVLEN: tl.constexpr):
    valid = offs_n < S_K
    if HAS_KVLEN:
        valid = valid & (offs_n < tl.load(KvLen + b))
    if HAS_MASK:
        keep = tl.load(Mask + b * stride_mb + offs_n * stride_ms, mask=valid, other=0)
        valid = valid & (keep != 0)
    return valid


@jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Mask, KvLen,
    sm_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mb, stride_ms,
    H, S_Q, S_K, D,
    HAS_MASK: tl.constexpr, HAS_KVLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid: (B * H, cdiv(S_Q, BLOCK_M)); one program = BLOCK_M query rows of one (b, h)
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B*H*S*D may pass 2**31
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < S_Q) & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * 1.4426950408889634  # log2(e)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = S_K
    if HAS_KVLEN:
        hi = tl.minimum(tl.load(KvLen + b), S_K)  # keys past the valid length are never visited
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid = _key_validity(Mask, KvLen, b, offs_n, S_K, stride_mb, stride_ms, HAS_MASK, HAS_KVLEN)
        if tl.max(valid.to(tl.int32), axis=0) > 0:  # skip fully masked key blocks
            kt = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                         mask=valid[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
            v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                        mask=valid[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            s = _dot(q, kt, DOT_PRECISION, UPCAST_DOT) * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(cast(p, v.dtype, EMULATE_RTNE), v, DOT_PRECISION, UPCAST_DOT)
            m_i = m_new

    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty_row, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # ln(2)
    m_ok = offs_m < S_Q
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
             cast(out, Out.dtype.element_ty, EMULATE_RTNE), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + pid_bh * S_Q + offs_m, lse, mask=m_ok)


@jit
def _attn_bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_gb, stride_gh, stride_gs, stride_gd,
    H, S_Q, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # delta[b, h, i] = sum_d dO * O (fp32); grid: (B * H, cdiv(S_Q, BLOCK_M))
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B*H*S*D may pass 2**31
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < S_Q) & (offs_d[None, :] < D)
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
        mask=ok,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd,
        mask=ok,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + pid_bh * S_Q + offs_m, delta, mask=offs_m < S_Q)


@jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Mask, KvLen,
    sm_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_mb, stride_ms,
    H, S_Q, S_K, D,
    HAS_MASK: tl.constexpr, HAS_KVLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid: (B * H, cdiv(S_K, BLOCK_N)); one program = BLOCK_N keys, looping over all query blocks.
    # dK and dV are contiguous (B, H, S_K, D).
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B*H*S*D may pass 2**31
    pid_n = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    valid = _key_validity(Mask, KvLen, b, offs_n, S_K, stride_mb, stride_ms, HAS_MASK, HAS_KVLEN)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if tl.max(valid.to(tl.int32), axis=0) > 0:  # a fully masked key block has zero gradients
        kv_ok = valid[:, None] & d_ok[None, :]
        k = tl.load(
            K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
            mask=kv_ok,
            other=0.0,
        )
        v = tl.load(
            V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
            mask=kv_ok,
            other=0.0,
        )
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_gb + h * stride_gh
        for start_m in range(0, S_Q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < S_Q
            qt = tl.load(
                q_base + offs_m[None, :] * stride_qs + offs_d[:, None] * stride_qd,
                mask=m_ok[None, :] & d_ok[:, None],
                other=0.0,
            )  # (BLOCK_D, BLOCK_M)
            do = tl.load(
                do_base + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                mask=m_ok[:, None] & d_ok[None, :],
                other=0.0,
            )  # (BLOCK_M, BLOCK_D)
            lse2 = tl.load(Lse + pid_bh * S_Q + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(Delta + pid_bh * S_Q + offs_m, mask=m_ok, other=0.0)
            st = _dot(k, qt, DOT_PRECISION, UPCAST_DOT) * qk_scale  # (BLOCK_N, BLOCK_M)
            pt = tl.where(valid[:, None], tl.exp2(st - lse2[None, :]), 0.0)
            dv += _dot(cast(pt, do.dtype, EMULATE_RTNE), do, DOT_PRECISION, UPCAST_DOT)
            dpt = _dot(v, tl.trans(do), DOT_PRECISION, UPCAST_DOT)  # (BLOCK_N, BLOCK_M)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(cast(dst, qt.dtype, EMULATE_RTNE), tl.trans(qt), DOT_PRECISION, UPCAST_DOT)
        dk = dk * sm_scale
    out_off = pid_bh * S_K * D + offs_n[:, None] * D + offs_d[None, :]
    out_ok = (offs_n[:, None] < S_K) & d_ok[None, :]
    tl.store(DK + out_off, cast(dk, DK.dtype.element_ty, EMULATE_RTNE), mask=out_ok)
    tl.store(DV + out_off, cast(dv, DV.dtype.element_ty, EMULATE_RTNE), mask=out_ok)


@jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Mask, KvLen,
    sm_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_mb, stride_ms,
    H, S_Q, S_K, D,
    HAS_MASK: tl.constexpr, HAS_KVLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid: (B * H, cdiv(S_Q, BLOCK_M)); one program = BLOCK_M query rows, looping over key blocks.
    # dQ is contiguous (B, H, S_Q, D).
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B*H*S*D may pass 2**31
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < S_Q
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd,
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    lse2 = tl.load(Lse + pid_bh * S_Q + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + pid_bh * S_Q + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = S_K
    if HAS_KVLEN:
        hi = tl.minimum(tl.load(KvLen + b), S_K)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid = _key_validity(Mask, KvLen, b, offs_n, S_K, stride_mb, stride_ms, HAS_MASK, HAS_KVLEN)
        if tl.max(valid.to(tl.int32), axis=0) > 0:
            kv_ok = valid[None, :] & d_ok[:, None]
            kt = tl.load(
                k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd, mask=kv_ok, other=0.0
            )  # (BLOCK_D, BLOCK_N)
            vt = tl.load(
                v_base + offs_n[None, :] * stride_vs + offs_d[:, None] * stride_vd, mask=kv_ok, other=0.0
            )  # (BLOCK_D, BLOCK_N)
            s = _dot(q, kt, DOT_PRECISION, UPCAST_DOT) * qk_scale
            p = tl.where(valid[None, :], tl.exp2(s - lse2[:, None]), 0.0)
            dp = _dot(do, vt, DOT_PRECISION, UPCAST_DOT)
            ds = p * (dp - delta[:, None])
            dq += _dot(cast(ds, kt.dtype, EMULATE_RTNE), tl.trans(kt), DOT_PRECISION, UPCAST_DOT)
    dq = dq * sm_scale
    tl.store(
        DQ + pid_bh * S_Q * D + offs_m[:, None] * D + offs_d[None, :],
        cast(dq, DQ.dtype.element_ty, EMULATE_RTNE),
        mask=m_ok[:, None] & d_ok[None, :],
    )


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _config(kernel: str, block_d: int, dtype: torch.dtype, interpreted: bool) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for one of ``fwd``, ``dkdv``, ``dq``.

    Fixed rather than autotuned: MCF runs a handful of shapes (50 and 197 tokens, head dim 64) and
    an autotuner's first-call sweep would land inside a training step. Three tiers by the bytes of
    one (padded) head row, so the tiles fit an A100's 163 KiB of shared memory per block (checked
    by ``tests/test_kernels_cuda_compile.py``). ``dkdv`` keeps BLOCK_N keys resident (k, v, dk, dv)
    and streams BLOCK_M query rows; ``dq`` the reverse. In the interpreter, small tiles make the
    tests cross several blocks at tiny lengths.
    """
    if interpreted:
        return {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}[kernel]
    row_bytes = block_d * (4 if dtype == torch.float32 else 2)
    if row_bytes <= 256:  # half D <= 128, fp32 D <= 64
        return {"fwd": (64, 64, 4, 2), "dkdv": (32, 64, 4, 2), "dq": (64, 32, 4, 2)}[kernel]
    if row_bytes <= 512:  # half D = 256, fp32 D = 128
        return {"fwd": (64, 32, 4, 2), "dkdv": (16, 32, 4, 1), "dq": (32, 32, 4, 1)}[kernel]
    return {"fwd": (32, 32, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (16, 32, 4, 1)}[kernel]  # fp32 D = 256


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs >= 16


def _dot_flags(dtype: torch.dtype, interpreted: bool) -> dict:
    """Precision flags of the kernels; the UPCAST_DOT and EMULATE_RTNE work-arounds only in the interpreter."""
    upcast = interpreted and dtype == torch.bfloat16
    return dict(
        DOT_PRECISION="ieee" if upcast else tu.dot_precision(dtype), UPCAST_DOT=upcast, EMULATE_RTNE=interpreted
    )


def _key_args(q: torch.Tensor, key_mask: torch.Tensor | None, kv_lens: torch.Tensor | None):
    """Kernel arguments for the key validity: (mask, kv_lens, mask strides), dummies when absent."""
    mask = key_mask.view(torch.uint8) if key_mask is not None else q  # bool → bytes, no copy
    strides = key_mask.stride() if key_mask is not None else (0, 0)
    lens = kv_lens if kv_lens is not None else q
    return mask, lens, strides


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _attn_fwd(q, k, v, key_mask, kv_lens, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, S_Q, D = q.shape
    S_K = k.shape[2]
    out = tu.empty((B, H, S_Q, D), q.dtype, q.device)
    lse = tu.empty((B, H, S_Q), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    mask, lens, (smb, sms) = _key_args(q, key_mask, kv_lens)
    block_d = _block_d(D)
    bm, bn, warps, stages = _config("fwd", block_d, q.dtype, tu.is_interpreted(_attn_fwd_kernel))
    with _on_device(q):
        _attn_fwd_kernel[(B * H, triton.cdiv(S_Q, bm))](
            q, k, v, out, lse, mask, lens, scale, *q.stride(), *k.stride(), *v.stride(), *out.stride(), smb, sms, H,
            S_Q, S_K, D, HAS_MASK=key_mask is not None, HAS_KVLEN=kv_lens is not None,
            **_dot_flags(q.dtype, tu.is_interpreted(_attn_fwd_kernel)), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
            num_warps=warps, num_stages=stages,
        )
    return out, lse


def _attn_bwd(
    dout, q, k, v, out, lse, key_mask, kv_lens, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, S_Q, D = q.shape
    S_K = k.shape[2]
    dq = tu.empty((B, H, S_Q, D), q.dtype, q.device)
    dk = tu.empty((B, H, S_K, D), k.dtype, k.device)
    dv = tu.empty((B, H, S_K, D), v.dtype, v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = tu.empty((B, H, S_Q), torch.float32, q.device)
    mask, lens, (smb, sms) = _key_args(q, key_mask, kv_lens)
    block_d = _block_d(D)
    interpreted = tu.is_interpreted(_attn_fwd_kernel)
    flags = dict(HAS_MASK=key_mask is not None, HAS_KVLEN=kv_lens is not None, **_dot_flags(q.dtype, interpreted))
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), smb, sms)
    with _on_device(q):
        bm = 64 if not interpreted else 32
        _attn_bwd_preprocess_kernel[(B * H, triton.cdiv(S_Q, bm))](
            out, dout, delta, *out.stride(), *dout.stride(), H, S_Q, D, BLOCK_M=bm, BLOCK_D=block_d,
        )
        bm, bn, warps, stages = _config("dkdv", block_d, q.dtype, interpreted)
        _attn_bwd_dkdv_kernel[(B * H, triton.cdiv(S_K, bn))](
            q, k, v, dout, lse, delta, dk, dv, mask, lens, scale, *strides, H, S_Q, S_K, D,
            **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
        )
        bm, bn, warps, stages = _config("dq", block_d, q.dtype, interpreted)
        _attn_bwd_dq_kernel[(B * H, triton.cdiv(S_Q, bm))](
            q, k, v, dout, lse, delta, dq, mask, lens, scale, *strides, H, S_Q, S_K, D,
            **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, traced through their fake (shape) implementations
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "mcf::masked_attention_fwd", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? kv_lens, float scale) -> (Tensor, Tensor)",
)
def masked_attention_fwd(q, k, v, key_mask, kv_lens, scale):
    """``(out [B, H, S_Q, D], lse [B, H, S_Q] fp32)``; lse is the natural-log logsumexp of the
    scaled scores, +inf for a row with no valid key. ``key_mask``: ``[B, S_K]`` bool;
    ``kv_lens``: ``[B]`` int32 valid key counts; both optional, both applied when given."""
    return _attn_fwd(q, k, v, key_mask, kv_lens, scale)


@masked_attention_fwd.register_fake
def _(q, k, v, key_mask, kv_lens, scale):
    B, H, S_Q, D = q.shape
    return q.new_empty((B, H, S_Q, D)), q.new_empty((B, H, S_Q), dtype=torch.float32)


@torch.library.custom_op(
    "mcf::masked_attention_bwd",
    mutates_args=(),
    schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_mask, Tensor? kv_lens, "
           "float scale) -> (Tensor, Tensor, Tensor)",
)
def masked_attention_bwd(dout, q, k, v, out, lse, key_mask, kv_lens, scale):
    """``(dq, dk, dv)``, each contiguous, in the dtype of its input."""
    return _attn_bwd(dout, q, k, v, out, lse, key_mask, kv_lens, scale)


@masked_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, key_mask, kv_lens, scale):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, kv_lens, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask, kv_lens)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_mask, kv_lens = ctx.saved_tensors
    dq, dk, dv = torch.ops.mcf.masked_attention_bwd(dout, q, k, v, out, lse, key_mask, kv_lens, ctx.scale)
    return dq, dk, dv, None, None, None


masked_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not agree (same B, H, D; k and v the same "
            "shape)"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in tu.SUPPORTED_DTYPES:
        raise ValueError(
            f"q, k, v must share one dtype among float32, bfloat16, float16; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head dimension {q.shape[3]} > {MAX_HEAD_DIM}")
    if key_mask is None:
        return
    if key_mask.device != q.device:
        raise ValueError(f"key_mask is on {key_mask.device}, q on {q.device}")
    B, S_K = k.shape[0], k.shape[2]
    if key_mask.dtype == torch.bool:
        if tuple(key_mask.shape) != (B, S_K):
            raise ValueError(f"a bool key_mask must be [B, S_K] = {(B, S_K)}, got {tuple(key_mask.shape)}")
    elif key_mask.dtype.is_floating_point or key_mask.dtype.is_complex or tuple(key_mask.shape) != (B,):
        raise ValueError(
            f"key_mask must be [B, S_K] bool or [B] integer valid lengths; got {key_mask.dtype} {tuple(key_mask.shape)}"
        )


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None, *,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention with a per-sample key mask, fused in Triton (forward and backward).

    Same result as ``masked_attention_ref``, in O(S) memory: an online softmax over key blocks,
    key blocks with no valid key skipped, the backward recomputing the scores from the saved
    logsumexp. Accumulates in fp32 whatever the input dtype.

    Args:
        q, k, v: ``[B, H, S, D]`` (any strides), float32/bfloat16/float16, D <= 256 (the kernels
            pad it to a power of two; 32-128 is what they are tuned for). k and v may have a
            different length S_K than q.
        key_mask: None (attend to all keys); ``[B, S_K]`` bool, True where the key may be attended
            (any pattern); or ``[B]`` integer valid lengths (keys ``< len[b]``; the loop over keys
            stops there, the cheapest form for MCF's prefix-padded visible sets).
        scale: softmax scale; default ``1 / sqrt(D)``.
    Returns:
        ``[B, H, S_Q, D]`` in the dtype of q; a row whose sample has no valid key is all zeros and
        gets zero gradients.
    Raises:
        RuntimeError: Triton cannot run on q's device (the reason from ``triton_status``).
        ValueError: inconsistent shapes, dtypes or devices.
    """
    _check_inputs(q, k, v, key_mask)
    if not torch.compiler.is_compiling():
        ok, reason = triton_status(q)
        if not ok:
            raise RuntimeError(f"mcf.kernels.masked_attention cannot run: {reason}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    mask = lens = None
    if key_mask is not None and key_mask.dtype == torch.bool:
        mask = key_mask
    elif key_mask is not None:
        lens = key_mask.to(torch.int32).contiguous()
    out, _ = torch.ops.mcf.masked_attention_fwd(q, k, v, mask, lens, scale)
    return out
