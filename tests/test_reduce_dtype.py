"""Gradients are summed across ranks in ``deepspeed.reduce_dtype`` (issue 11, defect 4).

DeepSpeed 0.19.8 sums gradients in the training dtype unless ``communication_data_type`` is set
(bf16 training → bf16 sums). mcf sets it from ``deepspeed.reduce_dtype`` (default fp32). The runs
check that it takes effect where DeepSpeed applies it — the engine's all-reduce (ZeRO 0),
DeepSpeedZeroOptimizer (ZeRO 1/2) and the stage-3 optimizer's reduce-scatter — by recording the
dtype of every reduction collective of one bf16 training step (1 rank: DeepSpeed still reduces).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from train_helpers import ROOT, env, pretrain_args

from mcf.config import build_config
from mcf.errors import ConfigError
from mcf.train.engine import DS_CONFIG_DIR, build_ds_config


@pytest.mark.parametrize("name", sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
def test_every_ds_config_gets_the_reduce_dtype(name):
    zero, precision = int(name[4]), name.split("_")[1]
    base = [f"deepspeed.zero={zero}", f"train.precision={precision}", f"deepspeed.config={name}"]
    assert build_ds_config(build_config("demo", base), 2)["communication_data_type"] == "fp32"  # the default
    assert build_ds_config(build_config("demo", [*base, "deepspeed.reduce_dtype=bf16"]), 2)["communication_data_type"] == "bf16"


def test_reduce_dtype_is_validated_and_json_conflicts_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="reduce_dtype"):
        build_config("demo", ["deepspeed.reduce_dtype=fp64"])
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"communication_data_type": "bf16"}))
    with pytest.raises(ConfigError, match="communication_data_type.*deepspeed.reduce_dtype"):
        build_ds_config(build_config("demo", [f"deepspeed.config={path}"]), 1)
    ok = build_ds_config(build_config("demo", [f"deepspeed.config={path}", "deepspeed.reduce_dtype=bf16"]), 1)
    assert ok["communication_data_type"] == "bf16"


TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _trainable_params() -> int:
    from mcf.models import create_model_from_config

    model = create_model_from_config(build_config("demo"))
    return sum(p.numel() for p in model.online.parameters() if p.requires_grad)


@pytest.mark.parametrize("zero, reduce_dtype", [(0, None), (1, None), (3, None), (2, "bf16")])
def test_gradients_are_reduced_in_the_reduce_dtype(tmp_path, zero, reduce_dtype):
    extra = ["--zero", str(zero), "--precision", "bf16", *(["--set", f"deepspeed.reduce_dtype={reduce_dtype}"] if reduce_dtype else [])]
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "reduce_probe.py"), str(report), "pretrain",
                           *pretrain_args(tmp_path / "run", 1, *extra)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(report.read_text())
    want = TORCH_NAMES[reduce_dtype or "fp32"]
    assert got["communication_data_type"]["engine"] == want
    if zero > 0:
        assert got["communication_data_type"]["optimizer"] == want
    summed: dict[str, int] = {}
    for _, dtype, numel in got["records"]:
        summed[dtype] = summed.get(dtype, 0) + numel
    # every gradient went through a reduction in the wanted dtype, and none in another low precision
    assert summed.get(want, 0) >= _trainable_params(), summed
    assert not {d for d in summed if d in ("bfloat16", "float16") and d != want}, summed


def test_communication_defaults_overlap_the_reduction_and_size_the_buckets(tmp_path):
    """ZeRO-1/2: the reduction issued from the gradient hooks (overlap_comm), to the owners within one node and
    all-reduced beyond; every stage: 8 buckets per backward (ViT-B/16: 117,963,520 trainable elements). A key the
    JSON sets wins; the shipped JSONs leave these keys to mcf (ZeRO-3's persistence threshold: set to the same 0)."""
    from mcf.train.engine import MIN_BUCKET, online_trainable_params

    def zo(world: int, *overrides: str) -> dict:
        return build_ds_config(build_config("demo", list(overrides)), world)["zero_optimization"]

    vit_b = build_config("demo", ["model.name=mcf_vit_base_patch16"])
    assert online_trainable_params(vit_b) == 117_963_520
    for zero in (1, 2):
        for precision in ("bf16", "fp32"):
            z = zo(2, f"deepspeed.zero={zero}", f"train.precision={precision}")
            assert z["overlap_comm"] is True and z["use_multi_rank_bucket_allreduce"] is False, z
            assert z["reduce_bucket_size"] == MIN_BUCKET  # the demo model: 636,592 / 8 is below the floor
        assert zo(64, f"deepspeed.zero={zero}", "train.precision=bf16")["use_multi_rank_bucket_allreduce"] is True
        z = zo(8, f"deepspeed.zero={zero}", "train.precision=bf16", "model.name=mcf_vit_base_patch16")
        assert z["reduce_bucket_size"] == 117_963_520 // 8 and z["use_multi_rank_bucket_allreduce"] is False
    z3 = zo(2, "deepspeed.zero=3", "train.precision=bf16", "model.name=mcf_vit_base_patch16")
    assert z3["reduce_bucket_size"] == 117_963_520 // 8 and "use_multi_rank_bucket_allreduce" not in z3
    # ZeRO-3: no persistent parameters (each would cost its own all-gather after every step)
    assert z3["stage3_param_persistence_threshold"] == 0
    path = tmp_path / "ds3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))  # a user's JSON without the key: mcf's default
    assert zo(2, "deepspeed.zero=3", "train.precision=bf16", f"deepspeed.config={path}")[
        "stage3_param_persistence_threshold"] == 0
    assert "overlap_comm" not in zo(2, "deepspeed.zero=0")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 12345}}))
    z = zo(2, "deepspeed.zero=2", "train.precision=bf16", f"deepspeed.config={path}")
    assert z["overlap_comm"] is False and z["reduce_bucket_size"] == 12345
