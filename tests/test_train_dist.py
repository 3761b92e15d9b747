"""End-to-end runs of ``mcf pretrain`` on the CPU (gloo), as subprocesses: ZeRO stages agree, the loss
falls, kill -9 / a crash inside a save / SIGUSR1 resume with exactly the uninterrupted losses,
launchers, bf16 ZeRO-3 with the EMA checked against its formula, MLflow (local store and server).

Runs of up to 20 steps stay inside the demo's 20-step warm-up, so their learning rates do not
depend on ``max_steps`` and runs of different lengths are comparable step by step.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch
from tolerances import assert_close_scaled
from train_helpers import (
    BIN,
    check,
    complete_steps,
    env,
    free_port,
    kill_tree,
    losses,
    metrics,
    pretrain_args,
    run,
    start,
    wait_for,
)

REF_STEPS = 20


@pytest.fixture(scope="module")
def zero2_reference(tmp_path_factory):
    """2 ranks, ZeRO-2, fp32, torchrun: the uninterrupted reference run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    p = check(run(pretrain_args(out, REF_STEPS, "--zero", "2"), nproc=2))
    assert "2 rank(s)" in p.stderr
    return losses(out)


def test_loss_falls(zero2_reference):
    ref = zero2_reference
    assert sorted(ref) == list(range(1, REF_STEPS + 1))
    first, last = sum(ref[s] for s in (1, 2, 3)) / 3, sum(ref[s] for s in range(REF_STEPS - 2, REF_STEPS + 1)) / 3
    assert last < 0.85 * first, ref


@pytest.mark.parametrize("zero, launcher", [(1, "torchrun"), (3, "torchrun"), (0, "deepspeed")])
def test_zero_stages_and_launchers_match(zero2_reference, tmp_path, zero, launcher):
    """ZeRO 0/1/3 give ZeRO-2's losses (known ZeRO gradient bugs would show); the deepspeed launcher starts 2 ranks."""
    out = tmp_path / "run"
    p = check(run(pretrain_args(out, 4, "--zero", str(zero)), nproc=2, launcher=launcher))
    assert "2 rank(s)" in p.stderr
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for s, v in got.items():
        assert v == pytest.approx(zero2_reference[s], rel=1e-5), (s, v, zero2_reference[s])


