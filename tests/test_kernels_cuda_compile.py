"""The Triton kernels compile for real GPUs (sm_80, sm_90) at the launchers' tile configs, with no GPU.

The CPU interpreter is lenient (it runs Python on numpy arrays), so it cannot tell whether a kernel
compiles: this compiles each kernel through Triton's full pipeline down to a cubin (Triton ships
ptxas) for a CUDA target, in a subprocess without TRITON_INTERPRET, and checks the shared memory a
block needs against the architecture's limit. It does not run anything: correctness on the GPU is
``test_kernels_attention.py``'s GPU tests. By default a few configurations are compiled (the
interpreter-run CI must stay fast); ``MCF_TEST_AOT_ALL=1`` compiles the whole matrix.

Run directly: ``python tests/test_kernels_cuda_compile.py [--all]`` prints one line per kernel.
"""

from __future__ import annotations

import importlib
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Largest dynamic shared memory one block may use (bytes): A100 (sm_80) and H100 (sm_90).
SHARED_LIMIT = {80: 166912, 90: 232448}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _attention_cases(full: bool):
    if full:
        # HAS_MASK and HAS_KVLEN both on compile every branch; the default cases compile each alone
        return list(itertools.product((80, 90), ("bf16", "fp16", "fp32"), (32, 64, 128, 256), ((True, True),)))
    return [(90, "bf16", 64, (True, False)), (80, "fp32", 128, (False, True))]


def compile_all(full: bool) -> list[str]:
    """Compile every (kernel, target, dtype, head dim, mask flags) case; one report line each."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ma = importlib.import_module("mcf.kernels.masked_attention")
    di = importlib.import_module("mcf.kernels.decoder_input")

    def build(
        fn, pointers: dict[str, str], consts: dict, ones: tuple[str, ...], cc: int, warps: int, stages: int
    ) -> str:
        # As a real launch specialises: strides equal to 1 become constants, pointers 16-byte aligned.
        consts = {**consts, **{n: 1 for n in ones if n in fn.arg_names}}
        sig = {
            n: "constexpr"
            if n in consts
            else "*" + pointers[n]
            if n in pointers
            else "fp32"
            if n == "sm_scale"
            else "i32"
            for n in fn.arg_names
        }
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in pointers}
        kernel = triton.compile(
            ASTSource(fn, sig, consts, attrs),
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": warps, "num_stages": stages},
        )
        shared = kernel.metadata.shared
        assert "cubin" in kernel.asm, f"{fn.__name__}: no cubin"
        assert shared <= SHARED_LIMIT[cc], f"{fn.__name__} sm_{cc}: {shared} B shared memory > {SHARED_LIMIT[cc]}"
        return f"{fn.__name__} sm_{cc} warps={warps} stages={stages}: {shared} B shared"

    lines = []
    for cc, dt, D, (has_mask, has_kvlen) in _attention_cases(full):
        dtype = getattr(torch, DTYPES[dt])
        block_d = ma._block_d(D)
        flags = dict(HAS_MASK=has_mask, HAS_KVLEN=has_kvlen, **ma._dot_flags(dtype, interpreted=False))
        ptr = {n: dt for n in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ")}
        ptr.update(Lse="fp32", Delta="fp32", Mask="u8", KvLen="i32")
        strides_d = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_gd", "stride_ms")
        for name, fn in (
            ("fwd", ma._attn_fwd_kernel),
            ("dkdv", ma._attn_bwd_dkdv_kernel),
            ("dq", ma._attn_bwd_dq_kernel),
        ):
            bm, bn, warps, stages = ma._config(name, block_d, dtype, interpreted=False)
            consts = dict(flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d)
            lines.append(
                f"{dt} D={D} mask={has_mask} kvlen={has_kvlen} " + build(fn, ptr, consts, strides_d, cc, warps, stages)
            )
        lines.append(
            f"{dt} D={D} "
            + build(
                ma._attn_bwd_preprocess_kernel, ptr, dict(BLOCK_M=64, BLOCK_D=block_d), ("stride_od", "stride_gd"), cc,
                4, 1,
            )
        )
    for cc, dt in itertools.product((80, 90), ("bf16", "fp32")) if full else [(90, "bf16")]:
        ptr = dict(X=dt, MaskTok="fp32", Ids="i64", Pos="fp32", KeepLens="i64", Out=dt, G=dt, GX=dt, GMask="fp32")
        bl, bc = di._blocks(512, interpreted=False)
        for fn in (di._decoder_input_fwd_kernel, di._decoder_input_bwd_kernel):
            consts = dict(HAS_KEEP=True, EMULATE_RTNE=False, BLOCK_L=bl, BLOCK_C=bc)
            lines.append(
                f"{dt} C=512 " + build(fn, ptr, consts, ("stride_xc", "stride_il", "stride_pc", "stride_gc"), cc, 4, 1)
            )
    return lines


def test_kernels_compile_for_cuda():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, __file__] + (["--all"] if os.environ.get("MCF_TEST_AOT_ALL") else [])
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


if __name__ == "__main__":
    assert not os.environ.get("TRITON_INTERPRET"), "unset TRITON_INTERPRET: the interpreter cannot compile"
    for line in compile_all(full="--all" in sys.argv):
        print(line, flush=True)
