"""``mcf bench ema-drift`` (and its alias ``python -m mcf.bench.ema_drift``): the bf16-weights EMA target against the
exact one, one gloo rank under the torchrun the command starts; its JSON on stdout and in ``--out``, its rows on
stderr as they are measured, the run tracked in MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def test_alias_runs_the_command_writes_its_json_and_tracks_it(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/store.db"
    out = tmp_path / "drift.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    proc = subprocess.run([sys.executable, "-m", "mcf.bench.ema_drift", "--steps", "2", "--batch-size", "2",
                           "--report", "1", "--out", str(out), "--tracking-uri", uri],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result  # stdout carries the result only ...
    assert '"step": 1' in proc.stderr  # ... the rank's row lines reach stderr as they are measured
    # the keys the JSON has always recorded (RESULTS.md's table is read from them)
    assert result["args"] == {"steps": 2, "batch_size": 2, "momentum": 0.99, "lr": 1e-3, "zero": 1, "report": "1",
                              "out": str(out)}
    assert (result["benchmark"], result["world"], result["u_bf16"]) == ("ema_drift", 1, 2.0**-8)
    assert [r["step"] for r in result["rows"]] == [1, 2]  # the report step and the last
    for row in result["rows"]:
        w = row["weights"]
        assert 0 < w["mean"] <= w["max"] < 0.05, w  # bf16 rounding: the two targets differ, by little
        rel = abs(row["contrastive_bf16_params"] - row["contrastive_exact"]) / abs(row["contrastive_exact"])
        assert row["contrastive_relative"] == pytest.approx(rel, rel=1e-12)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mcf-bench")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["benchmark"] == "ema_drift" and run.data.params["flag.steps"] == "2"
    assert run.data.params["flag.report"] == "1"
    assert run.data.metrics["rows.1.weights.max"] == pytest.approx(result["rows"][1]["weights"]["max"], rel=1e-12)


def test_under_torchrun_the_alias_says_how_to_run_it():
    """The former `torchrun -m mcf.bench.ema_drift`: each rank would start ranks of its own."""
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "x"}
    proc = subprocess.run([sys.executable, "-m", "mcf.bench.ema_drift", "--steps", "2"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("mcf bench: error: run `mcf bench ema-drift --nproc N`") and \
        proc.stderr.count("\n") == 1, proc.stderr