def test_kill9_then_crash_in_save_resume_exactly(zero2_reference, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(out, 12, "--zero", "2", "--checkpoint-every", "4")
    # 1. kill -9 the whole 2-rank job mid-training, after the checkpoint of step 4
    p = start(args, nproc=2, log=tmp_path / "a.log")
    try:
        wait_for(lambda: 4 in complete_steps(out) and max(losses(out), default=0) >= 5, 300, p, "step 5")
    finally:
        kill_tree(p)
    assert complete_steps(out) == [4], (tmp_path / "a.log").read_text()[-3000:]
    # 2. resume; the job dies inside the save of step 8 (files written, no COMPLETE marker)
    p2 = run(args, nproc=2, MCF_TEST_CRASH_IN_SAVE="8")
    assert p2.returncode != 0 and "resumed from" in p2.stderr, p2.stderr[:6000]
    assert complete_steps(out) == [4] and (out / "checkpoints" / "step_00000008" / "mcf_state.pt").is_file()
    # 3. resume again: from step 4 (the interrupted save is ignored), to the end
    p3 = check(run(args, nproc=2))
    assert "step_00000004 (step 4" in p3.stderr
    got = losses(out)
    assert got == {s: zero2_reference[s] for s in range(1, 13)}  # exactly, every step
    assert complete_steps(out) == [8, 12]  # keep_last=2


@pytest.mark.parametrize("zero", [1, 3])
def test_bf16_sharded_ema_resumes_exactly(tmp_path, zero):
    """bf16 on 2 ranks, where the fp32 EMA is sharded like the masters (ZeRO-1: flat partitions,
    ZeRO-3: per-parameter pieces) and the target computes in bf16: killed -9 after the checkpoint of
    step 3 and resumed, the run gives the uninterrupted losses exactly, every step."""
    args = ["--zero", str(zero), "--precision", "bf16", "--checkpoint-every", "3"]
    ref = check(run(pretrain_args(tmp_path / "ref", 6, *args), nproc=2))
    assert f"EMA target: {'flat' if zero == 1 else 'zero3'}" in ref.stderr and "bfloat16, one all-gather" in ref.stderr
    out = tmp_path / "run"
    p = start(pretrain_args(out, 6, *args), nproc=2, log=tmp_path / "a.log")
    try:
        wait_for(lambda: 3 in complete_steps(out) and max(losses(out), default=0) >= 4, 300, p, "step 4")
    finally:
        kill_tree(p)
    assert complete_steps(out) == [3], (tmp_path / "a.log").read_text()[-3000:]
    p2 = check(run(pretrain_args(out, 6, *args), nproc=2))
    assert "step_00000003 (step 3" in p2.stderr
    assert losses(out) == losses(tmp_path / "ref")


def test_bf16_zero3_ema_follows_the_formula_from_fp32_masters(tmp_path):
    from mcf.cli import main
    from mcf.train.checkpoint import load_consolidated

    out = tmp_path / "run"
    check(
        run(
            pretrain_args(
                out, 3, "--zero", "3", "--precision", "bf16", "--checkpoint-every", "1", "--set",
                "checkpoint.keep_last=3",
            ),
            nproc=2,
        )
    )
    got = losses(out)
    assert sorted(got) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in got.values())
    c2, c3 = (load_consolidated(out / "checkpoints" / f"step_{s:08d}") for s in (2, 3))
    m = c3["config"]["momentum"]["base"]
    assert c3["step"] == 3 and {k.split(".")[0] for k in c3["online"]} == {
        "encoder",
        "projector",
        "predictor",
        "decoder",
    }
    assert all(v.dtype == torch.float32 for v in c3["online"].values())
    not_bf16 = 0
    from mcf.config import load_config_dict
    from mcf.models import create_model_from_config

    model = create_model_from_config(load_config_dict(c3["config"]))
    ema_names = [n for n, _ in model.ema_pairs()]  # parameters; buffers (sin-cos tables) are not averaged
    assert len(ema_names) > 50
    for name in ema_names:
        t3, online = c3["target"][name], c3["online"][name]
        expected = m * c2["target"][name] + (1 - m) * online
        # m*a + (1-m)*b in fp32, elementwise: FMA or not (vectorised vs scalar kernels) changes the last bits
        assert_close_scaled(t3, expected, dtype=torch.float32, depth=2, msg=name)
        not_bf16 += int((online != online.bfloat16().float()).any())
    assert not_bf16 > 0  # the masters are real fp32 values, so a bf16-based EMA would have failed above
    # export-fp32 writes exactly the consolidated dict, loadable with weights_only=True
    assert main(["export-fp32", str(out), str(tmp_path / "w.pt")]) == 0
    exported = torch.load(tmp_path / "w.pt", weights_only=True)
    assert exported["step"] == 3 and exported["config"] == c3["config"]
    for key in ("online", "target"):
        assert exported[key].keys() == c3[key].keys()
        assert all(torch.equal(exported[key][k], c3[key][k]) for k in c3[key])
    assert load_consolidated(tmp_path / "w.pt")["step"] == 3


def test_mcf_without_arguments_runs_the_demo(tmp_path):
    """`mcf` alone = `mcf pretrain` on the demo preset (shortened through $MCF_OVERRIDES); MLflow's local
    store is read back."""
    p = subprocess.run([str(BIN / "mcf")], cwd=tmp_path, capture_output=True, text=True, timeout=400,
                       env=env(MCF_OVERRIDES="train.max_steps=6 logging.log_every=2 logging.recon_every=3"))
    check(p)
    out = tmp_path / "runs" / "demo"
    recs = metrics(out)
    assert [r["step"] for r in recs] == [2, 4, 6]
    assert set(recs[0]) >= {
        "step", "epoch", "loss", "perceptual", "contrastive", "pixel", "lr", "momentum", "images_per_s", "bad_samples",
    }
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{out}/mlflow.db")
    [run_] = client.search_runs([client.get_experiment_by_name("mcf").experiment_id])
    # the run's constants are params, logged once (mcf.train.perf); a peak raised mid-run is in the record
    flops, peak = float(run_.data.params["perf.flops_per_image"]), float(run_.data.params["perf.peak_tflops"])
    assert not any("flops_per_image" in r for r in recs)
    for r in recs:  # throughput in model FLOPs and memory, consistent with images/s
        r_peak = r.get("peak_tflops", peak)
        assert flops > 1e8 and r["peak_memory_gb"] > 0.1 and r_peak >= peak > 0
        assert r["tflops"] == pytest.approx(flops * r["images_per_s"] / 1e12, rel=1e-9)
        assert r["tflops_per_device"] == pytest.approx(r["tflops"]) and r["mfu"] == pytest.approx(r["tflops"] / r_peak)
    assert "MFU " in p.stderr  # stderr is a file here: the plain log line shows it beside images/s
    assert (out / "config.yaml").is_file() and complete_steps(out) == [6]
    pngs = sorted(x.name for x in (out / "reconstructions").glob("*.png"))
    assert pngs == ["step_00000003.png", "step_00000006.png"]
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "loss")] == [2, 4, 6]
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "mfu")] == [2, 4, 6]
    assert run_.data.params["model.name"] == "mcf_vit_tiny" and run_.info.status == "FINISHED"
    assert run_.data.tags["final_checkpoint"].endswith("step_00000006")
    assert {a.path for a in client.list_artifacts(run_.info.run_id, "reconstructions")} == {
        f"reconstructions/{x}" for x in pngs
    }


