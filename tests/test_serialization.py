"""Weights-only loading with mcf's allowlist (mcf/serialization.py): what DeepSpeed and the MAE family
write loads; anything that could run code is refused in one line and never runs; DeepSpeed's own
reads go through the same path; MAE checkpoints as MAE's ``misc.save_model`` writes them work for
``mcf export``, ``model.init_from`` and teachers."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch

from mcf.errors import CheckpointError, UnsafeCheckpointError
from mcf.serialization import check_file, safe_load, safe_torch_load, unsafe_globals


class Payload:
    """Unpickling this creates ``marker`` (a stand-in for any code an attacker would run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_payload(path: Path, marker: Path, around: dict | None = None, raw: bool = False) -> Path:
    """A checkpoint-looking file with the payload inside (torch zip format, or a raw pickle)."""
    obj = {**(around or {}), "extra": Payload(marker)}
    if raw:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path)
    return path


def test_deepspeed_types_load_and_others_are_refused(tmp_path):
    """The non-tensor types of DeepSpeed 0.19.8's shards (listed by saving ZeRO 0-3 x fp32/bf16
    checkpoints and asking the weights-only unpickler what it rejects; fp16 adds the dynamic
    scaler) load; a file holding anything else is refused naming the type."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    dynamic = CreateLossScaler(
        torch.half,
        0,
        True,
        dict(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2, consecutive_hysteresis=False),
    )  # as ZeRO builds it for fp16
    shard = {
        "optimizer_state_dict": {
            "loss_scaler": CreateLossScaler(torch.bfloat16, 0, False, None),
            "dynamic": dynamic,
            "zero_stage": ZeroStageEnum.gradients,
            "param_slice_mappings": [{"w": fragment_address(8, 0)}],
            "args": argparse.Namespace(lr=1e-3, name="x", sizes=[1, 2], nested={"a": None}),
        },
        "ds_version": "0.19.8",
        "flat": torch.arange(4.0),
    }
    torch.save(shard, tmp_path / "shard.pt")
    back = safe_load(tmp_path / "shard.pt")
    osd = back["optimizer_state_dict"]
    assert osd["zero_stage"] is ZeroStageEnum.gradients and osd["param_slice_mappings"][0]["w"] == fragment_address(
        8, 0
    )
    assert (
        osd["loss_scaler"].cur_scale == 1.0
        and osd["dynamic"].cur_scale == 2.0**16
        and osd["dynamic"].dtype == torch.float16
    )
    assert torch.equal(back["flat"], torch.arange(4.0)) and unsafe_globals(tmp_path / "shard.pt") == []

    import collections

    torch.save({"c": collections.defaultdict(int)}, tmp_path / "other.pt")  # harmless, but not on the list
    with pytest.raises(UnsafeCheckpointError, match=r"other\.pt: it holds collections\.defaultdict"):
        safe_load(tmp_path / "other.pt")


@pytest.mark.parametrize("raw", [False, True], ids=["torch-zip", "raw-pickle"])
def test_payload_never_runs(tmp_path, raw):
    marker = tmp_path / "PWNED"
    path = write_payload(tmp_path / "evil.pt", marker, {"module": {"w": torch.ones(2)}}, raw=raw)
    for read in (safe_load, check_file):
        with pytest.raises(UnsafeCheckpointError) as e:
            read(path)
        assert "posix.system" in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_deepspeed_reads_go_through_the_safe_path(tmp_path):
    """DeepSpeed's checkpoint engine and zero_to_fp32 call torch.load(weights_only=False): inside
    safe_torch_load() that is mcf's loader; outside, torch.load is untouched."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    marker = tmp_path / "PWNED"
    evil = write_payload(tmp_path / "mp_rank_00_model_states.pt", marker)
    original = torch.load
    with safe_torch_load():
        with pytest.raises(UnsafeCheckpointError):
            TorchCheckpointEngine().load(str(evil), map_location="cpu")
        step = tmp_path / "ckpt" / "step_1"
        step.mkdir(parents=True)
        write_payload(step / "mp_rank_00_model_states.pt", marker)
        write_payload(step / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
        with pytest.raises(UnsafeCheckpointError):
            get_fp32_state_dict_from_zero_checkpoint(str(step.parent), tag="step_1")
        with safe_torch_load():  # re-entrant
            assert torch.load is not original
    assert torch.load is original and not marker.exists()


def test_damaged_files_are_checkpoint_errors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(1000)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:3000])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello")
    for name, match in [
        ("cut.pt", "cut short"),
        ("empty.pt", "is empty"),
        ("text.pt", "damaged"),
        ("nope.pt", "not found"),
    ]:
        with pytest.raises(CheckpointError, match=match) as e:
            safe_load(tmp_path / name)
        assert not isinstance(e.value, UnsafeCheckpointError) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="is a directory"):
        safe_load(tmp_path)


