"""``logging.profile_step``: one trainer step under torch.profiler, its time split by the mcf.* ranges."""

from __future__ import annotations

import json

from train_helpers import check, pretrain_args, run

from mcf.train.profile import RANGES


def test_profile_step_writes_the_share_of_each_range(tmp_path):
    out = tmp_path / "run"
    p = check(run(pretrain_args(out, 3, "--set", "logging.profile_step=2", "--set", "data.num_workers=0")))
    assert "gpuGetDeviceCount" not in p.stdout + p.stderr  # kineto's false alarm on a CPU (no GPU, nothing wrong)
    assert [p.name for p in out.glob("profile_step_*.json")] == ["profile_step_2.json"]
    prof = json.loads((out / "profile_step_2.json").read_text())
    assert prof["step"] == 2 and prof["device"] == "cpu" and prof["wall_ms"] > 0
    assert set(prof["ranges"]) == set(RANGES)
    for name, r in prof["ranges"].items():
        assert r["count"] >= 1, name  # every phase ran once in the step (one micro-batch)
        assert 0 < r["host_share"] <= 1.0, (name, r)
    parts = sum(r["host_ms"] for r in prof["ranges"].values())
    assert parts <= prof["wall_ms"] * 1.001  # the ranges do not overlap
    assert (
        prof["ranges"]["mcf.teacher"]["host_ms"] > prof["ranges"]["mcf.ema"]["host_ms"]
    )  # two ViT forwards vs a foreach axpy
    assert prof["top_ops"] and all("op" in op for op in prof["top_ops"])
