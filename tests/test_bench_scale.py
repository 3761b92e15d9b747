"""``mcf bench scale``: 2 gloo ranks under torchrun; ZeRO-3 must hold fewer bytes per rank than ZeRO-0."""

from __future__ import annotations

import json

from mcf.cli import main


def test_scale_json_shows_sharding(tmp_path):
    out = tmp_path / "scale.json"
    assert main(["bench", "scale", "--stages", "0,3", "--steps", "1", "--batch-size", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("stages", "summary", "target_met", "device", "backend", "model", "batch_size", "precision", "params", "date"):
        assert key in result, key
    assert result["backend"] == "gloo" and result["nproc"] == 2
    z0, z3 = result["stages"]["0"], result["stages"]["3"]
    assert len(z0["ranks"]) == len(z3["ranks"]) == 2
    p = result["params"] * 4  # fp32 bytes
    # ZeRO-0: every rank holds the parameters, their gradients and both Adam moments in full.
    for r in z0["ranks"]:
        assert r["held"]["params"] == p and r["held"]["grads"] == p
        assert abs(r["held"]["optimizer_state"] - 2 * p) < 1024
    # ZeRO-3: the parameters and the Adam moments are halved.
    for r in z3["ranks"]:
        assert abs(r["held"]["params"] - p / 2) <= 64 and abs(r["held"]["optimizer_state"] - p) < 1024
        assert r["total_bytes"] < z0["ranks"][0]["total_bytes"]
    assert z0["ms_per_step"] > 0 and z3["ms_per_step"] > 0
