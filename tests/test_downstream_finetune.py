"""`mcf finetune` end to end (CLI subprocesses: DeepSpeed is initialised once per process) on each of
FaRL's protocols (aflw19, 300w, lapa, celebamask_hq) at tiny sizes, from every kind of checkpoint, plus
the heads and the layer-wise lr decay."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerances import assert_close_scaled

from mcf.downstream import synthetic as S
from mcf.downstream.heads import (
    LandmarkModel,
    ParsingModel,
    evenly_spaced_blocks,
    layer_id,
    param_groups_lrd,
    soft_argmax,
)
from mcf.downstream.weights import build_encoder, load_encoder_weights

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    e = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MCF_OVERRIDES")
    }
    e.update(
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONPATH=str(ROOT),
        TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"),
    )
    return e


def _mcf(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "mcf", *args], capture_output=True, text=True, env=_env(), timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory) -> Path:
    """A real 2-step `mcf pretrain` run (demo preset: tiny model, built-in faces), monitor on."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    _mcf(
        "pretrain",
        "--config",
        "demo",
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--tracking-uri",
        "none",
        "--loader",
        "torch",
        "--set",
        "logging.progress=false",
        "--set",
        "data.num_workers=0",
        "--set",
        "logging.recon_every=0",
        "--set",
        "monitor.every=2",
    )
    return out


def test_trainer_logs_the_monitor(pretrain_run):
    rows = [
        json.loads(line) for line in (pretrain_run / "metrics.jsonl").read_text().splitlines() if "monitor/" in line
    ]
    assert rows and rows[-1]["step"] == 2
    assert {"monitor/face_knn_acc", "monitor/face_linear_acc", "monitor/recon_mse"} <= set(rows[-1])
    assert all(np.isfinite(rows[-1][k]) for k in rows[-1] if k.startswith("monitor/"))


# tiny overrides of the protocols' schedule and size; the trained weights are scored (an EMA of 16 steps is the init)
FT = (
    "--max-steps",
    "16",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--lr",
    "2e-3",
    "--log-every",
    "4",
    "--img-size",
    "32",
    "--ema-decay",
    "0",
    "--tracking-uri",
    "none",
)


def _falls(metrics_json: Path) -> dict:
    result = json.loads(metrics_json.read_text())
    losses = result["train_losses"]
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:3]), losses
    return result


