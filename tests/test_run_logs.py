"""What a cluster user reads and moves: plain log lines and a closing summary when stderr is a file,
MLflow's conventions (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``), a run folder that still
works after it is copied and the original deleted, and CPU threads set per rank by any launcher."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import ROOT, command, env, metrics

from mcf.train.tracking import resolve_tracking


def _pretrain(out: Path, steps: int, *extra: str, cwd: Path, log: Path, timeout: float = 400, **env_extra: str):
    """``mcf pretrain`` on the demo preset with stderr (and stdout) redirected to ``log``, as under slurm."""
    args = ["--output-dir", str(out), "--max-steps", str(steps), "--loader", "torch", "--set", "data.num_workers=0",
            *extra]
    with open(log, "w") as f:
        p = subprocess.run(command(args), cwd=cwd, env=env(**env_extra), stdout=f, stderr=subprocess.STDOUT,
                           timeout=timeout)
    text = log.read_text()
    assert p.returncode == 0, text[-4000:]
    return text


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step demo run into the run folder's own MLflow store (progress bar left on: stderr is a file),
    reconstructions and checkpoints at step 2 and 4, system metrics sampled every second."""
    base = tmp_path_factory.mktemp("run_logs")
    out = base / "runs" / "demo"
    text = _pretrain(out, 4, "--log-every", "2", "--checkpoint-every", "2", "--set", "logging.recon_every=2", cwd=base,
                     log=base / "demo.log", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    return {"base": base, "out": out, "log": text}


def _client(out: Path):
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{out}/mlflow.db")
    [r] = client.search_runs([client.get_experiment_by_name("mcf").experiment_id])
    return client, r


def test_a_log_file_gets_a_line_per_interval_and_a_summary(run):
    text, out = run["log"], run["out"]
    assert "\r" not in text and "pretrain:" not in text  # no tqdm frames
    lines = [x for x in text.splitlines() if re.search(r"INFO mcf\.train\.trainer: step \d+/4 ", x)]
    assert [re.search(r"step (\d+)/4", x).group(1) for x in lines] == ["2", "4"], text[-3000:]
    for x in lines:
        assert re.search(r"loss \d+\.\d+ \(perceptual .*, contrastive .*, pixel .*\) lr \d\.\d\de[-+]\d\d \| "
                         r"[\d.]+ img/s, data wait \d+%, MFU [\d.]+%, mem [\d.]+ GB \| ETA \d:\d\d:\d\d", x), x
    # the checkpoint and reconstructions of step 2 ran in the window closed at step 4: named there, not counted
    assert re.search(r"not counted: reconstructions [\d.]+ s, checkpoint [\d.]+ s", lines[1]), lines[1]
    last = metrics(out)[-1]
    assert last["step"] == 4 and last["side_work_s"] > 0 and 0 <= last["data_wait"] <= 1
    summary = text[text.index("done: 4 steps"):]
    assert re.search(r"in \d:\d\d:\d\d; mean [\d.]+ images/s over the training steps", summary), summary
    assert f"final loss    {last['loss']:.4f}" in summary
    assert str(out / "metrics.jsonl") in summary and "step_00000004.png" in summary
    assert str(out / "checkpoints" / "step_00000004") in summary
    _, r = _client(out)
    assert f"mlflow ui --backend-store-uri sqlite:///{out.resolve()}/mlflow.db" in summary and r.info.run_id in summary


def test_constants_are_params_and_system_metrics_are_on(run):
    client, r = _client(run["out"])
    assert float(r.data.params["perf.flops_per_image"]) > 1e6 and float(r.data.params["perf.peak_tflops"]) > 0
    assert "flops_per_image" not in r.data.metrics and "peak_tflops" not in r.data.metrics
    assert all("flops_per_image" not in rec and "peak_tflops" not in rec for rec in metrics(run["out"]))
    assert "images_per_s" in r.data.metrics and "data_wait" in r.data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in r.data.metrics), sorted(r.data.metrics)


def test_a_copied_run_folder_lists_its_artifacts_and_resumes_into_itself(run):
    """MLflow stores absolute artifact locations: the copy is re-pointed at its own mlartifacts/ when mcf opens it, so
    after the original is deleted the copy resumes, writes its pictures into itself, and lists all of them."""
    base = run["base"]
    copy = base / "moved" / "demo"
    shutil.copytree(run["out"], copy)
    shutil.rmtree(run["out"])
    text = _pretrain(copy, 5, "--log-every", "1", "--set", "logging.recon_every=5", cwd=base, log=base / "copy.log")
    assert "resumed from" in text and "was moved or copied" in text, text[-3000:]
    changed = text.split("resuming with changed config keys: ", 1)[1].splitlines()[0].split(", ")
    assert "train.max_steps" in changed and "train.output_dir" not in changed  # harmless keys not listed
    assert not [k for k in changed if k.startswith("logging.")], changed
    assert not run["out"].exists()  # nothing was written into the original's place
    client, r = _client(copy)
    assert r.info.artifact_uri.startswith((copy.resolve() / "mlartifacts").as_uri() + "/"), r.info.artifact_uri
    pngs = {a.path for a in client.list_artifacts(r.info.run_id, "reconstructions")}
    assert pngs == {f"reconstructions/step_0000000{s}.png" for s in (2, 4, 5)}
    assert len(list((copy / "mlartifacts").rglob("step_00000005.png"))) == 1
    assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [2, 4, 5]


