"""``mcf bench scale``: 2 gloo ranks under torchrun; under ZeRO-3 each rank holds half the parameters
and half the Adam state, and fewer bytes than ZeRO-0's 4 × fp32 parameters (params, grads, 2 moments);
the trainer's collectives per step are counted: ZeRO-1 bf16 within 6 collectives besides the
gradient reduction's buckets, the EMA one
bf16 all-gather at ZeRO-1 and ZeRO-3 (before the sharded EMA: 57 fp32 collectives per step).

Each stage is a torchrun of its own (~30-60 s on 2 cores); ZeRO-0's bytes are the analytic 4P, which
the full benchmark measures (benchmarks/RESULTS.md). The projection to many GPUs
(``mcf.bench.projection``) is checked against what 3 ranks count, from what 2 ranks count.
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


def _labels_in_order(calls: list) -> list[str]:
    out: list[str] = []
    for c in calls:
        if not out or out[-1] != c[0]:
            out.append(c[0])
    return out


def test_projection_from_two_ranks_matches_three_and_overlaps_the_reduction():
    """The trainer's ZeRO-1 bf16 step counted on 2 gloo ranks, projected to 3 ranks of the same model,
    against the step counted on 3 ranks: bytes per class (gradient reduction, parameter gather, EMA
    gather, contrastive keys), the order of the classes and the share of the gradient reduction issued
    during the backward (DeepSpeed's overlap_comm, mcf's default: most of it; before, none) agree; and the
    projection of ViT-B/16 (batch 64 per GPU, the default network) from the same counts, with DeepSpeed's
    all-reduce path counted too, meets the efficiency goals at 8 and 64 GPUs."""
    from mcf.bench.projection import Compute, Network, model_facts, project
    from mcf.bench.scale import ScaleBenchConfig, run

    common = dict(stages=(1,), precision="bf16", phases=("comm",), steps=2, batch_size=2)
    two = run(ScaleBenchConfig(nproc=2, options=("reduce-bf16", "allreduce-bf16"), gpus=(3, 8, 64),
                               project=("mcf_vit_tiny", "mcf_vit_base_patch16"), **common))
    three = run(ScaleBenchConfig(nproc=3, options=("reduce-bf16",), **common))
    c2, c3 = two["stages"]["1"]["comm"], three["stages"]["1"]["comm"]
    _check_comm(c2, 1)
    assert c2["per_step"]["collectives"] - c2["grads"]["count"] <= 6, c2["per_step"]  # besides the gradient buckets
    assert two["comm"]["1"]["collectives_goal_met"] and "| 1 |" in two["comm_table"]
    assert c2["per_step"]["by_label"]["ema"]["bytes"] < 1.5 * c2["minimum"]["target_weights_bytes"]
    assert {k.split("/")[0] for k in two["stages"]["1:allreduce-bf16"]["comm"]["per_step"]["by_op"]} >= {"all_reduce"}
    assert c2["facts"]["trainable"] == model_facts("mcf_vit_tiny")["trainable"]
    for c in (c2, c3):
        g = c["grads"]
        assert g["bytes"] == c["facts"]["trainable"] * 2  # every gradient once, in bf16
        assert g["overlap_share"] >= 0.5, g  # the buckets reduced from the gradient hooks, while the backward ran
        assert {k.split("/")[0] for k in c["per_step"]["by_op"]} >= {"reduce"}  # to the owners, not all-reduced
    assert _labels_in_order(c2["step_2_calls"]) == _labels_in_order(c3["step_2_calls"])
    row = project(c2, 1, "mcf_vit_tiny", 3, Network(), Compute(batch_size=2))  # the counted batch
    measured: dict[str, float] = {}
    count: dict[str, int] = {}
    for label, _op, _dtype, nbytes, _bwd in c3["step_2_calls"]:
        measured[label] = measured.get(label, 0) + nbytes
        count[label] = count.get(label, 0) + 1
    assert abs(row["by_label"]["grads"]["collectives"] - count["grads"]) <= 2, (row["by_label"], count)
    for label in ("grads", "params", "ema", "keys"):
        want, got = measured[label], row["by_label"][label]["bytes"]
        assert abs(got - want) <= 0.01 * want, (label, got, want)  # padding to 2·W elements aside
    assert row["by_label"]["ema"]["bytes"] == measured["ema"]  # the padded rows, planned exactly
    assert abs(row["grads_overlap_share"] - c3["grads"]["overlap_share"]) <= 0.15, (row, c3["grads"])
    best = two["recommended"]  # within one node each bucket to its owners; across nodes all-reduced (fewer latencies)
    assert best["mcf_vit_base_patch16@8"]["efficiency"] >= 0.95 and best["mcf_vit_base_patch16@8"]["zero"] == 1, best
    assert best["mcf_vit_base_patch16@64"]["efficiency"] >= 0.90, best
    assert best["mcf_vit_base_patch16@64"]["option"] == "allreduce-bf16", best


def test_network_model():
    from mcf.bench.projection import Network

    net = Network()
    b = 1e9
    assert net.seconds("all_reduce", b, 1) == 0.0
    # an all-reduce sends twice an all-gather's bytes; inside a node at NVLink speed, across nodes at the NICs'
    assert net.wire_bytes("all_reduce", b, 64) == 2 * net.wire_bytes("all_gather_into_tensor", b, 64)
    assert net.bus_GBps(8) == 360.0 and net.bus_GBps(64) == min(360.0, 8 * 50 * 0.8)
    assert Network(rail_aligned=False).bus_GBps(64) == 50 * 0.8
    t8, t64 = net.seconds("reduce", b, 8), net.seconds("reduce", b, 64)
    assert t64 > t8  # more hops, a slower bus
    assert math.isclose(t8, 7e-6 + 7 / 8 * b / 360e9)


def test_counts_extrapolated_by_blocks_project_like_the_whole_count():
    """ZeRO-3 counted at a model's widths with fewer blocks (``mcf.bench.scale_widths``): two counts a unit of
    blocks apart, every class of collective linear in the blocks, give the whole model's count class by class;
    projected, it gives what the whole count gives. And the EMA of the bf16 weights (``+ema-bf16``) has no
    bytes of its own in the minimum."""
    from mcf.bench.projection import Compute, Network, extrapolate_blocks, model_facts, project

    full = model_facts("mcf_vit_tiny")["trainable"]
    block = 1000  # elements per unit of blocks

    def counted(units: int) -> dict:
        trainable = full - (4 - units) * block
        calls = [["other", "broadcast", "int64", 8, False]] * 2  # fixed: every count has them
        calls += [["other", "all_gather_into_tensor", "bfloat16", 2 * 500, False]] * (2 * units)  # per block
        calls += [["grads", "reduce_scatter_tensor", "bfloat16", 2 * trainable / 8, True]] * 7
        calls += [["grads", "reduce_scatter_tensor", "bfloat16", 2 * trainable / 8, False]]
        calls += [["params", "all_gather_into_tensor", "bfloat16", 2 * 10, False]] * (3 * units)  # persistent ones
        calls += [["ema", "all_gather_single", "bfloat16", 2 * 100 * units, False], ["keys", "all_gather_into_tensor",
                                                                                      "float32", 4 * 64 * 4, False]]
        return {"step_2_calls": calls, "facts": {"trainable": trainable, "proj_dim": 64}, "world": 2, "batch_size": 2,
                "ema_gather_elements": 100 * units, "option": "reduce-bf16", "precision": "bf16", "param_bytes": 2,
                "reduce_bytes": 2, "forward_bytes": 2}

    x = extrapolate_blocks(counted(1), counted(2), (1, 2, 4))
    whole = counted(4)
    assert x["facts"]["trainable"] == full and x["ema_gather_elements"] == whole["ema_gather_elements"]
    by_class = {(c[0], c[1], c[4]): (c[5], c[3]) for c in x["step_2_calls"]}
    assert by_class[("other", "all_gather_into_tensor", False)] == (8, 8 * 1000)
    assert by_class[("params", "all_gather_into_tensor", False)] == (12, 12 * 20)
    assert by_class[("other", "broadcast", False)] == (2, 16)
    net, compute = Network(), Compute(batch_size=2)
    for gpus in (8, 64):
        a, b = project(x, 3, "mcf_vit_tiny", gpus, net, compute), project(whole, 3, "mcf_vit_tiny", gpus, net, compute)
        assert math.isclose(a["step_ms"], b["step_ms"], rel_tol=1e-9), (a["step_ms"], b["step_ms"])
        for label in b["by_label"]:
            assert math.isclose(a["by_label"][label]["bytes"], b["by_label"][label]["bytes"], rel_tol=1e-9), label
            assert math.isclose(a["by_label"][label]["collectives"], b["by_label"][label]["collectives"]), label
        # the forward's gathers are gathered once (nothing in the backward): the minimum counts one all-gather
        assert math.isclose(b["minimum_bytes"], full * 2 * 2 + model_facts("mcf_vit_tiny")["target"] * 2
                            + gpus * 2 * 64 * 4)
    bf16_ema = {**whole, "step_2_calls": [c for c in whole["step_2_calls"] if c[0] != "ema"],
                "ema_source": "bf16_params", "ema_gather_elements": 0}
    r = project(bf16_ema, 1, "mcf_vit_tiny", 64, net, compute)
    assert "ema" not in r["by_label"] and r["minimum_bytes"] == full * 2 * 2 + 64 * 2 * 64 * 4


def test_scale_widths_counts_the_model_at_two_block_counts(tmp_path, capsys):
    """``mcf bench scale-widths`` end to end on the tiny model (ZeRO-3, one rank, ~40 s): counts with half and all
    of its blocks (``--units 1,2,2``: its 2 decoder blocks have no quarter), extrapolated to all of them, which is
    then the whole count class by class; projected at each GPU count; the JSON printed and written."""
    from mcf.bench.projection import model_facts

    out = tmp_path / "widths.json"
    assert main(["bench", "scale-widths", "--tracking-uri", "none", "--model", "mcf_vit_tiny", "--units", "1,2,2",
                 "--stages", "3", "--options", "reduce-fp32", "--precision", "fp32", "--nproc", "1", "--gpus", "8,64",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert (result["benchmark"], result["model"], result["units"], result["zero_set"]) == (
        "scale_widths", "mcf_vit_tiny", [1, 2, 2], {})
    ((key, counted),) = result["counted"].items()
    assert key == "3:reduce-fp32"
    half, whole = counted["counts"]
    full = model_facts("mcf_vit_tiny")["trainable"]
    assert half["facts"]["trainable"] < whole["facts"]["trainable"] == counted["comm"]["facts"]["trainable"] == full

    def classes(calls: list) -> dict:
        out: dict = {}
        for label, op, dtype, nbytes, in_backward, *times in calls:
            n, b = out.get((label, op, dtype, bool(in_backward)), (0.0, 0.0))
            out[(label, op, dtype, bool(in_backward))] = (n + (times[0] if times else 1.0), b + nbytes)
        return out

    got, want = classes(counted["comm"]["step_2_calls"]), classes(whole["step_2_calls"])
    assert got.keys() == want.keys() and any(k[3] for k in got)  # the backward's gradient reductions among them
    for k in want:
        assert got[k][0] == want[k][0] and math.isclose(got[k][1], want[k][1], rel_tol=1e-12), k
    assert [(r["gpus"], r["zero"], r["option"]) for r in result["projection"]] == [(8, 3, "reduce-fp32"),
                                                                                 (64, 3, "reduce-fp32")]


def test_scale_widths_zero_set_and_bucket_share_reach_the_counted_json(tmp_path):
    """``zero_set`` pairs land in the counted DeepSpeed JSON's ``zero_optimization``, and its absolute prefetch bucket
    is scaled by the counted model's share of the trainable elements."""
    from mcf.bench.cli import config_from_args
    from mcf.bench.scale_widths import _ds_json
    from mcf.cli import build_parser
    from mcf.train.engine import default_ds_config_path, load_ds_json

    args = build_parser().parse_args(["bench", "scale-widths", "--zero-set",
                                      'stage3_param_persistence_threshold=10000,stage3_max_live_parameters=1e9'])
    zero_set = config_from_args(args).zero_optimization()
    assert zero_set == {"stage3_param_persistence_threshold": 10000, "stage3_max_live_parameters": 1e9}
    shipped = load_ds_json(str(default_ds_config_path(3, "bf16")))["zero_optimization"]
    zo = json.loads(_ds_json(3, "bf16", 0.25, tmp_path, "q", zero_set).read_text())["zero_optimization"]
    assert {k: zo[k] for k in zero_set} == zero_set
    assert zo["stage3_prefetch_bucket_size"] == max(1, round(shipped["stage3_prefetch_bucket_size"] * 0.25))