def test_export_and_finetune_alignment_from_mcf_pretrain_run(pretrain_run, tmp_path):
    """`mcf pretrain` run → `mcf export` (timm features equal) and → `mcf finetune alignment` on .pts folders."""
    from mcf.cli import main
    from mcf.downstream.export import load_timm, read_export_metadata
    from mcf.models import create_model
    from mcf.train.checkpoint import load_consolidated

    out = tmp_path / "run.safetensors"
    assert main(["export", str(pretrain_run), str(out)]) == 0  # in-process: export starts no DeepSpeed engine
    d = load_consolidated(pretrain_run)
    m = create_model("mcf_vit_tiny", teacher_checkpoint="random").eval()
    m.online.load_state_dict(d["online"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # timm's blocks vs ours (patch embed, 4 blocks, norm): other kernels, other last bits
        assert_close_scaled(load_timm(out).eval().forward_features(x), m.online.encoder.forward_features(x), depth=6)
    assert read_export_metadata(out)["mcf.step"] == str(d["step"])

    data = S.write_300w(tmp_path / "300w", per_folder=3)
    proc = _mcf(
        "finetune",
        "alignment",
        "--data",
        str(data),
        "--pretrained",
        str(pretrain_run),
        "--output-dir",
        str(tmp_path / "ft"),
        *FT,
    )
    result = _falls(tmp_path / "ft" / "metrics.json")
    m = result["metrics"]
    assert (
        result["source_format"] == "run" and result["protocol"] == "300w" and result["test_size"] == 9
    )  # common 6 + challenging 3
    assert (
        result["config"]["context"] == 1.25
        and result["config"]["epochs"] == 250
        and result["test_split"] == "test_full"
    )
    for prefix in ("", "common/", "challenging/"):
        for k in ("nme_inter_ocular", "nme_inter_pupil"):
            assert np.isfinite(m[f"{prefix}{k}"]) and m[f"{prefix}{k}_percent"] == pytest.approx(
                100 * m[f"{prefix}{k}"]
            )
    assert "| 300W (NME, FR, AUC in %) | NME_io Full | NME_io Common | NME_io Challenging |" in proc.stdout
    assert result["config"]["head"] == "uper" and result["config"]["loss"] == "farl"  # FaRL's head and loss
    assert f"| best (epoch {result['best']['epoch']}, min nme_inter_ocular; the paper's column) |" in proc.stdout
    assert f"| last (epoch {result['last']['epoch']}) |" in proc.stdout
    assert f"{m['nme_inter_ocular_percent']:.3f}" in proc.stdout and "nme_inter_pupil_percent" in proc.stdout
    assert (tmp_path / "ft" / "finetuned.pt").is_file() and (tmp_path / "ft" / "paper_row.md").is_file()
    assert not (tmp_path / "ft" / "mlflow.db").exists()  # --tracking-uri none


def test_finetune_alignment_aflw19_from_export(pretrain_run, tmp_path):
    """The aflw19 protocol: the annotated box at scale 1.0, EMA weights scored, Full and Frontal rows."""
    from mcf.downstream.export import export

    ckpt = export(pretrain_run, tmp_path / "enc.safetensors")
    data = S.write_aflw19(tmp_path / "aflw", num_images=6, num_test=4)
    proc = _mcf(
        "finetune",
        "alignment",
        "--protocol",
        "aflw19",
        "--data",
        str(data),
        "--pretrained",
        str(ckpt),
        "--output-dir",
        str(tmp_path / "ft"),
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--img-size",
        "32",
        "--tracking-uri",
        "none",
    )
    result = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    m = result["metrics"]
    assert (
        result["source_format"] == "export"
        and result["test_size"] == 4
        and result["steps"] == 4
        and result["evaluated"] == "ema"
    )
    assert (
        result["config"]["context"] == 1.0
        and result["config"]["ema_decay"] == 0.999
        and result["config"]["lr"] == 1e-2
    )
    assert {
        "nme_diag",
        "nme_box",
        "frontal/nme_diag",
        "nme_inter_ocular",
        "nme_inter_pupil",
        "auc_box_7",
        "fr_box_7",
    } <= set(m)
    assert 0 < m["nme_diag"] < m["nme_box"] and m["nme_diag_percent"] == pytest.approx(100 * m["nme_diag"])
    assert result["paper_row"]["NME_diag Full"] == f"{m['nme_diag_percent']:.3f}"
    assert "| AFLW-19 (NME, FR, AUC in %) | NME_diag Full | NME_diag Frontal |" in proc.stdout
    assert result["config"]["box_stretch"] is True
    assert "| best (epoch 1, min nme_diag; the paper's column) |" in proc.stdout


def test_finetune_parsing_lapa_from_paper_layout(tmp_path):
    """The lapa protocol by default: 5-point alignment, tanh warp 0.8, logits warped back for F1."""
    from test_downstream_export import to_paper_layout

    from mcf.models import create_model

    ckpt = tmp_path / "released.pth"
    torch.save({"model": to_paper_layout(create_model("mcf_vit_tiny", teacher_checkpoint="random"))}, ckpt)
    data = S.write_lapa(tmp_path / "lapa", num_train=8, num_test=2)
    proc = _mcf(
        "finetune",
        "parsing",
        "--data",
        str(data),
        "--pretrained",
        str(ckpt),
        "--output-dir",
        str(tmp_path / "ft"),
        *FT,
    )
    result = _falls(tmp_path / "ft" / "metrics.json")
    m = result["metrics"]
    assert result["source_format"] == "paper" and result["protocol"] == "lapa"
    assert (result["config"]["crop"], result["config"]["warp_factor"], result["config"]["frame"]) == (
        "align",
        0.8,
        512,
    )
    assert len([k for k in m if k.startswith("f1/")]) == 10 and "f1/background" not in m
    assert (
        0 <= m["mean_f1"] <= 1
        and "mean_f1_no_hair" in m
        and m["mean_f1_percent"] == pytest.approx(100 * m["mean_f1"])
    )
    assert "| LaPa (F1 ×100) | Skin | Hair |" in proc.stdout and f"{100 * m['mean_f1']:.2f} |" in proc.stdout
    assert result["config"]["head"] == "uper" and "| best (epoch " in proc.stdout and "| last (epoch " in proc.stdout


def test_finetune_parsing_celebamask_hq_records_mlflow(tmp_path):
    """The celebamask_hq protocol (FaRL's paint order, 18 classes) for 2 epochs, recorded in the local MLflow store."""
    data = S.write_celebamask_hq(tmp_path / "c", num_images=6, size=32)
    out = tmp_path / "ft"
    _mcf(
        "finetune",
        "parsing",
        "--protocol",
        "celebamask_hq",
        "--data",
        str(data),
        "--pretrained",
        "random",
        "--output-dir",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--img-size",
        "32",
        "--workers",
        "0",
        "--log-every",
        "1",
    )
    result = json.loads((out / "metrics.json").read_text())
    m = result["metrics"]
    assert (
        result["steps"] == 4
        and result["config"]["paint_order"] == "farl"
        and len([k for k in m if k.startswith("f1/")]) == 18
    )
    assert "f1/eye_g" in m and "f1/neck_l" in m
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("mcf-finetune").experiment_id])
    assert (
        run.info.status == "FINISHED"
        and run.data.tags["protocol"] == "celebamask_hq"
        and run.data.params["protocol"] == "celebamask_hq"
    )
    # evaluated after each of the 2 epochs; the best (the reported metrics) and the last both tracked
    history = client.get_metric_history(run.info.run_id, "test/mean_f1")
    assert [h.step for h in history] == [2, 4] and [r["epoch"] for r in result["evaluations"]] == [1, 2]
    best = max(range(2), key=lambda i: history[i].value)  # ties keep the earlier epoch
    assert result["best"]["epoch"] == best + 1 and m == result["best"]["metrics"]
    assert run.data.metrics["best/mean_f1"] == pytest.approx(m["mean_f1"])
    assert run.data.metrics["best/epoch"] == best + 1 and run.data.metrics["last/epoch"] == 2
    assert run.data.metrics["last/mean_f1_percent"] == pytest.approx(100 * result["last"]["metrics"]["mean_f1"])
    assert run.data.metrics["test/mean_f1"] == pytest.approx(result["last"]["metrics"]["mean_f1"])
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"metrics.json", "paper_row.md"}
    assert (
        len(list((out / "mlartifacts").rglob("paper_row.md"))) == 1
    )  # a local store's artifacts stay in the run folder


