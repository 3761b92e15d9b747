"""``mcf bench attention`` delegates to benchmarks/bench_attention.py and adds run metadata."""

from __future__ import annotations

import json

import pytest

from mcf.cli import main


def test_attention_json(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "attention.json"
    assert main(["bench", "attention", "--tiny", "--modes", "fwd", "--backends", "sdpa", "math", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("benchmark", "device", "results", "date", "commit"):
        assert key in result, key
    assert {r["backend"] for r in result["results"]} == {"sdpa", "math"}
    assert all(r["median_ms"] > 0 for r in result["results"])
    # the rows to paste into TRITON_FASTER: none here (Triton was not run), said as a comment
    assert result["suggested_rows"].startswith("# rows for mcf.kernels.dispatch.TRITON_FASTER")
    assert "# none: keep TRITON_FASTER empty" in result["suggested_rows"]
