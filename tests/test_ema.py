"""The EMA target (``mcf.train.ema.TargetEMA``) on 2 gloo ranks, every ZeRO stage × fp32/bf16: its
fp32 EMA equals ``t ← m·t + (1 − m)·θ_fp32`` on the gathered fp32 masters bit for bit, its forward
weights are that EMA cast to the forward dtype, an update costs no collective where every rank
holds the masters and exactly one all-gather in the forward dtype where they are sharded, the
target computes in bf16 under bf16 training (``train.target_precision=auto``) and in fp32 with
``fp32``, and its whole fp32 state dict round-trips.

One torchrun runs every case (tests/ema_worker.py builds a fresh engine per case).
"""

from __future__ import annotations

import json
import subprocess

from train_helpers import BIN, ROOT, env, free_port

CASES = [
    {"zero": 0, "precision": "fp32"},
    {
        "zero": 0,
        "precision": "bf16",
        "freeze": "encoder.cls_token",
    },  # a frozen parameter: averaged against its fixed value
    {"zero": 1, "precision": "fp32"},
    {"zero": 1, "precision": "bf16"},
    {"zero": 1, "precision": "bf16", "target_precision": "fp32"},
    {
        "zero": 1,
        "precision": "bf16",
        "extra": {"data_types": {"grad_accum_dtype": "fp32"}},
    },  # DeepSpeed's BF16_Optimizer
    {"zero": 2, "precision": "fp32"},
    {"zero": 2, "precision": "bf16", "freeze": "encoder.cls_token"},
    {
        "zero": 2,
        "precision": "bf16",
        "uneven": True,
    },  # rows of each rank's length, as under NCCL (emulated: gloo has none)
    {"zero": 3, "precision": "fp32"},
    {"zero": 3, "precision": "bf16", "freeze": "encoder.blocks.0.norm1.weight"},
    {"zero": 3, "precision": "bf16", "target_precision": "fp32"},
]


def test_sharded_ema_is_exact_at_every_zero_stage():
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "tests" / "ema_worker.py"),
        *(json.dumps(c) for c in CASES),
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-6000:]
    results = [json.loads(line[len("RESULT ") :]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(CASES), p.stdout[-3000:]
    for case, r in zip(CASES, results):
        what = json.dumps(case)
        assert r["exact"] and r["state_dict_exact"], (
            what
        )  # fp32 EMA == the formula on the gathered masters, bit for bit
        assert r["weights_exact"] and r["restored"], what  # forward weights == EMA cast; save -> load restores both
        forward = (
            "bfloat16" if case["precision"] == "bf16" and case.get("target_precision", "auto") == "auto" else "float32"
        )
        assert r["activation_dtypes"] == [forward], (what, r["activation_dtypes"])
        masters_whole = case["zero"] == 0 or (case["zero"] < 3 and case["precision"] == "fp32")
        assert r["kind"] == ("replicated" if masters_whole else "zero3" if case["zero"] == 3 else "flat"), (
            what,
            r["kind"],
        )
        for calls in r["update_collectives"]:
            if masters_whole:
                assert calls == [], (what, calls)  # no communication at all
            else:
                assert len(calls) == 1 and calls[0][0] in (
                    "all_gather",
                    "all_gather_single",
                    "all_gather_into_tensor",
                ), (what, calls)
                assert calls[0][1] == forward, (what, calls)
        if not masters_whole:
            assert r["shard_numel"] < 0.7 * r["total_numel"], (what, r)  # each rank keeps only part of the EMA
        if case.get("uneven"):
            assert r["uneven"] and r["gathered_numel"] == r["total_numel"], (
                r
            )  # no padding: exactly the target's elements
        if case["precision"] == "bf16":
            assert r["masters_not_bf16"] > 0  # real fp32 masters: an EMA of the bf16 weights would have failed above
    assert {r["optimizer"] for r in results} >= {
        "AdamW",
        "FP16_UnfusedOptimizer",
        "DeepSpeedZeroOptimizer",
        "BF16_Optimizer",
        "DeepSpeedZeroOptimizer_Stage3",
    }