def test_resolve_tracking_follows_mlflows_conventions(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    t = resolve_tracking(None, tmp_path, None, "mcf")
    assert t.uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db" and t.local_db == tmp_path.resolve() / "mlflow.db"
    assert t.experiment == "mcf" and "run folder" in t.rule
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "faces")
    t = resolve_tracking(None, tmp_path, None, "mcf")
    assert (t.uri, t.experiment, t.local_db) == ("http://team:5000", "faces", None)
    assert "$MLFLOW_TRACKING_URI" in t.rule and "$MLFLOW_EXPERIMENT_NAME" in t.rule
    t = resolve_tracking("sqlite:///x.db", tmp_path, "mine", "mcf")  # explicit beats the environment
    assert (t.uri, t.experiment) == ("sqlite:///x.db", "mine") and "--tracking-uri" in t.rule
    assert resolve_tracking("none", tmp_path).uri is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "none")
    assert resolve_tracking(None, tmp_path).uri is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking(None, None).uri is None  # no store anywhere: off


def test_a_started_run_leaves_the_environment_as_it_was(monkeypatch, tmp_path):
    """MLflow's set_tracking_uri/set_experiment export $MLFLOW_TRACKING_URI/$MLFLOW_EXPERIMENT_ID: run A's store
    would become the default of the next command in this process and of its children (the CI failure where a
    fine-tuning subprocess logged into an earlier test's store)."""
    from mcf.train.metrics import start_mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    sink = start_mlflow(resolve_tracking(None, tmp_path / "a", None, "mcf"), run_name="a", system_metrics=False)
    sink.end_run()
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ
    assert resolve_tracking(None, tmp_path / "b").local_db == (tmp_path / "b").resolve() / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:5000")  # an exported value stays exported
    sink = start_mlflow(resolve_tracking(f"sqlite:///{tmp_path / 'c.db'}", None), run_name="c", system_metrics=False)
    sink.end_run()
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://team:5000" and "MLFLOW_EXPERIMENT_ID" not in os.environ
    assert [r.info.run_name for r in _store_runs(tmp_path / "a" / "mlflow.db", "mcf")] == ["a"]


def _store_runs(db: Path, experiment: str) -> list:
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def test_pretrain_and_finetune_log_to_mlflow_tracking_uri(tmp_path):
    """A team store exported once in the environment: both commands log there, in $MLFLOW_EXPERIMENT_NAME, and say
    which rule chose it; the run folders get no store of their own."""
    from mcf.downstream import synthetic as S

    db = tmp_path / "team" / "mlflow.db"
    db.parent.mkdir()
    team = dict(MLFLOW_TRACKING_URI=f"sqlite:///{db}", MLFLOW_EXPERIMENT_NAME="faces")
    out = tmp_path / "pre"
    text = _pretrain(out, 1, "--set", "logging.recon_every=0", "--set", "logging.system_metrics=false", cwd=tmp_path,
                     log=tmp_path / "pre.log", **team)
    assert "URI from $MLFLOW_TRACKING_URI, experiment $MLFLOW_EXPERIMENT_NAME" in text
    assert not (out / "mlflow.db").exists()
    data = S.write_aflw19(tmp_path / "a", num_images=4, num_test=2, size=32)
    ft = tmp_path / "ft"
    p = subprocess.run([sys.executable, "-m", "mcf", "finetune", "alignment", "--data", str(data), "--pretrained",
                        "random", "--output-dir", str(ft), "--max-steps", "1", "--batch-size", "2", "--img-size", "32",
                        "--workers", "0"],
                       cwd=ROOT, env=env(**team), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    assert not (ft / "mlflow.db").exists()
    runs = _store_runs(db, "faces")
    assert sorted(r.info.run_name for r in runs) == ["ft", "pre"] and all(r.info.status == "FINISHED" for r in runs)


def test_bf16_on_a_cpu_that_emulates_it_is_said_at_start(tmp_path):
    """On a CPU without native bf16 products (here: torch told to leave AVX512-BF16/AMX out) a bf16 run says at
    start that its products are emulated and which precision is fast; it still runs as configured."""
    text = _pretrain(tmp_path / "run", 1, "--precision", "bf16", "--tracking-uri", "none", "--set",
                     "logging.recon_every=0", cwd=tmp_path, log=tmp_path / "run.log", ONEDNN_MAX_CPU_ISA="AVX2")
    assert "precision bf16 on a CPU without native bf16 (its class: avx2;" in text
    assert "--precision fp32 (train.precision) is the fast choice here" in text
    assert text.count("bf16 matrix products are emulated") == 1  # rank 0 only


def test_the_emulated_bf16_warning_only_where_bf16_is_emulated(monkeypatch, caplog):
    import mcf.measure
    from mcf.train.engine import warn_emulated_bf16

    for native, precision, warned in ((False, "bf16", True), (True, "bf16", False), (False, "fp32", False)):
        monkeypatch.setattr(mcf.measure, "native_bf16", lambda device, native=native: native)
        caplog.clear()
        assert warn_emulated_bf16(precision) is warned
        assert ("emulated" in caplog.text) is warned


def test_deepspeed_launcher_ranks_get_their_share_of_the_cores(tmp_path):
    """The deepspeed launcher sets no OMP_NUM_THREADS (torchrun sets 1): mcf sets cores // local ranks per rank."""
    from mcf.threads import available_cpus

    out = tmp_path / "run"
    args = ["--output-dir", str(out), "--max-steps", "1", "--loader", "torch", "--tracking-uri", "none",
            "--batch-size", "4", "--set", "data.num_workers=0", "--set", "logging.recon_every=0",
            "--set", "logging.progress=false"]
    e = env()
    e.pop("OMP_NUM_THREADS")
    p = subprocess.run(command(args, nproc=2, launcher="deepspeed"), cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=500)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    want = max(available_cpus() // 2, 1)
    assert f"{want} CPU threads per rank ({available_cpus()} CPUs in the affinity mask / 2 local ranks (LOCAL_SIZE); " \
           "OMP_NUM_THREADS was unset)" in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
