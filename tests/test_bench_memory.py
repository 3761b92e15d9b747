"""``mcf bench memory``: the live-bytes tracker counts what it should; activation checkpointing cuts
the measured per-image bytes; the meta-device count agrees with the CPU measurement; the batch
projection follows its formula."""

from __future__ import annotations

import json

import pytest
import torch

from mcf.bench.memory import LiveBytes, max_batch, model_state_bytes
from mcf.cli import main


def test_live_bytes_tracks_creation_and_release():
    before = torch.ones(1000)  # made outside: not counted
    with LiveBytes() as t:
        a = torch.zeros(1000)  # 4000 B
        b = a + before  # 4000 B, live 8000
        del a  # live 4000
        c = torch.zeros(250, dtype=torch.float64)  # 2000 B, live 6000
        view = b[:10]  # a view: nothing new
        before.t().add_(1)  # a view and an in-place op on a tensor made outside: nothing new either
        weight_view = before.view(10, 100)
    assert t.peak == 8000 and t.live == 6000
    del b, c, view, weight_view


def test_memory_bench_tiny(tmp_path):
    out = tmp_path / "memory.json"
    assert (
        main(
            [
                "bench",
                "memory",
                "--model",
                "mcf_vit_tiny",
                "--img-size",
                "0",
                "--precision",
                "fp32",
                "--modes",
                "none,all",
                "--repeats",
                "1",
                "--project",
                "mcf_vit_tiny",
                "--project-batch-sizes",
                "8,16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    cpu = r["cpu"]["modes"]
    assert 0 < cpu["all"]["per_image_bytes"] < 0.5 * cpu["none"]["per_image_bytes"]
    for mode, row in cpu.items():
        assert row["meta_per_image_bytes"] == pytest.approx(row["per_image_bytes"], rel=0.02), (
            mode
        )  # meta count == CPU measurement
        assert row["ms_per_step"] > 0 and row["rss_high_water_bytes"] > 0
    proj = r["projection"]["mcf_vit_tiny"]
    a = r["projection_assumptions"]
    assert proj["state_bytes"] == model_state_bytes(proj["params"], a["ranks"], a["zero"])
    for row in proj["modes"].values():
        n = row["max_batch"]
        assert n == max_batch(
            row["per_image_bytes"], row["fixed_bytes"], proj["state_bytes"], a["gpu_gb"] * 1e9, a["reserve_gb"] * 1e9
        )
        assert (
            a["reserve_gb"] * 1e9 + proj["state_bytes"] + row["fixed_bytes"] + n * row["per_image_bytes"]
            <= a["gpu_gb"] * 1e9
        )
    assert proj["modes"]["all"]["max_batch"] > proj["modes"]["none"]["max_batch"]