def test_finetune_wflw_best_and_last_low_data_and_accumulation(tmp_path):
    """The wflw protocol end to end on synthetic WFLW (HRNet's CSVs, 98 points, 6 subsets) with FaRL's head
    and loss: evaluated every epoch, best and last printed with their epochs in the paper's column order;
    75 % of the train split (train_data_ratio) and 2 accumulation steps per optimizer step."""
    data = S.write_wflw(tmp_path / "wflw", num_train=8, num_test=6, size=48)
    out = tmp_path / "ft"
    proc = _mcf(
        "finetune", "alignment", "--data", str(data), "--pretrained", "random", "--output-dir", str(out),
        "--epochs", "3", "--batch-size", "2", "--grad-accum", "2", "--train-data-ratio", "0.75",
        "--img-size", "32", "--workers", "0", "--log-every", "1", "--ema-decay", "0", "--lr", "2e-3",
        "--tracking-uri", "none",
    )
    result = json.loads((out / "metrics.json").read_text())
    cfg, res = result["config"], result["resolved"]
    assert result["protocol"] == "wflw" and cfg["head"] == "uper" and cfg["loss"] == "farl" and cfg["box_stretch"]
    assert res["train_size"] == 6 and res["grad_accum"] == 2 and res["steps_per_epoch"] == 1  # 6 // 2 // 2
    assert result["steps"] == 3 and len(result["train_losses"]) == 6  # micro-steps
    ev = result["evaluations"]
    assert [r["epoch"] for r in ev] == [1, 2, 3]
    best = min(ev, key=lambda r: r["nme_inter_ocular"])
    assert result["best"]["epoch"] == best["epoch"] and result["last"]["epoch"] == 3
    assert result["metrics"] == result["best"]["metrics"]
    m = result["metrics"]
    for sub in ("largepose", "expression", "illumination", "makeup", "occlusion", "blur"):
        assert np.isfinite(m[f"{sub}/nme_inter_ocular"])
    assert {"auc_inter_ocular_10", "fr_inter_ocular_10", "nme_inter_pupil"} <= set(m)
    header = ("| WFLW (NME, FR, AUC in %) | NME_io Full | NME_io Large pose | NME_io Expression | NME_io Illumination "
              "| NME_io Make-up | NME_io Occlusion | NME_io Blur | FR_io@10 Full | AUC_io@10 Full |")
    assert header in proc.stdout
    assert f"| best (epoch {best['epoch']}, min nme_inter_ocular; the paper's column) | " \
           f"{m['nme_inter_ocular_percent']:.3f} |" in proc.stdout
    last = result["last"]["metrics"]
    assert f"| last (epoch 3) | {last['nme_inter_ocular_percent']:.3f} |" in proc.stdout
    assert (out / "paper_row.md").read_text().count("epoch") == 2


