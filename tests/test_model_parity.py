"""Parity with the released objective (models_mcf.py / models_moco.py of the paper's code).

``SeedMCF`` below is an independent, minimal restatement of the released model built from timm's
own ``Block``/``PatchEmbed`` in the released parameter layout; its weights go through
``from_seed_state_dict`` into our model, both see the same noise, and loss terms and the input
gradient must agree.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer
from tolerances import assert_close_scaled

from mcf.compat import from_seed_state_dict
from mcf.models import create_model

LN = partial(nn.LayerNorm, eps=1e-6)


def np_sincos_2d(dim: int, grid: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed with cls_token=True, restated in numpy."""

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)
    emb = np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def mlp(layers, d_in, hidden, d_out, last_bn=True):
    mods = []
    for i in range(layers):
        a = d_in if i == 0 else hidden
        b = d_out if i == layers - 1 else hidden
        mods.append(nn.Linear(a, b, bias=False))
        if i < layers - 1:
            mods += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            mods.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*mods)


class SeedEncoder(nn.Module):
    def __init__(self, img, p, dim, depth, heads):
        super().__init__()
        self.patch_embed = PatchEmbed(img, p, 3, dim)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(
            torch.from_numpy(np_sincos_2d(dim, int(L**0.5))).float()[None], requires_grad=False
        )
        self.blocks = nn.ModuleList([Block(dim, heads, 4.0, qkv_bias=True, norm_layer=LN) for _ in range(depth)])
        self.norm = LN(dim)

    def forward(self, x, ratio, noise):
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        N, L, D = x.shape
        keep = int(L * (1 - ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones(N, L)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(N, -1, -1)
        x = torch.cat([cls, x], 1)
        for b in self.blocks:
            x = b(x)
        return self.norm(x), mask, ids_restore


class SeedTeacher(VisionTransformer):
    def feats(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        out = []
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i in (2, 5, 8, 11):
                out.append(F.normalize(x, dim=1))
        return out


class SeedMCF(nn.Module):
    """The released objective: 1000 · perceptual + contrastive, target in train mode."""

    def __init__(self, img=32, p=4, dim=96, depth=4, heads=3, ddim=64, ddepth=2, dheads=2, hidden=256, out=64):
        super().__init__()
        self.p, self.T = p, 0.2
        self.target_encoder = SeedEncoder(img, p, dim, depth, heads)
        self.online_encoder = SeedEncoder(img, p, dim, depth, heads)
        self.online_encoder.fc = mlp(2, dim, hidden, out)
        self.target_encoder.fc = mlp(2, dim, hidden, out)
        self.predictor = mlp(2, out, hidden, out, last_bn=False)
        L = self.online_encoder.patch_embed.num_patches
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, ddim) * 0.02)
        self.decoder_pos_embed = nn.Parameter(
            torch.from_numpy(np_sincos_2d(ddim, int(L**0.5))).float()[None], requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [Block(ddim, dheads, 4.0, qkv_bias=True, norm_layer=LN) for _ in range(ddepth)]
        )
        self.decoder_norm = LN(ddim)
        self.decoder_pred = nn.Linear(ddim, p * p * 3)
        for po, pt in zip(self.online_encoder.parameters(), self.target_encoder.parameters()):
            pt.data.copy_(po.data)
        self.perceptual_loss = nn.Module()
        self.perceptual_loss.model = SeedTeacher(
            img_size=img, patch_size=4, embed_dim=64, depth=12, num_heads=2, qkv_bias=True, norm_layer=LN,
            num_classes=1000,
        )

    def unpatchify(self, x):
        h = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, h, self.p, self.p, 3)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], 3, h * self.p, h * self.p)

    def forward(self, imgs, noise1, noise2, ratio=0.75):
        latent, mask, ids_restore = self.online_encoder(imgs, ratio, noise1)
        x = self.decoder_embed(latent)
        mt = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:], mt], 1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], 1) + self.decoder_pos_embed
        for b in self.decoder_blocks:
            x = b(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        q = self.predictor(self.online_encoder.fc(latent[:, 0]))
        with torch.no_grad():
            k = self.target_encoder.fc(self.target_encoder(imgs, ratio, noise2)[0][:, 0])
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = q @ k.t() / self.T
        contrastive = F.cross_entropy(logits, torch.arange(q.shape[0])) * 2 * self.T
        t = self.perceptual_loss.model
        yf = t.feats(F.interpolate(imgs, size=32))
        pf = t.feats(F.interpolate(self.unpatchify(pred), size=32))
        perceptual = sum(F.mse_loss(a, b.detach()) for a, b in zip(pf, yf))
        return 1000 * perceptual + contrastive, perceptual, contrastive, pred, mask


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(1)
    seed = SeedMCF()
    with torch.no_grad():  # non-trivial BN affine and biases so the mapping is really exercised
        for n, prm in seed.named_parameters():
            if prm.requires_grad and ("bias" in n or n.endswith("1.weight")):
                prm.add_(torch.randn_like(prm) * 0.05)
    seed.train()
    ours = create_model("mcf_vit_tiny", teacher_checkpoint="random")
    ours.train()
    report = from_seed_state_dict(ours, {"model": seed.state_dict()})
    return seed, ours, report


def test_seed_layout_loads_completely(pair):
    _, ours, report = pair
    assert not report.missing, report.missing
    assert not report.unexpected, report.unexpected
    assert all(
        k.startswith("perceptual_loss.model.head.") or "running_" in k or "num_batches" in k for k in report.ignored
    )
    assert any(k.startswith("perceptual.teacher.") for k in report.loaded)


def test_loss_terms_and_input_gradient_match_release(pair):
    seed, ours, _ = pair
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(6, 3, 32, 32, generator=g)
    n1, n2 = torch.rand(6, 64, generator=g), torch.rand(6, 64, generator=g)

    x_ref = imgs.clone().requires_grad_(True)
    total, perc, con, pred, mask = seed(x_ref, n1, n2)
    total.backward()

    x = imgs.clone().requires_grad_(True)
    out = ours(x, online_noise=n1, target_noise=n2)
    out.loss.backward()

    assert torch.equal(out.mask, mask)  # bit-exact: the same noise sorted the same way
    # two implementations of one objective: other op order, other last bits; depth = rounding stages on the
    # longest path (online encoder 5 + decoder 3; teacher 12 + heads for the loss terms; x2 for the backward)
    assert_close_scaled(out.pred, pred, depth=8, msg="pred")
    assert_close_scaled(out.losses["perceptual"], perc.detach(), depth=20, msg="perceptual")
    assert_close_scaled(out.losses["contrastive"], con.detach(), depth=20, msg="contrastive")
    assert_close_scaled(out.loss, total, depth=20, msg="loss")
    assert_close_scaled(x.grad, x_ref.grad, depth=40, msg="input gradient")
    # and the parameter gradients of the online encoder agree too
    ref_g = seed.online_encoder.blocks[0].attn.qkv.weight.grad
    assert_close_scaled(ours.online.encoder.blocks[0].attn.qkv.weight.grad, ref_g, depth=40, msg="qkv gradient")


def test_position_embedding_matches_mae(pair):
    _, ours, _ = pair
    ref = torch.from_numpy(np_sincos_2d(96, 8)).float()[None]
    assert_close_scaled(ours.online.encoder.pos_embed, ref, depth=2)  # sin/cos of the same fp32 angles, rounded twice
    assert torch.all(ours.online.encoder.pos_embed[0, 0] == 0)  # class token position: zeros
