"""``mcf bench step`` / ``e2e`` at a tiny size: valid JSON with every field; FLOP counts that match
the analytic count of known layers."""

from __future__ import annotations

import json

import pytest
import torch

from mcf.cli import main
from mcf.models.flops import attention_block_flops, count_flops, linear_flops

VARIANT_FIELDS = ("images_per_s", "ms_per_step", "peak_memory_bytes", "flops_per_image", "mfu", "precision")
TOP_FIELDS = ("paper", "mcf", "ratio", "device", "model", "batch_size", "precision", "peak_flops", "date", "commit")
TINY = [
    "--model", "mcf_vit_tiny", "--img-size", "0", "--batch-size", "4", "--steps", "1", "--repeats", "2", "--warmup", "1"
]


def _check(result: dict) -> None:
    for key in TOP_FIELDS:
        assert key in result, key
    for variant in ("paper", "mcf"):
        v = result[variant]
        for key in VARIANT_FIELDS:
            assert v[key] is not None, (variant, key)
        assert v["images_per_s"] > 0 and v["ms_per_step"] > 0 and v["peak_memory_bytes"] > 0
        assert 0 < v["mfu"] <= 1 and v[f"mfu_vs_{v['compute_dtype']}_peak"] <= 1  # no peak below a rate in its dtype
        assert v["flops_per_image"] == result["paper"]["flops_per_image"]
    assert result["ratio"] == pytest.approx(result["mcf"]["images_per_s"] / result["paper"]["images_per_s"])
    assert result["model"] == "mcf_vit_tiny" and result["batch_size"] == 4
    measured = result["peak_flops_measured"]  # at the start and at the end: the better of the two, or a rate above it
    for dtype in ("fp32", "bf16"):
        assert result["peak_flops"][dtype] >= max(measured["start"][dtype], measured["end"][dtype])
        assert (result["peak_flops"][dtype] > max(measured["start"][dtype], measured["end"][dtype])) == (
            dtype in result["peak_raised_to_achieved"])


def test_step_json(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert main(["bench", "step", *TINY, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    _check(result)
    assert json.loads(capsys.readouterr().out) == result  # stdout carries the same JSON
    assert result["paper"]["attention"].startswith("math") and "fused=True" in result["mcf"]["optimizer"]
    # The paper's step: its forward + backward through the online model, the EMA target and the
    # teacher (two passes) — more than 3x the online encoder alone.
    assert result["paper"]["flops_per_image"] > 1e8


def test_e2e_json_says_which_loader(tmp_path):
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", *TINY, "--workers", "0", "--loader", "torch", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    _check(result)
    assert result["benchmark"] == "e2e"
    assert result["paper"]["loader"] == "torch-pil" and result["mcf"]["loader"] == "torch"
    assert "dali_available" in result["mcf"]


def test_linear_flops_match_analytic():
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    assert count_flops(lambda: lin(x).sum().backward()) == linear_flops(8, 64, 32)
    with torch.no_grad():
        assert count_flops(lambda: lin(x)) == linear_flops(8, 64, 32, backward=False)


def test_attention_block_flops_match_analytic():
    from mcf.models.layers import Block

    blk = Block(64, 4, backend="math")
    x = torch.randn(2, 17, 64, requires_grad=True)
    assert count_flops(lambda: blk(x).sum().backward()) == attention_block_flops(2, 17, 64)
    with torch.no_grad():
        assert count_flops(lambda: blk(x)) == attention_block_flops(2, 17, 64, backward=False)


def test_compile_is_timed_beside_eager_in_one_run(tmp_path, monkeypatch):
    """``--compile`` adds ``mcf_compiled`` beside eager ``mcf`` in one JSON. The compiler itself is
    replaced by the identity here (it takes minutes on 2 shared cores); RESULTS.md has real runs."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    out = tmp_path / "step.json"
    assert main(["bench", "step", *TINY, "--variants", "mcf", "--compile", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["paper"] is None and len(compiled) == 1
    eager, comp = result["mcf"], result["mcf_compiled"]
    assert eager["compiled"] is False and comp["compiled"] is True
    for v in (eager, comp):
        assert v["images_per_s"] > 0 and v["flops_per_image"] > 1e8 and v["mfu"] > 0
    assert comp["flops_per_image"] == eager["flops_per_image"]
    assert result["compile_speedup"] == pytest.approx(comp["images_per_s"] / eager["images_per_s"])


def test_mcf_step_casts_each_weight_once():
    """bf16 mcf step: the frozen teacher's and the EMA target's forward weights are stored in bf16
    (never cast per use), autocast casts each online weight once per step (and each gradient back
    once), and the residual streams stay bf16 (no activation round trips per block)."""
    from mcf.bench.step import StepBenchConfig, build_model, mcf_step_fn
    from mcf.models.flops import CastCounter

    cfg = StepBenchConfig(model="mcf_vit_tiny", img_size=None, batch_size=2)
    cpu = torch.device("cpu")
    model = build_model(cfg, cpu, "mcf")
    step = mcf_step_fn(model, cpu, 0.99, bf16=True)
    assert (
        {p.dtype for p in model.teacher.parameters()}
        == {p.dtype for p in model.target.parameters()}
        == {torch.bfloat16}
    )
    assert {p.dtype for p in model.online.parameters()} == {torch.float32}  # the trained weights stay fp32
    x = torch.randn(2, 3, model.spec.img_size, model.spec.img_size)
    step(x)
    with CastCounter() as casts:
        step(x)
    n_online = sum(1 for _ in model.online.parameters())
    pairs = casts.summary()["by_pair"]
    # + a few for the inputs, loss terms and fixed tables (the images to bf16, fp32 losses, ...)
    assert pairs["float32->bfloat16"] <= n_online + 8, pairs
    assert pairs["bfloat16->float32"] <= n_online + 8, pairs
    assert casts.calls == sum(pairs.values())


def test_the_target_ema_stays_fp32_beside_bf16_forward_weights():
    """The target's forward weights (bf16) are the rounded fp32 EMA, not an EMA kept in bf16."""
    from mcf.bench.step import StepBenchConfig, build_model, mcf_step_fn

    cfg = StepBenchConfig(model="mcf_vit_tiny", img_size=None, batch_size=2)
    cpu = torch.device("cpu")
    model = build_model(cfg, cpu, "mcf")
    start = {n: p.detach().clone() for n, p in model.ema_pairs()}
    online0 = {n: p.detach().clone() for n, p in model.online.named_parameters()}
    step = mcf_step_fn(model, cpu, 0.5, bf16=True)
    step(torch.randn(2, 3, model.spec.img_size, model.spec.img_size))
    online = dict(model.online.named_parameters())
    for name, t in model.ema_pairs():
        expected = start[name] * 0.5 + online[name].detach() * 0.5  # fp32 EMA after one update
        assert t.dtype == torch.bfloat16
        torch.testing.assert_close(t, expected.bfloat16(), rtol=0, atol=0, msg=name)
    assert any(not torch.equal(online0[n], p) for n, p in online.items())  # the optimizer did step
