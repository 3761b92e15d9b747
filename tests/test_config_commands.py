"""One config mechanism for every command: pretrain and finetune resolve defaults → preset/protocol → flags →
--set through :func:`mcf.configtree.resolve`, finetune's keys are listed by ``mcf config``, and finetune's DeepSpeed
config comes from the trainer's builder."""

from __future__ import annotations

import dataclasses

import pytest

from mcf.cli import build_parser, main
from mcf.configtree import resolve
from mcf.downstream.finetune import FinetuneConfig, finetune_ds_config
from mcf.errors import ConfigError
from mcf.train.engine import grad_bucket_elements


def _finetune(*argv: str) -> FinetuneConfig:
    from mcf.downstream.cli import finetune_config_from_args

    return finetune_config_from_args(build_parser().parse_args(["finetune", *argv]))


def test_pretrain_order_env_then_flags_then_set(monkeypatch):
    from mcf.train.cli import config_from_args

    monkeypatch.setenv("MCF_OVERRIDES", "train.batch_size=2 train.seed=7")
    args = build_parser().parse_args(["pretrain", "--batch-size", "3", "--set", "train.batch_size=5"])
    cfg = config_from_args(args)
    assert (cfg.train.batch_size, cfg.train.seed) == (5, 7)
    assert config_from_args(build_parser().parse_args(["pretrain", "--batch-size", "3"])).train.batch_size == 3


def test_resolve_names_missing_required_keys():
    with pytest.raises(ConfigError, match="missing config keys data, pretrained"):
        resolve(FinetuneConfig, {"task": "alignment"})


def test_finetune_flags_then_set_over_the_protocol(tmp_path):
    cfg = _finetune("alignment", "--data", str(tmp_path), "--pretrained", "random", "--protocol", "300w",
                    "--lr", "0.5", "--set", "lr=0.25", "--set", "lr_milestones=3,4", "--no-augment",
                    "--set", "ema_decay=0")
    assert (cfg.lr, cfg.lr_milestones, cfg.augment, cfg.ema_decay) == (0.25, (3, 4), False, 0.0)
    assert (cfg.epochs, cfg.context, cfg.test_split) == (250, 1.25, "test_full")  # the 300w protocol's values
    assert cfg.output_dir == "runs/finetune_alignment"


def test_finetune_defaults_unchanged_by_the_cli(tmp_path):
    """With no optional flag the CLI builds exactly the dataclass's config (the flags only set what is given)."""
    cfg = _finetune("parsing", "--data", str(tmp_path), "--pretrained", "random", "--protocol", "celebamask_hq")
    want = FinetuneConfig(task="parsing", data=str(tmp_path), pretrained="random", protocol="celebamask_hq",
                          output_dir="runs/finetune_parsing")
    assert dataclasses.asdict(cfg) == dataclasses.asdict(want)


def test_every_finetune_flag_is_a_config_key():
    """No flag is parsed and then dropped: each one's destination is a FinetuneConfig key."""
    sub = build_parser()._subparsers._group_actions[0].choices["finetune"]
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    for task in ("alignment", "parsing"):
        parser = sub._subparsers._group_actions[0].choices[task]
        dests = {a.dest for a in parser._actions} - {"help", "set", "config", "local_rank"}
        assert dests <= names, dests - names


def test_finetune_yaml_file_then_flags_then_set(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(f"data: {tmp_path}\npretrained: random\nprotocol: 300w\nepochs: 3\nlr: 0.5\nseed: 4\n")
    run = tmp_path / "run.yaml"
    run.write_text("inherit: base.yaml\nlr: 0.25\n")
    cfg = _finetune("alignment", "--config", str(run), "--epochs", "5", "--set", "seed=9")
    assert (cfg.data, cfg.pretrained, cfg.epochs, cfg.lr, cfg.seed) == (str(tmp_path), "random", 5, 0.25, 9)
    assert cfg.context == 1.25  # still the protocol's where nothing set it
    with pytest.raises(ConfigError, match="missing config key pretrained"):
        _finetune("alignment", "--data", str(tmp_path), "--protocol", "300w")
    with pytest.raises(ConfigError, match="takes a YAML file"):
        _finetune("alignment", "--config", "base", "--data", str(tmp_path), "--pretrained", "random")


def test_finetune_set_errors_are_one_line(tmp_path, capsys):
    argv = ["finetune", "alignment", "--data", str(tmp_path), "--pretrained", "random", "--protocol", "300w"]
    assert main([*argv, "--set", "lrr=1"]) == 2
    assert "unknown config key 'lrr'; did you mean lr" in capsys.readouterr().err
    assert main([*argv, "--set", "ema_decay=1.5"]) == 2
    assert "ema_decay must be in [0, 1)" in capsys.readouterr().err


def test_config_list_documents_finetune_keys(capsys):
    assert main(["config", "--list", "--command", "finetune"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(FinetuneConfig):
        assert f"\n{f.name} = " in "\n" + out
        assert f.metadata.get("help"), f"FinetuneConfig.{f.name} has no help"
    assert "data = '<required>'" in out and "ema_decay = None" in out


@pytest.mark.parametrize("zero,precision,clip,accum", [(0, "fp32", 0.0, 1), (2, "bf16", 1.0, 3)])
def test_finetune_ds_config_from_the_trainers_builder(tmp_path, zero, precision, clip, accum):
    cfg = FinetuneConfig(task="alignment", data=str(tmp_path), pretrained="random", protocol="300w", zero=zero,
                         precision=precision, grad_clip=clip)
    # the dict finetune built by hand before (fp16 named disabled now, DeepSpeed's default), and pre-training's
    # communication defaults at ZeRO-1/2: buckets from the trainable size, the reduction overlapped, owner reduces
    comm = {} if zero == 0 else {"reduce_bucket_size": grad_bucket_elements(3_000_000), "overlap_comm": True,
                                 "contiguous_gradients": True, "use_multi_rank_bucket_allreduce": False}
    assert finetune_ds_config(cfg, 4, 5, accum, trainable_params=3_000_000) == {
        "train_batch_size": 5 * 4 * accum, "train_micro_batch_size_per_gpu": 5, "gradient_accumulation_steps": accum,
        "zero_optimization": {"stage": zero, **comm}, "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False}, "gradient_clipping": clip, "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }
