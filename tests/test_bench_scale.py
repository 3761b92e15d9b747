"""``mcf bench scale``: 2 gloo ranks under torchrun; under ZeRO-3 each rank holds half the parameters
and half the Adam state, and fewer bytes than ZeRO-0's 4 × fp32 parameters (params, grads, 2 moments);
the trainer's collectives per step are counted: ZeRO-1 bf16 within 8 collectives, the EMA one
bf16 all-gather at ZeRO-1 and ZeRO-3 (before the sharded EMA: 57 fp32 collectives per step).

Each stage is a torchrun of its own (~30-60 s on 2 cores); ZeRO-0's bytes are the analytic 4P, which
the full benchmark measures (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import math

from mcf.cli import main


def _check_comm(c: dict, stage: int) -> None:
    per = c["per_step"]
    assert per["steady"] or stage == 3, per  # ZeRO-3's prefetch coordinator adds occasional broadcasts
    assert sum(v["count"] for v in per["by_op"].values()) == per["collectives"]
    assert sum(v["bytes"] for v in per["by_op"].values()) == per["bytes"]
    assert sum(v["count"] for v in per["by_label"].values()) == per["collectives"]
    assert per["by_label"]["keys"]["count"] == 1  # the contrastive keys: one fp32 all-gather
    ema = c["ema"]
    assert ema["count"] == 1, per  # the EMA: its target weights in one all-gather, in bf16
    assert [
        k for k in per["by_op"] if k.startswith("all_gather_single/") or k.startswith("all_gather_into_tensor/bfloat16")
    ]
    assert c["minimum"]["collectives"] == {1: 4, 2: 4, 3: 5}[stage]
    assert c["bytes_over_minimum"] == per["bytes"] / c["minimum"]["bytes"]


def test_scale_json_shows_sharding(tmp_path):
    out = tmp_path / "scale.json"
    assert (
        main(
            [
                "bench",
                "scale",
                "--stages",
                "3",
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--phases",
                "memory",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    for key in (
        "stages",
        "summary",
        "target_met",
        "device",
        "backend",
        "model",
        "batch_size",
        "precision",
        "params",
        "date",
    ):
        assert key in result, key
    assert result["backend"] == "gloo" and result["nproc"] == 2
    z3 = result["stages"]["3"]
    assert len(z3["ranks"]) == 2 and z3["ms_per_step"] > 0 and z3["ema_kind"] == "zero3"
    p = result["params"] * 4  # fp32 bytes of the trainable parameters
    for r in z3["ranks"]:
        held = r["held"]
        assert abs(held["params"] - p / 2) <= 64, held  # the rank's partition (+ padding)
        assert abs(held["optimizer_state"] - p) <= 1024, held  # exp_avg + exp_avg_sq of the partition
        assert 0 < held["ema"] < 2.5 * p, held  # its fp32 half of the EMA, the target's weights and the gather buffer
        assert r["total_bytes"] < 4 * p + held["ema"]


def test_scale_bf16_holds_bf16_partitions_and_fp32_masters_and_counts_collectives(tmp_path):
    """bf16 as the trainer runs it: each ZeRO-3 rank holds its half of the bf16 weights (P bytes),
    its half of the fp32 masters (2P) and of the fp32 Adam moments (4P); the trainer's steps
    call the EMA's one all-gather and no other collective of the EMA."""
    out = tmp_path / "scale.json"
    assert (
        main(
            [
                "bench",
                "scale",
                "--stages",
                "3",
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--precision",
                "bf16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["precision"] == "bf16"
    n = result["params"]
    for r in result["stages"]["3"]["ranks"]:
        held = r["held"]
        assert abs(held["params"] - n) <= 64, held  # 2 bytes x n/2
        assert abs(held["zero.fp32_partitioned_groups_flat"] - 2 * n) <= 64, held  # 4 bytes x n/2
        assert abs(held["optimizer_state"] - 4 * n) <= 1024, held  # 2 x 4 bytes x n/2
        assert math.isfinite(r["last_loss"]), r
    _check_comm(result["stages"]["3"]["comm"], 3)
    assert result["comm"]["3"]["collectives_goal_met"]


def test_scale_zero1_bf16_steps_within_eight_collectives(tmp_path):
    out = tmp_path / "scale.json"
    assert (
        main(
            [
                "bench",
                "scale",
                "--stages",
                "1",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--precision",
                "bf16",
                "--phases",
                "comm",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    c = result["stages"]["1"]["comm"]
    _check_comm(c, 1)
    assert c["per_step"]["collectives"] <= 8, c["per_step"]
    assert result["comm"]["1"]["collectives_goal_met"] and "| 1 |" in result["comm_table"]
    assert c["per_step"]["by_label"]["ema"]["bytes"] < 1.5 * c["minimum"]["target_weights_bytes"]
