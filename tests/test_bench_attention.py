"""``mcf bench attention`` delegates to benchmarks/bench_attention.py and adds run metadata."""

from __future__ import annotations

import json

import pytest

from mcf.cli import main


def test_attention_json(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "attention.json"
    assert (
        main(["bench", "attention", "--tiny", "--modes", "fwd", "--backends", "sdpa", "math", "--out", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    for key in ("benchmark", "device", "results", "date", "commit"):
        assert key in result, key
    assert {r["backend"] for r in result["results"]} == {"sdpa", "math"}
    assert all(r["median_ms"] > 0 for r in result["results"])
    # the rows to paste into TRITON_FASTER: none here (Triton was not run), said as a comment
    assert result["suggested_rows"].startswith("# rows for mcf.kernels.dispatch.TRITON_FASTER")
    assert "# none: keep TRITON_FASTER empty" in result["suggested_rows"]


def test_table_run_fills_the_table_auto_reads(tmp_path, monkeypatch):
    """``--table``: every candidate timed in bf16 and fp32, the rows merged under this host's class,
    and ``attention.backend=auto`` then takes the fastest of them."""
    import torch
    from mcf.kernels import dispatch

    from mcf.models.attention import resolve_backend

    table = tmp_path / "table.json"
    monkeypatch.setenv("MCF_ATTENTION_TABLE", str(table))
    monkeypatch.setattr(dispatch, "TABLE_FILE", tmp_path / "none.json")
    dispatch._load_rows.cache_clear()
    dispatch._choice.clear()
    out = tmp_path / "attention.json"
    argv = ["bench", "attention", "--table", "--batch", "2", "--heads", "2", "--tokens", "8", "--head-dim", "16",
            "--warmup", "0", "--repeats", "1", "--out", str(out)]
    try:
        assert main(argv) == 0
        result = json.loads(out.read_text())
        host = dispatch.host_class("cpu")
        assert result["table"]["host"] == host and result["table"]["path"] == str(table)
        rows = dispatch.read_table(table)["hosts"][host]["rows"]
        assert {r["dtype"] for r in rows} == {"bfloat16", "float32"}
        for r in rows:
            assert set(r["ms"]) == {"sdpa", "sdpa_fp32", "math"} and all(ms > 0 for ms in r["ms"].values())
            dtype = getattr(torch, r["dtype"])
            q = torch.zeros(2, 2, 8, 16, dtype=dtype)
            assert resolve_backend("auto", q, None) == min(r["ms"], key=r["ms"].get)
        assert result["timing"]["clock"] == "wall" and rows[0]["source"].endswith(", wall clock")
    finally:
        dispatch._load_rows.cache_clear()
        dispatch._choice.clear()


def test_table_clock_is_wall_unless_cpu_is_asked(monkeypatch):
    """A path's time is wall time (what a step pays) by default; ``--set clock=cpu`` times process CPU time
    (all threads), which charges a two-thread kernel twice; any other value is refused."""
    import time

    import pytest
    import torch

    from mcf.bench import attention
    from mcf.bench.config import AttentionTableConfig
    from mcf.errors import ConfigError

    calls = {"wall": 0, "cpu": 0}
    real_wall, real_cpu = time.perf_counter, time.process_time
    monkeypatch.setattr(time, "perf_counter", lambda: calls.__setitem__("wall", calls["wall"] + 1) or real_wall())
    monkeypatch.setattr(time, "process_time", lambda: calls.__setitem__("cpu", calls["cpu"] + 1) or real_cpu())
    inputs = [torch.randn(1, 1, 4, 8) for _ in range(4)]
    for clock in ("wall", "cpu"):
        before = dict(calls)
        attention._time_interleaved(["math"], tuple(inputs), torch.device("cpu"), 0, 2, 1, clock=clock)
        assert calls[clock] - before[clock] >= 4  # two repeats, a start and an end each
        if clock == "wall":
            assert calls["cpu"] == before["cpu"]  # no process CPU time read
    with pytest.raises(ConfigError, match="clock must be wall or cpu"):
        AttentionTableConfig(clock="process")
