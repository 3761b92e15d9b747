"""Where the Triton kernels can run (``triton_status``) and when ``auto`` picks them (``prefer_triton``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mcf.kernels import TRITON_FASTER, TritonFaster, prefer_triton
from mcf.kernels.dispatch import _row_matches

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300
    )


def test_interpreter_runs_on_cpu():
    """In a process of its own with TRITON_INTERPRET=1, whatever this one runs with (the GPU check sets 0)."""
    pytest.importorskip("triton")
    code = (
        "import torch\n"
        "from mcf.kernels import triton_status\n"
        "ok, reason = triton_status(torch.device('cpu'))\n"
        "assert ok and 'interpreter' in reason, reason\n"
        "assert triton_status(torch.zeros(2, 2, 4, 32))[0]\n"
        "assert not triton_status(torch.zeros(2, 2, 4, 32, dtype=torch.float64))[0]\n"
        "assert not triton_status(torch.zeros(2, 2, 4, 512))[0]\n"
    )
    proc = _python(code, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr


def test_auto_is_sdpa_on_cpu():
    q = torch.zeros(2, 12, 50, 64)
    row = TritonFaster(
        device="", dtype=torch.float32, head_dim=64, min_tokens=1, max_tokens=1000, masked=False, speedup=2.0,
        source="test",
    )
    assert not prefer_triton(q, None)
    assert not prefer_triton(q, None, table=(row,))  # never on the CPU, whatever the table says


def test_table_is_empty_until_measured():
    assert TRITON_FASTER == ()


def test_row_matching():
    row = TritonFaster(
        device="NVIDIA H100", dtype=torch.bfloat16, head_dim=64, min_tokens=40, max_tokens=60, masked=True, speedup=1.3,
        source="test",
    )
    assert _row_matches(row, "NVIDIA H100 80GB HBM3", torch.bfloat16, 64, 50, True)
    assert not _row_matches(row, "NVIDIA A100-SXM4-80GB", torch.bfloat16, 64, 50, True)
    assert not _row_matches(row, "NVIDIA H100 80GB HBM3", torch.float16, 64, 50, True)
    assert not _row_matches(row, "NVIDIA H100 80GB HBM3", torch.bfloat16, 128, 50, True)
    assert not _row_matches(row, "NVIDIA H100 80GB HBM3", torch.bfloat16, 64, 197, True)
    assert not _row_matches(row, "NVIDIA H100 80GB HBM3", torch.bfloat16, 64, 50, False)


def test_cpu_without_interpreter_says_why():
    pytest.importorskip("triton")
    code = (
        "import torch\n"
        "from mcf.kernels import masked_attention, masked_attention_ref, triton_status\n"
        "ok, reason = triton_status(torch.device('cpu'))\n"
        "assert not ok and 'TRITON_INTERPRET=1' in reason, reason\n"
        "q = torch.randn(1, 1, 4, 32)\n"
        "masked_attention_ref(q, q, q)\n"
        "try:\n"
        "    masked_attention(q, q, q)\n"
        "except RuntimeError as e:\n"
        "    assert 'TRITON_INTERPRET=1' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    proc = _python(code, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr


def test_without_triton_the_references_still_work():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # import triton -> ImportError\n"
        "import torch\n"
        "from mcf.kernels import decoder_input, decoder_input_ref, masked_attention, masked_attention_ref, "
        "prefer_triton, triton_status\n"
        "ok, reason = triton_status(torch.device('cpu'))\n"
        "assert not ok and 'triton is not installed' in reason, reason\n"
        "q = torch.randn(1, 1, 4, 32)\n"
        "masked_attention_ref(q, q, q)\n"
        "assert not prefer_triton(q, None)\n"
        "try:\n"
        "    masked_attention(q, q, q)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr


# -- the measured attention table (``auto``) -------------------------------------------------------
from mcf.kernels import dispatch  # noqa: E402

from mcf.models.attention import attention, candidate, resolve_backend  # noqa: E402


@pytest.fixture
def user_table(tmp_path, monkeypatch):
    """An empty per-user table and an empty repository table: only what a test writes is measured."""
    path = tmp_path / "cache" / "attention_table.json"
    monkeypatch.setenv("MCF_ATTENTION_TABLE", str(path))
    monkeypatch.setattr(dispatch, "TABLE_FILE", tmp_path / "none.json")
    dispatch._load_rows.cache_clear()
    dispatch._choice.clear()
    yield path
    dispatch._load_rows.cache_clear()
    dispatch._choice.clear()


def _row(dtype: str, tokens: int, head_dim: int, **ms: float) -> dict:
    return {
        "dtype": dtype, "head_dim": head_dim, "tokens": tokens, "masked": False, "shapes": [[2, 2]], "ms": ms,
        "source": "test",
    }


def test_pick_takes_the_fastest_at_the_nearest_length():
    rows = [_row("bfloat16", 13, 64, sdpa=5.0, math=2.0, sdpa_fp32=3.0),
            _row("bfloat16", 50, 64, sdpa=9.0, math=8.0, sdpa_fp32=4.0),
            _row("bfloat16", 197, 64, sdpa=30.0, math=20.0, sdpa_fp32=40.0, triton=1.0),
            _row("float32", 50, 64, sdpa=1.0, math=8.0, sdpa_fp32=1.1)]
    allowed = ("sdpa", "math", "sdpa_fp32")
    assert dispatch.pick(rows, torch.bfloat16, 12, 64, False, allowed) == "math"
    assert dispatch.pick(rows, torch.bfloat16, 40, 64, False, allowed) == "sdpa_fp32"  # nearer 50 than 13 (ratio)
    assert dispatch.pick(rows, torch.bfloat16, 150, 64, False, allowed) == "math"  # triton not allowed (CPU)
    assert dispatch.pick(rows, torch.bfloat16, 150, 64, False) == "triton"
    assert dispatch.pick(rows, torch.float32, 197, 64, False, allowed) == "sdpa"
    assert dispatch.pick(rows, torch.bfloat16, 50, 32, False, allowed) is None  # no row of this head dim
    assert dispatch.pick(rows, torch.float16, 50, 64, False, allowed) is None


def test_auto_follows_the_table_and_the_user_cache(user_table):
    q = torch.randn(2, 2, 7, 16)
    assert resolve_backend("auto", q, None) == "sdpa"  # nothing measured: the default
    assert resolve_backend("auto", q.bfloat16(), None) == "sdpa_fp32"
    host = dispatch.host_class("cpu")
    dispatch.write_table(user_table, host, [_row("float32", 8, 16, sdpa=3.0, math=1.0, sdpa_fp32=3.0)])
    assert resolve_backend("auto", q, None) == "math"
    dispatch.write_table(user_table, host, [_row("float32", 8, 16, sdpa=1.0, math=2.0, sdpa_fp32=3.0)])  # replaces
    assert resolve_backend("auto", q, None) == "sdpa"
    table = dispatch.read_table(user_table)
    assert len(table["hosts"][host]["rows"]) == 1
    dispatch.write_table(user_table, "cpu/some_other_isa/torch9.9", [_row("float32", 8, 16, math=0.1, sdpa=9.0)])
    assert resolve_backend("auto", q, None) == "sdpa"  # another host's rows do not apply here


def test_user_rows_override_the_repository_rows(user_table, tmp_path, monkeypatch):
    repo = tmp_path / "repo.json"
    host = dispatch.host_class("cpu")
    dispatch.write_table(repo, host, [_row("float32", 8, 16, sdpa=1.0, math=2.0)])
    monkeypatch.setattr(dispatch, "TABLE_FILE", repo)
    dispatch._load_rows.cache_clear()
    q = torch.randn(2, 2, 8, 16)
    assert resolve_backend("auto", q, None) == "sdpa"
    dispatch.write_table(user_table, host, [_row("float32", 8, 16, sdpa=1.0, math=0.5)])
    assert resolve_backend("auto", q, None) == "math"


def test_a_broken_table_says_what_to_do(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="mcf bench attention --table"):
        dispatch.read_table(bad)
    bad.write_text('{"format": 99, "hosts": {}}')
    with pytest.raises(ValueError, match="not format 1"):
        dispatch.read_table(bad)


@pytest.mark.parametrize("onednn, aten, isa", [(None, "AVX512", "avx512_bf16"), ("AVX2", "AVX512", "avx2"),
                                               ("AVX512_CORE", "AVX512", "avx512"), (None, "DEFAULT", "default")])
def test_cpu_isa_is_capped_by_what_torch_may_use(monkeypatch, onednn, aten, isa):
    import mcf.measure as measure

    flags = {"avx2", "avx512f", "avx512_bf16"}
    monkeypatch.setattr(measure, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: aten)
    if onednn:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    dispatch.cpu_isa.cache_clear()
    try:
        assert dispatch.cpu_isa() == isa
        assert dispatch.native_bf16("cpu") == (isa == "avx512_bf16")
        assert dispatch.host_class("cpu").startswith(f"cpu/{isa}/torch")
    finally:
        dispatch.cpu_isa.cache_clear()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["sdpa", "sdpa_fp32", "math"])
def test_every_candidate_matches_the_reference(name, dtype, masked):
    """Forward and gradients of each ``auto`` candidate against the math reference in fp64: at most
    2x the math path's own error in the same dtype, plus a floor of a few eps of the values' scale."""
    from tolerances import assert_no_worse_than

    B, H, S, D = 2, 3, 13, 32
    q, k, v, dout = (torch.randn(B, H, S, D) for _ in range(4))
    mask = (torch.arange(S)[None, :] < torch.tensor([S, 9])[:, None]) if masked else None

    def run(fn, dt):
        leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, mask)
        return [out, *torch.autograd.grad(out, leaves, dout.to(dt))]

    ref = run(candidate("math"), torch.float64)
    own = run(candidate("math"), dtype)
    got = run(candidate(name), dtype)
    for what, g, r, o in zip(("out", "dq", "dk", "dv"), got, ref, own):
        assert_no_worse_than(g, r, o, dtype=dtype, depth=S, msg=f"{name} {dtype} {what}")


def test_teacher_attention_goes_through_the_dispatch(monkeypatch):
    import mcf.models.attention as attn_mod
    from mcf.models.teacher import TEACHERS, PerceptualTeacher
    from mcf.models.teacher import timm_vit as build_timm_vit

    spec = TEACHERS["vit_tiny_debug"]
    teacher = PerceptualTeacher(spec)
    timm_vit = build_timm_vit(spec)
    assert set(teacher.model.state_dict()) == set(timm_vit.state_dict())  # checkpoints load as before
    timm_vit.load_state_dict(teacher.model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    y = timm_vit.norm_pre(timm_vit._pos_embed(timm_vit.patch_embed(x)))
    for blk in timm_vit.blocks[:3]:
        y = blk(y)
    calls = []
    monkeypatch.setattr(attn_mod, "auto_candidate", lambda q, m: calls.append(q.shape) or dispatch.auto_candidate(q, m))
    for name in ("math", "auto"):
        teacher.set_attention_backend(name)
        (feat,) = teacher.features(x, (2,))
        torch.testing.assert_close(feat, y, rtol=1e-5, atol=1e-5)
    assert len(calls) == 3  # auto: one dispatch per block, at the teacher's shapes
    assert calls[0] == (2, spec.num_heads, 1 + (32 // 4) ** 2, spec.embed_dim // spec.num_heads)


def test_attention_rejects_an_unknown_backend():
    from mcf.errors import ConfigError

    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ConfigError, match="sdpa_fp32"):
        attention(q, q, q, backend="flash")