def test_finetune_frozen_backbone_trains_the_head_only(tmp_path):
    """--freeze-backbone: the encoder's weights leave the run exactly as they came in (linear probing)."""
    data = S.write_aflw19(tmp_path / "a", num_images=4, num_test=2, size=32)
    out = tmp_path / "ft"
    _mcf("finetune", "alignment", "--data", str(data), "--pretrained", "random", "--output-dir", str(out),
         "--max-steps", "2", "--batch-size", "2", "--img-size", "32", "--workers", "0", "--ema-decay", "0",
         "--freeze-backbone", "--tracking-uri", "none")
    from mcf.downstream.finetune import FinetuneConfig, _build

    torch.manual_seed(0)  # run_finetune's seed: the same random encoder
    model = _build(FinetuneConfig(task="alignment", data=str(data), pretrained="random", img_size=32))[0]
    state = torch.load(out / "finetuned.pt")
    enc = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    assert enc and all(torch.equal(state[k], v) for k, v in enc.items())
    assert not torch.equal(state["head.conv_seg.weight"], model.state_dict()["head.conv_seg.weight"])
    assert json.loads((out / "metrics.json").read_text())["config"]["freeze_backbone"] is True


@pytest.mark.parametrize("zero, frozen", [(2, False), (1, True)])
def test_finetune_on_two_ranks_with_pretrainings_communication_defaults(tmp_path, zero, frozen):
    """Two torchrun ranks at ZeRO-1/2 (gloo): the gradient reduction overlapped with the backward in buckets, owner
    reduces (pre-training's communication defaults, now also fine-tuning's), a DistributedSampler per rank; at
    ZeRO-1 with the backbone frozen (only the head's parameters in the optimizer and its buckets)."""
    from train_helpers import free_port

    data = S.write_aflw19(tmp_path / "a", num_images=8, num_test=2, size=32)
    out = tmp_path / "ft"
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "mcf", "finetune",
         "alignment", "--data", str(data), "--pretrained", "random", "--output-dir", str(out), "--max-steps", "3",
         "--batch-size", "2", "--img-size", "32", "--workers", "0", "--ema-decay", "0", "--zero", str(zero),
         "--tracking-uri", "none", *(["--freeze-backbone"] if frozen else [])],
        capture_output=True, text=True, env=_env(), timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((out / "metrics.json").read_text())
    assert result["resolved"]["world_size"] == 2 and result["config"]["zero"] == zero and result["steps"] == 3
    assert result["config"]["freeze_backbone"] is frozen
    assert len(result["train_losses"]) == 3 and all(np.isfinite(result["train_losses"]))
    assert np.isfinite(result["metrics"]["nme_diag"]) and (out / "finetuned.pt").is_file()


