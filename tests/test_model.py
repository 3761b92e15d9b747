import pytest
import torch
from tolerances import assert_close_scaled, assert_no_worse_than

from mcf.errors import ConfigError
from mcf.models import Objective, create_model, list_models
from mcf.models.pos_embed import interpolate_pos_embed, sincos_2d


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return create_model("mcf_vit_tiny", teacher_checkpoint="random")


def test_registry_lists_paper_sizes():
    names = list_models()
    for n in [
        "mcf_vit_tiny", "mcf_vit_small_patch16", "mcf_vit_base_patch16", "mcf_vit_large_patch16",
        "mcf_vit_huge_patch14", "mcf_vit_base_patch16_dec512d1b", "mcf_vit_base_patch16_dec512d4b",
    ]:
        assert n in names
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("mcf_vit_gigantic", teacher_checkpoint="random")


def test_teacher_checkpoint_is_required():
    with pytest.raises(ConfigError, match="teacher checkpoint is required"):
        create_model("mcf_vit_tiny")


def test_every_trainable_parameter_gets_a_gradient_and_frozen_parts_none(tiny):
    tiny.train()
    out = tiny(torch.randn(4, 3, 32, 32))
    assert out.pred.shape == (4, 64, 48) and out.mask.shape == (4, 64)
    assert set(out.losses) == {"perceptual", "contrastive", "pixel"}
    out.loss.backward()
    for name, p in tiny.online.named_parameters():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in list(tiny.target.named_parameters()) + list(tiny.teacher.named_parameters()):
        assert not p.requires_grad and p.grad is None, name
    # frozen parts stay in eval mode through model.train()
    assert not tiny.teacher.training and not tiny.target.training and tiny.online.training


def test_loss_is_weighted_sum_of_reported_terms(tiny):
    out = tiny(torch.randn(4, 3, 32, 32))
    expected = 1000 * out.losses["perceptual"] + out.losses["contrastive"]
    assert_close_scaled(out.loss.detach(), expected, depth=2)  # a sum of weighted scalars, in another order
    m2 = create_model("mcf_vit_tiny", teacher_checkpoint="random", objective=Objective(pixel_weight=2.0, norm_pix=True))
    o2 = m2(torch.randn(4, 3, 32, 32))
    want = 1000 * o2.losses["perceptual"] + o2.losses["contrastive"] + 2 * o2.losses["pixel"]
    assert_close_scaled(o2.loss.detach(), want, depth=3)


def test_ema_matches_formula(tiny):
    with torch.no_grad():
        for p in tiny.online.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in tiny.target.named_parameters()}
    online = dict(tiny.online.named_parameters())
    tiny.update_target(0.99)
    for n, p in tiny.target.named_parameters():
        assert_close_scaled(p, before[n] * 0.99 + online[n] * 0.01, depth=2, msg=n)  # lerp vs mul-add: last bits
    # explicit fp32 masters (what the trainer passes under mixed precision / ZeRO)
    masters = {n: torch.randn_like(p) for n, p in tiny.target.named_parameters()}
    before = {n: p.clone() for n, p in tiny.target.named_parameters()}
    tiny.update_target(0.9, masters)
    for n, p in tiny.target.named_parameters():
        assert_close_scaled(p, before[n] * 0.9 + masters[n] * 0.1, depth=2, msg=n)


def test_state_dict_leaves_out_teacher_and_round_trips(tiny):
    sd = tiny.state_dict()
    assert not any(k.startswith("perceptual.teacher") for k in sd)
    assert any(k.startswith("target.encoder.") for k in sd)
    other = create_model("mcf_vit_tiny", teacher_checkpoint="random")
    other.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    other.eval(), tiny.eval()
    # bit-exact: the same weights through the same code path on one host
    assert torch.equal(other.online.encoder(x, 0.75, noise)[0], tiny.online.encoder(x, 0.75, noise)[0])


def test_the_attention_backend_reaches_every_attention_teacher_included():
    """attention.backend is the whole model's: the frozen teacher's 12 blocks (most of the step's attention) follow it
    at build time and when it is changed (they stayed on auto before)."""
    from mcf.models.teacher import DispatchedAttention

    def backends(model):
        return [m.backend for m in model.modules() if hasattr(m, "backend")]

    model = create_model("mcf_vit_tiny", teacher_checkpoint="random", attn_backend="math")
    teacher = [m for m in model.teacher.modules() if isinstance(m, DispatchedAttention)]
    assert len(teacher) == 12 and {m.backend for m in teacher} == {"math"}
    assert set(backends(model)) == {"math"} and len(backends(model)) >= 12 + 4 + 2
    model.set_attention_backend("sdpa")
    assert set(backends(model)) == {"sdpa"}


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_attention_backends_agree(tiny, backend):
    x, n1, n2 = torch.randn(3, 3, 32, 32), torch.rand(3, 64), torch.rand(3, 64)
    tiny.set_attention_backend("math")
    ref = tiny(x, n1, n2).loss
    tiny.set_attention_backend(backend)
    # teacher (12 blocks) + online encoder (4) + decoder (2) + heads: other attention kernels, other last bits
    assert_close_scaled(tiny(x, n1, n2).loss, ref, depth=20)