# -- MAE-family checkpoints --------------------------------------------------------------------------
def mae_args(**extra) -> argparse.Namespace:
    """MAE's main_pretrain.get_args_parser() defaults plus what init_distributed_mode adds."""
    args = dict(
        batch_size=64, epochs=400, accum_iter=1, model="mae_vit_base_patch16", input_size=224, mask_ratio=0.75,
        norm_pix_loss=False, weight_decay=0.05, lr=None, blr=1.5e-4, min_lr=0.0, warmup_epochs=40,
        data_path="/datasets01/imagenet_full_size/061417/", output_dir="./output_dir", log_dir="./output_dir",
        device="cuda", seed=0, resume="", start_epoch=0, num_workers=10, pin_mem=True, world_size=8, local_rank=-1,
        dist_on_itp=False, dist_url="env://", rank=0, gpu=0, distributed=True, dist_backend="nccl",
    )
    return argparse.Namespace(**{**args, **extra})


def save_like_mae(path: Path, model: torch.nn.Module, args: argparse.Namespace) -> Path:
    """What MAE's util/misc.py save_model writes: model, optimizer and GradScaler states, epoch, args."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    to_save = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 399,
               "scaler": scaler.state_dict(), "args": args}
    torch.save(to_save, path)
    return path


class MAELike(torch.nn.Module):
    """The tiny MCF encoder and decoder under MAE's parameter names (what an MAE model's state dict holds)."""

    def __init__(self):
        super().__init__()
        from mcf.models import create_model

        src = create_model("mcf_vit_tiny", teacher_checkpoint="random")
        self.enc, self.dec = src.online.encoder, src.online.decoder

    def state_dict(self, *a, **k):
        return {**self.enc.state_dict(), **self.dec.state_dict()}


def test_mae_checkpoint_works_for_init_from_export_and_teacher(tmp_path):
    from mcf.cli import main
    from mcf.models import create_model, create_teacher

    torch.manual_seed(3)
    mae = MAELike()
    path = save_like_mae(tmp_path / "checkpoint-399.pth", mae, mae_args())
    assert unsafe_globals(path) == []
    model = create_model("mcf_vit_tiny", teacher_checkpoint="random", init_from=str(path))
    # bit-exact: loading copies weights
    assert torch.equal(model.online.encoder.blocks[2].attn.qkv.weight, mae.enc.blocks[2].attn.qkv.weight)
    assert torch.equal(model.online.decoder.decoder_pred.weight, mae.dec.decoder_pred.weight)
    assert main(["export", str(path), str(tmp_path / "enc.safetensors")]) == 0
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "enc.safetensors"))["blocks.1.mlp.fc2.weight"]
    assert torch.equal(exported, mae.enc.blocks[1].mlp.fc2.weight)
    teacher_sd = create_teacher("vit_tiny_debug", "random").model.state_dict()
    torch.save({"model": teacher_sd, "epoch": 3, "args": mae_args()}, tmp_path / "teacher.pth")
    create_teacher("vit_tiny_debug", str(tmp_path / "teacher.pth"))


@pytest.mark.parametrize("bad, found", [
    (lambda m: {"device": torch.device("cuda")}, "'device' is a device"),  # MAE's is the string 'cuda'
    (lambda m: {"extra": torch.ones(1)}, "'extra' is a Tensor"),
    (lambda m: {"sched": [1, argparse.Namespace(x=1)]}, "'sched' is a Namespace"),
    (lambda m: {"hook": Payload(m)}, "posix.system"),
])
def test_mae_namespace_with_anything_but_plain_values_is_refused(tmp_path, capsys, bad, found):
    from mcf.cli import main

    marker = tmp_path / "PWNED"
    path = save_like_mae(tmp_path / "checkpoint.pth", MAELike(), mae_args(**bad(marker)))
    rc = main(["export", str(path), str(tmp_path / "enc.safetensors")])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("mcf: error:")]
    assert rc == 2 and len(lines) == 1 and "refusing to load" in lines[0] and found in lines[0], err
    assert "re-save just its weights" in lines[0] and "Traceback" not in err and not marker.exists()


@pytest.mark.parametrize("use", ["init_from", "teacher"])
def test_payload_in_init_from_or_teacher_is_refused(tmp_path, use):
    from mcf.models import create_model

    marker = tmp_path / "PWNED"
    evil = write_payload(tmp_path / "evil.pth", marker, {"model": {"cls_token": torch.zeros(1, 1, 96)}})
    kwargs = (
        {"init_from": str(evil), "teacher_checkpoint": "random"}
        if use == "init_from"
        else {"teacher_checkpoint": str(evil)}
    )
    with pytest.raises(UnsafeCheckpointError, match="evil.pth: it holds posix.system"):
        create_model("mcf_vit_tiny", **kwargs)
    assert not marker.exists()
