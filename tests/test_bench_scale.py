"""``mcf bench scale``: 2 gloo ranks under torchrun; under ZeRO-3 each rank holds half the parameters
and half the Adam state, and fewer bytes than ZeRO-0's 4 × fp32 parameters (params, grads, 2 moments).

Only ZeRO-3 runs here (each stage is a torchrun of its own, ~30-60 s on 2 cores); ZeRO-0's bytes are
the analytic 4P, which the full benchmark measures (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import math

from mcf.cli import main


def test_scale_json_shows_sharding(tmp_path):
    out = tmp_path / "scale.json"
    assert main(["bench", "scale", "--stages", "3", "--steps", "1", "--batch-size", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("stages", "summary", "target_met", "device", "backend", "model", "batch_size", "precision", "params", "date"):
        assert key in result, key
    assert result["backend"] == "gloo" and result["nproc"] == 2
    z3 = result["stages"]["3"]
    assert len(z3["ranks"]) == 2 and z3["ms_per_step"] > 0
    p = result["params"] * 4  # fp32 bytes of the trainable parameters
    for r in z3["ranks"]:
        held = r["held"]
        assert abs(held["params"] - p / 2) <= 64, held  # the rank's partition (+ padding)
        assert abs(held["optimizer_state"] - p) <= 1024, held  # exp_avg + exp_avg_sq of the partition
        assert r["total_bytes"] < 4 * p


def test_scale_bf16_holds_bf16_partitions_and_fp32_masters(tmp_path):
    """bf16 as the trainer runs it: each ZeRO-3 rank holds its half of the bf16 weights (P bytes),
    its half of the fp32 masters (2P) and of the fp32 Adam moments (4P)."""
    out = tmp_path / "scale.json"
    assert main(["bench", "scale", "--stages", "3", "--steps", "1", "--batch-size", "2", "--precision", "bf16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["precision"] == "bf16"
    n = result["params"]
    for r in result["stages"]["3"]["ranks"]:
        held = r["held"]
        assert abs(held["params"] - n) <= 64, held  # 2 bytes x n/2
        assert abs(held["zero.fp32_partitioned_groups_flat"] - 2 * n) <= 64, held  # 4 bytes x n/2
        assert abs(held["optimizer_state"] - 4 * n) <= 1024, held  # 2 x 4 bytes x n/2
        assert math.isfinite(r["last_loss"]), r