def test_finetune_unreachable_tracking_server_is_one_line_within_seconds(tmp_path):
    """As for pretrain: a tracking server nobody answers at is exit 2 with one line naming the URI and
    `--tracking-uri none`, in seconds (MLflow's own retries would take minutes), and nothing is trained."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there
    data = S.write_aflw19(tmp_path / "a", num_images=4, num_test=2, size=32)
    out = tmp_path / "ft"
    args = ["finetune", "alignment", "--data", str(data), "--pretrained", "random", "--output-dir", str(out),
            "--max-steps", "2", "--batch-size", "2", "--img-size", "32", "--workers", "0", "--tracking-uri", uri]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mcf", *args], capture_output=True, text=True, env=_env(), timeout=300)
    took = time.monotonic() - t0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("mcf: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert uri in lines[0] and "--tracking-uri none" in lines[0]
    assert took < 60, took  # imports and DeepSpeed's start-up; MLflow's retries alone took 4 minutes
    assert not (out / "metrics.json").exists() and not (out / "finetuned.pt").exists()


def test_finetune_cli_user_errors_are_one_line(tmp_path, capsys):
    from mcf.cli import main

    # raised while opening the data, before DeepSpeed starts: safe in-process
    assert (
        main(
            [
                "finetune",
                "parsing",
                "--data",
                str(tmp_path),
                "--pretrained",
                "random",
                "--output-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mcf: error:") and "LaPa" in err[0]
    assert main(["finetune", "alignment", "--data", str(tmp_path), "--pretrained", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_heads_shapes_and_soft_argmax():
    enc = build_encoder(load_encoder_weights("random"))
    lm = LandmarkModel(enc, 19)
    y = lm(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 19, 2) and (y >= 0).all() and (y <= 1).all()
    seg = ParsingModel(build_encoder(load_encoder_weights("random")), 11)
    assert seg.backbone.out_indices == (0, 1, 2, 3) and evenly_spaced_blocks(12) == (2, 5, 8, 11)
    assert seg(torch.randn(2, 3, 32, 32)).shape == (2, 11, 32, 32)
    h = torch.full((1, 1, 8, 8), -1e4)
    h[0, 0, 2, 5] = 0.0  # row 2, column 5
    assert soft_argmax(h)[0, 0].tolist() == pytest.approx([5.5 / 8, 2.5 / 8])


def test_layer_wise_lr_decay_groups():
    enc = build_encoder(load_encoder_weights("random"))
    model = LandmarkModel(enc, 5)
    depth = enc.depth
    assert (
        layer_id("backbone.encoder.cls_token", depth) == 0
        and layer_id("backbone.encoder.blocks.2.attn.qkv.weight", depth) == 3
    )
    assert (
        layer_id("backbone.encoder.norm.weight", depth) == depth + 1
        and layer_id("head.out.weight", depth) == depth + 1
    )
    groups = param_groups_lrd(model, depth, weight_decay=0.05, layer_decay=0.5)
    by_name = {id(p): g for g in groups for p in g["params"]}
    assert by_name[id(enc.patch_embed.proj.weight)]["lr_scale"] == 0.5 ** (depth + 1)
    assert by_name[id(enc.blocks[depth - 1].mlp.fc1.weight)]["lr_scale"] == 0.5
    assert (
        by_name[id(model.head.out.weight)]["lr_scale"] == 1.0
        and by_name[id(model.head.out.weight)]["weight_decay"] == 0.05
    )
    assert (
        by_name[id(enc.blocks[0].norm1.weight)]["weight_decay"] == 0.0
        and by_name[id(enc.cls_token)]["weight_decay"] == 0.0
    )
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
