"""The attention benchmark's CPU smoke test (tiny shapes; Triton runs in the interpreter)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_json_and_markdown(bench, tmp_path):
    pytest.importorskip("triton")
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert bench.main(["--tiny", "--json", str(out_json), "--markdown", str(out_md)]) == 0
    result = json.loads(out_json.read_text())
    rows = result["results"]
    assert {(r["backend"], r["mode"], r["masked"]) for r in rows} == {
        (b, m, k) for b in bench.BACKENDS for m in bench.MODES for k in (False, True)
    }
    for r in rows:  # conftest's TRITON_INTERPRET=1 lets every backend run on the CPU
        assert "error" not in r, r
        assert r["median_ms"] > 0 and len(r["times_ms"]) == bench.TINY["repeats"]
    assert isinstance(result["triton_faster"], list)
    assert "| sdpa / triton |" in out_md.read_text()


def test_unavailable_backend_is_reported_not_raised(bench, monkeypatch):
    monkeypatch.setattr(bench, "triton_status", lambda device: (False, "no triton here"))
    result = bench.run(
        **{**bench.TINY, "masked": (False,)}, device="cpu", backends=("triton", "sdpa"), modes=("fwd",), log=None
    )
    triton_row, sdpa_row = result["results"]
    assert triton_row["error"] == "no triton here" and "median_ms" in sdpa_row


def test_suggested_rows_need_a_win_at_every_size(bench):
    def row(B, backend, ms):
        return {
            "B": B, "H": 12, "S": 50, "D": 64, "dtype": "bfloat16", "masked": True, "backend": backend,
            "mode": "fwd+bwd", "median_ms": ms,
        }

    meta = {"date": "2026-01-01", "device_name": "NVIDIA H100 80GB HBM3"}
    results = [row(64, "triton", 1.0), row(64, "sdpa", 1.5), row(256, "triton", 4.0), row(256, "sdpa", 5.0)]
    out = {"meta": meta, "results": results, "triton_faster": bench.triton_faster(results, meta["device_name"], 1.1)}
    text = bench.suggested_rows(out)
    assert (
        'TritonFaster(device="NVIDIA H100 80GB HBM3", dtype=torch.bfloat16, head_dim=64, min_tokens=50, max_tokens=50, '
        'masked=True, speedup=1.25'
        in text
    )
    results[3]["median_ms"] = 4.0  # no win at B=256: no row
    out["triton_faster"] = bench.triton_faster(results, meta["device_name"], 1.1)
    assert "none" in bench.suggested_rows(out)
