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
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)


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
    row = TritonFaster(device="", dtype=torch.float32, head_dim=64, min_tokens=1, max_tokens=1000, masked=False, speedup=2.0, source="test")
    assert not prefer_triton(q, None)
    assert not prefer_triton(q, None, table=(row,))  # never on the CPU, whatever the table says


def test_table_is_empty_until_measured():
    assert TRITON_FASTER == ()


def test_row_matching():
    row = TritonFaster(device="NVIDIA H100", dtype=torch.bfloat16, head_dim=64, min_tokens=40, max_tokens=60, masked=True, speedup=1.3, source="test")
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
        "from mcf.kernels import decoder_input, decoder_input_ref, masked_attention, masked_attention_ref, prefer_triton, triton_status\n"
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
