"""Task heads on the pre-trained ViT, and layer-wise learning-rate decay.

* :class:`LandmarkHead` — **heatmap with integral (soft-argmax) regression**: two stride-2
  deconvolutions lift the patch grid to 4× (56×56 for a 224 px ViT-B/16), a 1×1 convolution makes
  one heatmap per point, and a spatial softmax turns each into its expected ``(x, y)``. The loss is
  L1 on those coordinates. Chosen over plain heatmaps (argmax quantises to the 4 px heatmap cell and
  needs Gaussian targets and flip tests) and over direct regression from the class token (throws
  away the spatial layout a MAE-style encoder is best at): it keeps the spatial prior, is
  sub-pixel, and trains on coordinates directly, so the loss is the NME up to normalisation
  (Sun et al., "Integral Human Pose Regression", 2018).
* :class:`SegmentationHead` — a **light FPN**: four evenly spaced block outputs are reduced to C
  channels, resampled to 4×, 2×, 1×, ½× the patch grid (ViTDet's simple pyramid: deconvolutions up,
  max-pool down), merged top-down as in FPN, each level is brought to 4× and summed (semantic FPN),
  and a 1×1 classifier's logits are upsampled bilinearly to the input size. Lighter than UperNet
  (no PPM, no per-level concatenation); enough for a 10-class face parser.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from mcf.models.vit import MaskedViT


def evenly_spaced_blocks(depth: int, n: int = 4) -> tuple[int, ...]:
    """``n`` block indices ending at the last one: depth 12 → (2, 5, 8, 11); depth 4 → (0, 1, 2, 3)."""
    return tuple(sorted({max(0, round(depth * (i + 1) / n) - 1) for i in range(n)}))


class ViTBackbone(nn.Module):
    """The pre-training encoder on unmasked input, returning patch-grid feature maps.

    ``forward(images [N, 3, H, W]) -> list of [N, D, H/p, W/p]`` for the blocks ``out_indices``;
    the last block's output goes through the encoder's final norm (as in ``forward_features``).
    """

    def __init__(self, encoder: MaskedViT, out_indices: tuple[int, ...] | None = None):
        super().__init__()
        self.encoder = encoder
        self.out_indices = tuple(out_indices) if out_indices is not None else (encoder.depth - 1,)
        self.embed_dim, self.depth = encoder.embed_dim, encoder.depth

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        enc = self.encoder
        x = enc.patch_embed(images)  # (N, L, D)
        N, L, D = x.shape
        g = int(round(L**0.5))
        cls = enc.cls_token.to(x.dtype).expand(N, -1, -1)
        x = torch.cat([cls, x], dim=1) + enc.pos_embed.to(x.dtype)  # (N, 1 + L, D)
        outs = []
        for i, blk in enumerate(enc.blocks):
            x = blk(x)
            if i in self.out_indices:
                y = enc.norm(x) if i == enc.depth - 1 else x
                outs.append(y[:, 1:].transpose(1, 2).reshape(N, D, g, g))  # (N, D, g, g)
        return outs


def _norm(c: int) -> nn.GroupNorm:
    """GroupNorm, not BatchNorm: no running statistics to keep in fp32 under DeepSpeed bf16, and
    independent of the (small) per-rank batch."""
    return nn.GroupNorm(math.gcd(32, c), c)


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False), _norm(c_out), nn.ReLU(inplace=True)
    )


def soft_argmax(heatmaps: torch.Tensor) -> torch.Tensor:
    """``[N, K, h, w]`` logits → ``[N, K, 2]`` expected (x, y) in [0, 1] (pixel centres at (i + ½)/w)."""
    N, K, h, w = heatmaps.shape
    p = heatmaps.float().flatten(2).softmax(-1).reshape(N, K, h, w)
    xs = (torch.arange(w, device=p.device, dtype=p.dtype) + 0.5) / w
    ys = (torch.arange(h, device=p.device, dtype=p.dtype) + 0.5) / h
    return torch.stack([(p.sum(2) * xs).sum(-1), (p.sum(3) * ys).sum(-1)], dim=-1)


class LandmarkHead(nn.Module):
    """``[N, D, g, g]`` → ``[N, K, 2]`` coordinates in [0, 1] of the input crop (see module docstring)."""

    def __init__(self, embed_dim: int, num_points: int, channels: int = 256):
        super().__init__()
        c = min(channels, embed_dim * 2)
        self.up = nn.Sequential(_up(embed_dim, c), _up(c, c))
        self.out = nn.Conv2d(c, num_points, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return soft_argmax(self.out(self.up(feats[-1])))  # (N, K, 2)


class SegmentationHead(nn.Module):
    """Four ``[N, D, g, g]`` maps → ``[N, classes, H, W]`` logits (see module docstring)."""

    def __init__(self, embed_dim: int, num_classes: int, channels: int = 128):
        super().__init__()
        c = channels
        self.lateral = nn.ModuleList([nn.Conv2d(embed_dim, c, 1) for _ in range(4)])
        self.resample = nn.ModuleList(
            [
                nn.Sequential(_up(c, c), nn.ConvTranspose2d(c, c, 2, stride=2)),  # 4×
                nn.ConvTranspose2d(c, c, 2, stride=2),  # 2×
                nn.Identity(),  # 1×
                nn.MaxPool2d(2, ceil_mode=True),  # ½×
            ]
        )
        self.smooth = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), _norm(c), nn.ReLU(inplace=True))
                for _ in range(4)
            ]
        )
        self.classifier = nn.Conv2d(c, num_classes, 1)

    def forward(self, feats: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        if len(feats) == 1:
            feats = feats * 4
        levels = [
            resample(lateral(f)) for f, lateral, resample in zip(feats, self.lateral, self.resample)
        ]  # fine → coarse
        for i in range(len(levels) - 2, -1, -1):  # top-down
            levels[i] = levels[i] + F.interpolate(
                levels[i + 1], size=levels[i].shape[-2:], mode="bilinear", align_corners=False
            )
        size = levels[0].shape[-2:]
        fused = sum(
            F.interpolate(s(x), size=size, mode="bilinear", align_corners=False)
            for x, s in zip(levels, self.smooth)
        )
        return F.interpolate(self.classifier(fused), size=out_size, mode="bilinear", align_corners=False)


class LandmarkModel(nn.Module):
    def __init__(self, encoder: MaskedViT, num_points: int):
        super().__init__()
        self.backbone = ViTBackbone(encoder)
        self.head = LandmarkHead(encoder.embed_dim, num_points)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class ParsingModel(nn.Module):
    def __init__(self, encoder: MaskedViT, num_classes: int):
        super().__init__()
        self.backbone = ViTBackbone(encoder, evenly_spaced_blocks(encoder.depth))
        self.head = SegmentationHead(encoder.embed_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images), images.shape[-2:])


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings, ``i + 1`` for block ``i``, ``depth + 1`` for the final norm and the head."""
    if name.startswith("backbone.encoder."):
        rest = name[len("backbone.encoder.") :]
        if rest.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0
        m = re.match(r"blocks\.(\d+)\.", rest)
        if m:
            return int(m.group(1)) + 1
    return depth + 1


def param_groups_lrd(
    model: nn.Module, depth: int, weight_decay: float, layer_decay: float, encoder_lr_scale: float = 1.0
) -> list[dict]:
    """AdamW groups with ``lr_scale = layer_decay ** (depth + 1 - layer_id)`` (BEiT / MAE fine-tuning), times
    ``encoder_lr_scale`` for the encoder's parameters (its final norm included: FaRL's backbone lr covers
    the whole ``backbone.visual``); no weight decay on biases, norms and tokens."""
    groups: dict[tuple[int, bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        no_wd = p.ndim == 1 or name.endswith(("cls_token", "pos_embed"))
        in_encoder = name.startswith("backbone.encoder.")
        key = (lid, no_wd, in_encoder)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - lid) * (encoder_lr_scale if in_encoder else 1.0)
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_wd else weight_decay,
                "lr_scale": scale,
                "layer_id": lid,
            }
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]
