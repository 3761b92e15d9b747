"""Teacher / MAE checkpoint formats, safe loading, and errors."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from mcf.errors import CheckpointError, ConfigError
from mcf.models import create_model, create_teacher
from mcf.models.loading import read_checkpoint


@pytest.fixture(scope="module")
def reference_teacher():
    torch.manual_seed(5)
    return create_teacher("vit_tiny_debug", "random")


def _teacher_sd(t):
    return {k: v.clone() for k, v in t.model.state_dict().items()}


def _check_same(teacher, reference):
    for k, v in reference.model.state_dict().items():
        # bit-exact: a format conversion moves and renames weights, it computes nothing
        torch.testing.assert_close(teacher.model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_mocov3_format(tmp_path, reference_teacher):
    sd = {f"module.base_encoder.{k}": v for k, v in _teacher_sd(reference_teacher).items()}
    sd["module.base_encoder.head.0.weight"] = torch.randn(8, 64)  # MoCo v3 projector head: ignored
    sd["module.momentum_encoder.cls_token"] = torch.randn(1, 1, 64)
    torch.save({"state_dict": sd, "epoch": 300, "arch": "vit_tiny"}, tmp_path / "mocov3.pth.tar")
    _check_same(create_teacher("vit_tiny_debug", str(tmp_path / "mocov3.pth.tar")), reference_teacher)


def test_mae_and_timm_and_safetensors_formats(tmp_path, reference_teacher):
    sd = _teacher_sd(reference_teacher)
    torch.save({"model": sd}, tmp_path / "mae.pth")
    torch.save(sd, tmp_path / "timm.pth")
    save_file(sd, str(tmp_path / "w.safetensors"))
    for name in ("mae.pth", "timm.pth", "w.safetensors"):
        _check_same(create_teacher("vit_tiny_debug", str(tmp_path / name)), reference_teacher)


def test_missing_or_incomplete_teacher_raises(tmp_path, reference_teacher):
    with pytest.raises(CheckpointError, match="not found"):
        create_model("mcf_vit_tiny", teacher_checkpoint=str(tmp_path / "nope.pth"))
    sd = _teacher_sd(reference_teacher)
    del sd["blocks.3.attn.qkv.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="lacks"):
        create_teacher("vit_tiny_debug", str(tmp_path / "partial.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        create_teacher("vit_tiny_debug", str(tmp_path / "garbage.pth"))
    with pytest.raises(ConfigError):
        create_model("mcf_vit_tiny", teacher_checkpoint=None)


class Payload:
    """Unpickling this would run code: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_pickle_carrying_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(CheckpointError, match="refusing"):
        read_checkpoint(path)
    assert "code ran" not in capsys.readouterr().out


def test_mae_initialisation_with_pos_embed_interpolation(tmp_path):
    torch.manual_seed(0)
    src = create_model("mcf_vit_tiny", teacher_checkpoint="random", img_size=16)  # 4x4 grid
    sd = {f"{k}": v for k, v in src.online.encoder.state_dict().items()}
    sd.update(src.online.decoder.state_dict())
    sd["head.weight"] = torch.randn(10, 96)
    torch.save({"model": sd}, tmp_path / "mae.pth")
    model = create_model("mcf_vit_tiny", teacher_checkpoint="random", init_from=str(tmp_path / "mae.pth"))  # 8x8 grid
    # bit-exact: init_from copies weights (only the position table is resampled)
    assert torch.equal(model.online.encoder.blocks[1].mlp.fc1.weight, src.online.encoder.blocks[1].mlp.fc1.weight)
    assert torch.equal(model.online.decoder.decoder_pred.weight, src.online.decoder.decoder_pred.weight)
    assert model.online.encoder.pos_embed.shape == (1, 65, 96)
    # the target starts as a copy of the initialised online encoder
    assert torch.equal(model.target.encoder.blocks[1].mlp.fc1.weight, src.online.encoder.blocks[1].mlp.fc1.weight)
    without = create_model(
        "mcf_vit_tiny", teacher_checkpoint="random", init_from=str(tmp_path / "mae.pth"), init_decoder=False
    )
    assert not torch.equal(without.online.decoder.decoder_pred.weight, src.online.decoder.decoder_pred.weight)