def test_sigusr1_checkpoints_exits_3_and_resumes_exactly(tmp_path, mlflow_server):
    """1 process: SIGUSR1 → checkpoint at the step boundary, exit 3; --resume auto reproduces the
    uninterrupted losses exactly and logs to a real MLflow tracking server."""
    url, healthy, server = mlflow_server
    ref = tmp_path / "ref"
    check(run(pretrain_args(ref, 8), launcher="python"))
    out = tmp_path / "run"
    p = start(pretrain_args(out, 8, "--checkpoint-every", "100"), launcher="python", log=tmp_path / "a.log")
    try:
        wait_for(lambda: max(losses(out), default=0) >= 3, 300, p, "step 3")
        os.kill(p.pid, signal.SIGUSR1)
        assert p.wait(timeout=120) == 3, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        kill_tree(p)
    [stopped] = complete_steps(out)
    assert 3 <= stopped < 8 and max(losses(out)) == stopped
    wait_for(healthy, 240, server, "the MLflow server")
    args = pretrain_args(out, 8)
    args[args.index("--tracking-uri") + 1] = url
    check(run(args, launcher="python"))
    assert losses(out) == losses(ref)
    import mlflow

    client = mlflow.tracking.MlflowClient(url)
    [run_] = client.search_runs([client.get_experiment_by_name("mcf").experiment_id])
    history = client.get_metric_history(run_.info.run_id, "loss")
    assert [m.step for m in history] == list(range(stopped + 1, 9))
    assert [m.value for m in history] == pytest.approx([losses(ref)[s] for s in range(stopped + 1, 9)])


def test_bad_data_on_one_rank_stops_every_rank(tmp_path):
    """Two ranks started without a launcher (as srun starts them, RANK/WORLD_SIZE in the
    environment): only one rank's share holds the unreadable file, and with max_bad_fraction=0 that
    rank fails once it has seen 32 samples. The other rank must not hang in the step's collectives:
    both exit with the one-line user error (status 2), at the same step, with nothing applied."""
    from data_helpers import make_folder

    data = tmp_path / "data"
    make_folder(data, 80)
    (data / "zz_truncated.jpg").write_bytes((data / "img001.jpg").read_bytes()[:200])
    out = tmp_path / "run"
    args = pretrain_args(out, 9, "--data", str(data), "--batch-size", "4", "--set", "data.max_bad_fraction=0",
                         "--checkpoint-every", "4")
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [str(BIN / "python"), "-m", "mcf", "pretrain", *args],
            cwd=env()["PYTHONPATH"],
            env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for r in range(2)
    ]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            kill_tree(p)
    assert [p.returncode for p in procs] == [2, 2], logs
    bad = [i for i, log in enumerate(logs) if "zz_truncated.jpg" in log]
    assert len(bad) == 1, logs  # exactly one rank read the bad file
    other = logs[1 - bad[0]]
    assert "other rank(s) stopped on bad data at step 8" in other, other[-3000:]
    assert "failed to decode" in logs[bad[0]], logs[bad[0]][-3000:]
    # the steps before were applied and checkpointed; the failing one was not
    assert complete_steps(out) == [4] and max(r["step"] for r in metrics(out)) == 7
