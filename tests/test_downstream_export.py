"""`mcf export`: every checkpoint kind → a timm state dict with the encoder's exact features."""

import json
import subprocess
import sys

import pytest
import torch
from tolerances import assert_close_scaled

from mcf.compat import SEED_PREFIXES, from_seed_state_dict
from mcf.downstream.export import export, load_timm, read_export_metadata
from mcf.downstream.weights import build_encoder, load_encoder_weights
from mcf.errors import CheckpointError, UserError
from mcf.models import create_model

# rounding stages of mcf_vit_tiny's encoder: patch embed, 4 blocks, final norm
ENCODER_DEPTH = 6


def _model(**overrides):
    m = create_model("mcf_vit_tiny", teacher_checkpoint="random", **overrides)
    with torch.no_grad():  # move every weight away from its init so a missed key shows
        for p in m.online.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m.eval()


def to_paper_layout(model) -> dict:
    """Our MCF state dict in the released code's key layout (the inverse of SEED_PREFIXES)."""
    out = {}
    for key, value in model.state_dict().items():
        for old, new in SEED_PREFIXES:
            if key.startswith(new):
                out[old + key[len(new):]] = value.clone()
                break
    return out


def _features_match(model, path, img_size=32):
    timm_model = load_timm(path).eval()
    x = torch.randn(3, 3, img_size, img_size)
    with torch.no_grad():
        ours = model.online.encoder.forward_features(x)
        theirs = timm_model.forward_features(x)
    assert theirs.shape == ours.shape
    assert_close_scaled(theirs, ours, depth=ENCODER_DEPTH)  # timm's blocks vs ours: other kernels, other last bits


def test_export_consolidated_roundtrip_through_timm(tmp_path):
    import timm

    m = _model()
    ckpt = tmp_path / "c.pt"
    torch.save(
        {
            "online": m.online.state_dict(),
            "target": m.target.state_dict(),
            "config": {"model": {"name": "mcf_vit_tiny"}},
            "step": 9,
        },
        ckpt,
    )
    out = export(ckpt, tmp_path / "enc.safetensors")
    meta = read_export_metadata(out)
    kwargs = json.loads(meta["timm.kwargs"])
    assert meta["timm.name"] == "vit_base_patch16_224" and meta["mcf.step"] == "9"
    assert kwargs == {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 4.0}
    # the documented recipe, by hand
    tm = timm.create_model(
        meta["timm.name"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), num_classes=0, **kwargs
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_scaled(tm.forward_features(x), m.online.encoder.forward_features(x), depth=ENCODER_DEPTH)
    _features_match(m, out)


def test_export_paper_layout_drops_projector(tmp_path):
    m = _model()
    sd = to_paper_layout(m)
    assert any(k.startswith("online_encoder.fc.") for k in sd)
    # sanity: the mapping we inverted is the one from_seed_state_dict reads
    other = create_model("mcf_vit_tiny", teacher_checkpoint="random")
    from_seed_state_dict(other, {"model": sd})
    assert torch.equal(other.online.encoder.blocks[1].mlp.fc1.weight, m.online.encoder.blocks[1].mlp.fc1.weight)
    ckpt = tmp_path / "released.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, ckpt)
    w = load_encoder_weights(ckpt)
    assert w.source_format == "paper" and not any(k.startswith(("fc.", "head.")) for k in w.state_dict)
    assert w.arch.num_heads == 3 and w.arch.img_size == 32  # heads from the registry, size from pos_embed
    _features_match(m, export(ckpt, tmp_path / "paper.safetensors"))


def test_export_safetensors_reload_and_encoder_rebuild(tmp_path):
    m = _model()
    ckpt = tmp_path / "c.pt"
    torch.save({"online": m.online.state_dict(), "target": {}, "config": {}, "step": 0}, ckpt)
    out = export(ckpt, tmp_path / "a.safetensors")
    w = load_encoder_weights(out)
    assert w.source_format == "export"
    enc = build_encoder(w).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_scaled(enc.forward_features(x), m.online.encoder.forward_features(x), depth=ENCODER_DEPTH)
    # another resolution rebuilds the fixed sin-cos table: loads, runs
    assert build_encoder(w, img_size=48).forward_features(torch.randn(1, 3, 48, 48)).shape == (1, 1 + 144, 96)


def test_export_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        export(tmp_path / "missing.pt", tmp_path / "x.safetensors")
    with pytest.raises(UserError, match="random"):
        export("random", tmp_path / "x.safetensors")
    torch.save({"online": _model().online.state_dict()}, tmp_path / "c.pt")
    with pytest.raises(UserError, match=".safetensors"):
        export(tmp_path / "c.pt", tmp_path / "x.bin")
    torch.save({"something": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError):
        export(tmp_path / "bad.pt", tmp_path / "x.safetensors")


def test_export_cli_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mcf", "export", str(tmp_path / "nope"), str(tmp_path / "x.safetensors")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("mcf: error: checkpoint not found")
