"""Trainer components in-process: schedules, parameter groups, the DeepSpeed JSON, checkpoint
discovery, pictures, and the CLI's user errors (all fail before DeepSpeed starts)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mcf.config import build_config
from mcf.errors import CheckpointError, ConfigError
from mcf.train import REQUEUE_EXIT_CODE
from mcf.train import checkpoint as ckpt
from mcf.train.engine import DS_CONFIG_DIR, build_ds_config
from mcf.train.metrics import reconstruction_grid
from mcf.train.optim import build_optimizer, lr_at, momentum_at, no_decay_names, param_groups, peak_lr


def test_requeue_exit_code():
    assert REQUEUE_EXIT_CODE == 3


def test_lr_schedule_warmup_then_cosine():
    kw = dict(peak=1e-3, min_lr=1e-5, warmup=10, total=110)
    assert lr_at(0, **kw) == pytest.approx(1e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at(110, **kw) == pytest.approx(1e-5)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    cfg = build_config("demo", ["optim.lr=null", "optim.blr=1.5e-4"])
    assert peak_lr(cfg.optim, 4096) == pytest.approx(1.5e-4 * 16)


def test_momentum_schedules():
    cfg = build_config("demo", ["momentum.base=0.99"]).momentum
    assert momentum_at(50, cfg, 100) == 0.99
    cos = build_config("demo", ["momentum.base=0.99", "momentum.schedule=cosine"]).momentum
    assert momentum_at(0, cos, 100) == pytest.approx(0.99)
    assert momentum_at(50, cos, 100) == pytest.approx(1 - 0.01 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert momentum_at(100, cos, 100) == pytest.approx(1.0)


def test_param_groups_no_decay_on_biases_norms_tokens():
    from mcf.models import create_model_from_config

    model = create_model_from_config(build_config("demo"))
    groups = param_groups(model.online, 0.05)
    names = set(no_decay_names(model.online))
    assert {"encoder.cls_token", "decoder.mask_token", "encoder.norm.weight", "encoder.blocks.0.attn.qkv.bias"} <= names
    assert "encoder.blocks.0.attn.qkv.weight" not in names
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.online.parameters())
    assert not any(p is q for g in groups for p in g["params"] for q in model.target.parameters())


def test_apex_absent_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import apex.optimizers  # noqa: F401
        pytest.skip(reason="apex installed: the missing-apex error cannot be shown")
    except ImportError:
        pass
    cfg = build_config("demo", ["optim.impl=apex"])
    with pytest.raises(ConfigError, match="apex"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], cfg.optim, 1e-3, torch.device("cpu"))


@pytest.mark.parametrize("name", sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
def test_ds_configs_fill_batch_keys(name):
    zero, precision = int(name[4]), name.split("_")[1]
    cfg = build_config("demo", [f"deepspeed.zero={zero}", f"train.precision={precision}", f"deepspeed.config={name}",
                                "train.batch_size=8", "train.accum_steps=3"])
    ds = build_ds_config(cfg, world_size=4)
    assert (
        ds["train_micro_batch_size_per_gpu"] == 8
        and ds["gradient_accumulation_steps"] == 3
        and ds["train_batch_size"] == 96
    )
    assert ds["zero_optimization"]["stage"] == zero
    assert ds[precision]["enabled"] if precision != "fp32" else not (ds["bf16"]["enabled"] or ds["fp16"]["enabled"])
    assert "optimizer" not in ds and "scheduler" not in ds


def test_ds_config_conflicts_are_errors(tmp_path):
    def cfg_with(ds: dict, *extra: str):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds))
        return build_config("demo", [f"deepspeed.config={path}", *extra])

    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        build_ds_config(cfg_with({"zero_optimization": {"stage": 3}}, "deepspeed.zero=1"), 1)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        build_ds_config(cfg_with({"train_micro_batch_size_per_gpu": 4}, "train.batch_size=8"), 1)
    with pytest.raises(ConfigError, match="bf16.enabled"):
        build_ds_config(cfg_with({"bf16": {"enabled": True}}, "train.precision=fp32"), 1)
    with pytest.raises(ConfigError, match="optimizer"):
        build_ds_config(cfg_with({"optimizer": {"type": "AdamW"}}), 1)
    ok = build_ds_config(
        cfg_with({"train_micro_batch_size_per_gpu": 8, "train_batch_size": 16}, "train.batch_size=8"), 2
    )
    assert ok["train_batch_size"] == 16


def test_checkpoint_discovery_and_pruning(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step, complete in [(5, True), (10, True), (15, True), (20, False)]:
        d = root / ckpt.step_dir_name(step)
        d.mkdir(parents=True)
        if complete:  # an old-format marker: the files every save writes must be there
            for name in ("mcf_state.pt", "mp_rank_00_model_states.pt", "rank_00000.pt"):
                torch.save({}, d / name)
            (d / ckpt.COMPLETE).write_text(f"{step}\n")
    assert ckpt.find_resume("auto", tmp_path / "run").name == "step_00000015"  # the interrupted save is skipped
    assert ckpt.find_resume("none", tmp_path / "run") is None
    assert ckpt.find_resume("auto", tmp_path / "fresh") is None
    assert ckpt.resolve_checkpoint(tmp_path / "run").name == "step_00000015"
    assert ckpt.resolve_checkpoint(root / "step_00000005").name == "step_00000005"
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.resolve_checkpoint(root / "step_00000020")
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.find_resume(str(tmp_path / "nope"), tmp_path / "run")
    ckpt.prune(root, keep_last=2)
    assert sorted(d.name for d in root.iterdir()) == ["step_00000010", "step_00000015"]


def test_load_consolidated_rejects_foreign_file(tmp_path):
    torch.save({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="export-fp32"):
        ckpt.load_consolidated(tmp_path / "x.pt")


def test_reconstruction_grid():
    images = torch.randn(2, 3, 32, 32)
    from mcf.losses.pixel import patchify

    mask = torch.zeros(2, 64)
    mask[:, ::2] = 1
    grid = reconstruction_grid(images, patchify(images, 4), mask, 4)
    assert grid.shape == (64, 96, 3) and grid.dtype.name == "uint8"
    assert (grid[:, :32] == grid[:, 64:]).all()  # a perfect rebuild equals the original


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999").items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--set", "train.bogus=1"], "unknown config key 'train.bogus'"),
    (["pretrain", "--set", "nonsense"], "key.sub=value"),
    (["pretrain", "--data", "/nonexistent/faces"], "data path not found"),
    (["pretrain", "--teacher-checkpoint", "/nonexistent/teacher.pth"], "teacher.pth"),
    (["pretrain", "--resume", "/nonexistent/run"], "checkpoint not found"),
    (["pretrain", "--zero", "1", "--set", "deepspeed.config=zero3_bf16"], "zero_optimization.stage"),
    (["pretrain", "--model", "bogus"], "unknown model"),
])
def test_user_errors_are_one_line(clean_env, capsys, argv, message):
    from mcf.cli import main

    rc = main(argv + ["--output-dir", str(clean_env / "run"), "--tracking-uri", "none"])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("mcf: error:")]
    assert rc == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_unknown_flag_exits_2(clean_env, capsys):
    from mcf.cli import main

    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--bogus-flag", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unrecognized arguments: --bogus-flag" in err and "Traceback" not in err


def test_missing_monitor_is_a_config_error_only_when_enabled(clean_env, capsys, monkeypatch):
    import sys

    from mcf.cli import main

    monkeypatch.setitem(sys.modules, "mcf.downstream.monitor", None)  # as if the module were absent
    rc = main(["pretrain", "--set", "monitor.every=5", "--data", "/nonexistent", "--tracking-uri", "none"])
    assert rc == 2 and "mcf.downstream.monitor" in capsys.readouterr().err
    # with the monitor off, the same missing module is no error: the run gets to the data check
    rc = main(["pretrain", "--data", "/nonexistent", "--tracking-uri", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "data path not found" in err and "monitor" not in err


def test_unsupported_precision_is_a_user_error(clean_env, capsys):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip(reason="fp16 is supported here: no unsupported-precision error to show")
    from mcf.cli import main

    rc = main(
        [
            "pretrain", "--precision", "fp16", "--zero", "2", "--tracking-uri", "none", "--output-dir",
            str(clean_env / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "fp16 is not supported" in err and "Traceback" not in err


def test_ds_config_skips_the_gradient_norm_only_when_nothing_reads_it(tmp_path):
    """ZeRO-1/2 without clipping: no global gradient norm (one all-reduce per parameter group saved);
    with clipping, at ZeRO 0/3, with DeepSpeed's BF16_Optimizer (grad_accum_dtype), or when the JSON
    says, DeepSpeed decides."""

    def zo(*overrides: str, ds: dict | None = None) -> dict:
        extra = []
        if ds is not None:
            path = tmp_path / "ds.json"
            path.write_text(json.dumps(ds))
            extra.append(f"deepspeed.config={path}")
        return build_ds_config(build_config("demo", [*overrides, *extra]), 2)["zero_optimization"]

    for zero in (1, 2):
        assert zo(f"deepspeed.zero={zero}", "train.precision=bf16")["compute_grad_norm"] is False
        assert "compute_grad_norm" not in zo(f"deepspeed.zero={zero}", "train.precision=bf16", "optim.grad_clip=1.0")
    for zero in (0, 3):
        assert "compute_grad_norm" not in zo(f"deepspeed.zero={zero}", "train.precision=bf16")
    assert "compute_grad_norm" not in zo(
        "deepspeed.zero=1", "train.precision=bf16", ds={"data_types": {"grad_accum_dtype": "fp32"}}
    )
    assert (
        zo("deepspeed.zero=1", "train.precision=bf16", ds={"zero_optimization": {"compute_grad_norm": True}})[
            "compute_grad_norm"
        ]
        is True
    )