def test_variable_mask_ratio_pads_and_trains():
    torch.manual_seed(0)
    model = create_model("mcf_vit_tiny", teacher_checkpoint="random", objective=Objective(mask_ratio_range=(0.6, 0.9)))
    x = torch.randn(8, 3, 32, 32)
    removed = model(x).mask.sum(1)
    assert removed.min() >= int(64 * 0.6) - 1 and removed.max() <= 64 - int(64 * 0.1) and removed.unique().numel() > 1
    # padded keys must not change the visible tokens' encoding: compare with an unpadded pass
    enc = model.online.encoder.eval()
    noise = torch.rand(2, 64)
    lat, m, key_mask = enc(x[:2], 0.75, noise, torch.tensor([0.75, 0.9]))
    assert key_mask is not None and key_mask.sum(1).tolist() == [17, 7]
    alone, _, _ = enc(x[1:2], 0.9, noise[1:2])
    assert_close_scaled(lat[1, :7], alone[0], depth=5)  # patch embed + 4 blocks at other GEMM shapes
    # and the model trains: the loss falls on a fixed batch
    model.train()
    opt = torch.optim.AdamW(model.online.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses


def test_pos_embed_interpolation_preserves_grid():
    pe = sincos_2d(32, 4)
    same = interpolate_pos_embed(pe, 16)
    assert same is pe
    big = interpolate_pos_embed(pe, 64)
    assert big.shape == (1, 65, 32)
    assert torch.equal(big[:, 0], pe[:, 0])  # bit-exact: the class token is copied, not interpolated


def test_base_model_api_at_224():
    model = create_model("mcf_vit_base_patch16", teacher_checkpoint="random")
    assert model.num_patches == 196 and model.teacher.img_size == 224
    noise = torch.rand(2, 196)
    out = model(torch.randn(2, 3, 224, 224), online_noise=noise, target_noise=torch.rand(2, 196))
    assert out.pred.shape == (2, 196, 768) and torch.all(out.mask.sum(1) == 147)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_triton_backend_in_the_model_matches_math_with_variable_ratios():
    """The padded variable-ratio encoder through the Triton kernels (CPU: Triton's interpreter).

    Reference: the math backend in fp64. Triton's fp32 error must stay within twice SDPA's fp32 error
    plus a floor of a few fp32 eps of the values' magnitude (SDPA may be exact on AMX). The contrastive
    term is off: its BatchNorm over a 2-sample batch amplifies rounding so much that it would swamp the
    attention path being checked.
    """
    from mcf.kernels import triton_status

    ok, reason = triton_status(torch.empty(1))
    if not ok:
        pytest.skip(f"Triton cannot run here: {reason}")
    torch.manual_seed(0)
    model = create_model("mcf_vit_tiny", teacher_checkpoint="random", depth=1, decoder_depth=1,
                         objective=Objective(mask_ratio_range=(0.6, 0.9), contrastive_weight=0.0))
    x, n1, n2 = torch.randn(2, 3, 32, 32), torch.rand(2, 64), torch.rand(2, 64)
    results = {}
    for backend, dtype in (("math", torch.float64), ("sdpa", torch.float32), ("triton", torch.float32)):
        model.to(dtype).set_attention_backend(backend)
        # the teacher's 12 unmasked blocks stay on SDPA in the Triton pass: this test is about the padded encoder
        # and decoder (the kernels without a mask are checked in test_kernels_attention), and 12 more blocks through
        # the interpreter's backward would take minutes
        model.teacher.set_attention_backend("sdpa" if backend == "triton" else backend)
        model.zero_grad()
        torch.manual_seed(1)  # the same per-sample ratios in every pass
        out = model(x.to(dtype), n1, n2)
        out.loss.backward()
        results[backend] = [t.double() for t in (out.loss.detach(), model.online.encoder.blocks[0].attn.qkv.weight.grad,
                                                   model.online.decoder.mask_token.grad)]
    for ref, sdpa, got in zip(results["math"], results["sdpa"], results["triton"]):
        # floor: on AMX hosts SDPA can equal the fp64 reference exactly (patch embed, 1+1 blocks, head)
        assert_no_worse_than(got, ref, sdpa, dtype=torch.float32, depth=4)


def test_activation_checkpointing_gives_the_same_gradients():
    """Recomputing blocks in the backward changes no number: for every mode the loss and every
    gradient are bitwise those of ``none``, and the checkpointed blocks really run again (recompute)."""
    x, noise = torch.randn(4, 3, 32, 32), torch.rand(2, 4, 64)

    def run(mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, int]]:
        torch.manual_seed(0)
        model = create_model("mcf_vit_tiny", teacher_checkpoint="random").train()
        model.set_activation_checkpointing(mode)
        calls = {"encoder": 0, "decoder": 0, "teacher": 0}
        for part, blocks in (("encoder", model.online.encoder.blocks), ("decoder", model.online.decoder.decoder_blocks),
                             ("teacher", model.teacher.model.blocks)):
            # a pre-hook: the recompute stops early, once the saved tensors are back, so a post-hook may not run
            blocks[0].register_forward_pre_hook(lambda *_, p=part: calls.__setitem__(p, calls[p] + 1))
        out = model(x, noise[0], noise[1])
        out.loss.backward()
        return out.loss.detach(), {n: p.grad for n, p in model.online.named_parameters()}, calls

    loss0, grads0, calls0 = run("none")
    assert calls0 == {"encoder": 1, "decoder": 1, "teacher": 2}  # the teacher sees the original and the rebuilt image
    for mode in ("encoder", "decoder", "teacher", "all"):
        loss, grads, calls = run(mode)
        assert torch.equal(loss, loss0), mode
        for n, g in grads0.items():
            assert torch.equal(grads[n], g), (mode, n)
        for part in calls:  # + 1: the recompute (the teacher's pass over the original runs without autograd)
            assert calls[part] == calls0[part] + (part == mode or mode == "all"), (mode, calls)
    with pytest.raises(ValueError, match="activation checkpointing"):
        create_model("mcf_vit_tiny", teacher_checkpoint="random").set_activation_checkpointing("everything")
