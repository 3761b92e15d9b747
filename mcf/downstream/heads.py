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
* :class:`UPerHead` — **FaRL's head** (``farl.network.MMSEG_UPerHead``, mmseg's UPerNet decoder) on
  FaRL's simple pyramid (``FaRLVisualFeatures.fpns``: strides 4, 8, 16, 32; for patch 16 4×, 2×, 1×, ½× the
  patch grid) of the blocks
  :func:`farl_blocks` picks ((3, 5, 7, 11) for 12 blocks): a pyramid pooling module (scales 1, 2, 3, 6)
  on the coarsest level, FPN laterals and top-down sums, every level brought to 4× and concatenated,
  a 3×3 bottleneck, dropout 0.1 and a 1×1 classifier. The protocol presets use it; the light heads stay
  as ``--head light``. Alignment (:class:`HeatmapLandmarkModel`): one heatmap per point, a sigmoid,
  and the points as the sigmoid-weighted mean of the pixel centres (FaRL's ``heatmap2points``), trained
  with :func:`mcf.downstream.losses.farl_alignment_loss`. Normalisation: BatchNorm, converted to
  ``SyncBatchNorm`` by the fine-tuning run on several GPU ranks (FaRL's SyncBN); per rank on the CPU.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from mcf.models.vit import MaskedViT

FARL_BLOCKS = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23), 32: (8, 14, 20, 31)}  # FaRLVisualFeatures defaults


def farl_blocks(depth: int) -> tuple[int, ...]:
    """FaRL's ``output_indices`` for its depths (base 12, large 24, huge 32); other depths scale the base's
    (3, 5, 7, 11) by ``depth / 12`` (``round((i + 1) · depth / 12) − 1``, kept distinct and increasing):
    depth 4 → (0, 1, 2, 3), depth 6 → (1, 2, 3, 5)."""
    if depth in FARL_BLOCKS:
        return FARL_BLOCKS[depth]
    out: list[int] = []
    for i in FARL_BLOCKS[12]:
        j = min(depth - 1, max(0, round((i + 1) * depth / 12) - 1))
        out.append(max(j, out[-1] + 1) if out else j)
    if out[-1] >= depth:
        raise ValueError(f"a {depth}-block encoder has fewer than 4 blocks for FaRL's pyramid")
    return tuple(out)


def evenly_spaced_blocks(depth: int, n: int = 4) -> tuple[int, ...]:
    """``n`` block indices ending at the last one: depth 12 → (2, 5, 8, 11); depth 4 → (0, 1, 2, 3)."""
    return tuple(sorted({max(0, round(depth * (i + 1) / n) - 1) for i in range(n)}))


class ViTBackbone(nn.Module):
    """The pre-training encoder on unmasked input, returning patch-grid feature maps.

    ``forward(images [N, 3, H, W]) -> list of [N, D, H/p, W/p]`` for the blocks ``out_indices``;
    the last block's output goes through the encoder's final norm (as in ``forward_features``).
    """

    def __init__(self, encoder: MaskedViT, out_indices: tuple[int, ...] | None = None, final_norm: bool = True):
        super().__init__()
        self.encoder = encoder
        self.out_indices = tuple(out_indices) if out_indices is not None else (encoder.depth - 1,)
        self.embed_dim, self.depth = encoder.embed_dim, encoder.depth
        self.final_norm = final_norm  # FaRL takes the raw block outputs (no final norm)
        if not final_norm:
            encoder.norm.requires_grad_(False)  # unused: out of the optimizer (DeepSpeed would see no gradient)
        self.frozen = False

    def freeze(self) -> ViTBackbone:
        """Linear probing: no gradients, eval mode kept through ``train()`` (dropout and drop-path off),
        the forward under ``no_grad`` (no activations kept for a backward)."""
        self.frozen = True
        self.encoder.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> ViTBackbone:
        return super().train(mode and not self.frozen)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.frozen:
            with torch.no_grad():
                return self._features(images)
        return self._features(images)

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
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
                y = enc.norm(x) if i == enc.depth - 1 and self.final_norm else x
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


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm computed in fp32 whatever the input's dtype (the output in the input's): under DeepSpeed
    bf16 the weights are bf16 while the running statistics stay fp32, which the CPU kernel refuses to mix;
    the statistics are kept (and moved to) fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        for name in ("running_mean", "running_var"):
            buf = getattr(self, name)
            if buf is not None and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        y = F.batch_norm(
            x.float(),
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight.float(),
            self.bias.float(),
            self.training or self.running_mean is None,
            factor,
            self.eps,
        )
        return y.to(x.dtype)


def _conv_bn_relu(c_in: int, c_out: int, k: int) -> nn.Sequential:
    """mmseg's ``ConvModule``: conv (no bias) → BatchNorm → ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), BatchNorm2d(c_out), nn.ReLU(True))


class FaRLPyramid(nn.Module):
    """FaRL's ``_make_fpns``: four ``[N, D, g, g]`` maps → strides 4, 8, 16, 32 of the input. Patch 16 (and 14):
    deconv-BN-GELU-deconv (4×), deconv (2×), identity, 2×2 max-pool; patch 8: deconv, identity, max-pool 2,
    max-pool 4 — the same rule for any patch size (FaRL has no other; mcf's tiny ViT has patch 4: identity,
    max-pool 2, 4, 8)."""

    def __init__(self, dim: int, patch_size: int = 16):
        super().__init__()
        levels: list[nn.Module] = []
        for stride in (4, 8, 16, 32):
            f = patch_size / stride
            if f >= 4:
                levels.append(nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), BatchNorm2d(dim), nn.GELU(),
                                            nn.ConvTranspose2d(dim, dim, 2, 2)))
            elif f >= 2:
                levels.append(nn.ConvTranspose2d(dim, dim, 2, 2))
            elif f >= 1:
                levels.append(nn.Identity())
            else:
                k = round(1 / f)
                levels.append(nn.MaxPool2d(k, k))
        self.fpns = nn.ModuleList(levels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [f(x) for f, x in zip(self.fpns, feats)]


class UPerHead(nn.Module):
    """mmseg's ``UPerHead`` as FaRL configures it (``pool_scales=(1, 2, 3, 6)``, dropout 0.1,
    ``align_corners=False``): four pyramid levels ``[N, D, h_i, w_i]`` (fine → coarse) → logits
    ``[N, classes, h_0, w_0]``."""

    def __init__(self, in_channels: int, num_classes: int, channels: int, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList([_conv_bn_relu(in_channels, channels, 1) for _ in self.pool_scales])
        self.bottleneck = _conv_bn_relu(in_channels + len(self.pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList([_conv_bn_relu(in_channels, channels, 1) for _ in range(3)])
        self.fpn = nn.ModuleList([_conv_bn_relu(channels, channels, 3) for _ in range(3)])
        self.fpn_bottleneck = _conv_bn_relu(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    @staticmethod
    def _resize(x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[3]
        pooled = [  # the pyramid pooling module, each scale back at the coarsest level's size
            self._resize(m(F.adaptive_avg_pool2d(top, s)), top.shape[-2:]) for m, s in zip(self.ppm, self.pool_scales)
        ]
        levels = [lat(f) for lat, f in zip(self.lateral, feats[:3])]
        levels.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(3, 0, -1):  # top-down
            levels[i - 1] = levels[i - 1] + self._resize(levels[i], levels[i - 1].shape[-2:])
        outs = [self.fpn[i](levels[i]) for i in range(3)] + [levels[3]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0], *(self._resize(o, size) for o in outs[1:])], dim=1))
        return self.conv_seg(self.dropout(fused))


def heatmap_points(heatmaps: torch.Tensor) -> torch.Tensor:
    """FaRL's ``heatmap2points``: ``[N, K, h, w]`` non-negative weights → ``[N, K, 2]`` (x, y) in [0, 1],
    the weighted mean of the pixel centres ``(i + ½) / w``."""
    _, _, h, w = heatmaps.shape
    p = heatmaps.float()
    total = p.sum((2, 3)).clamp(min=1e-6)  # (N, K)
    xs = torch.arange(w, device=p.device, dtype=p.dtype)
    ys = torch.arange(h, device=p.device, dtype=p.dtype)
    x = (p.sum(2) * xs).sum(-1) / total
    y = (p.sum(3) * ys).sum(-1) / total
    return torch.stack([(x + 0.5) / w, (y + 0.5) / h], dim=-1)


def farl_head_channels(embed_dim: int) -> int:
    """FaRL's ``head_channel``: 768 for its base ViT (= the width); the width for other encoders."""
    return embed_dim


class HeatmapLandmarkModel(nn.Module):
    """FaRL's ``FaceAlignmentTransformer``: ViT blocks :func:`farl_blocks` → pyramid → UPerHead heatmaps
    ``[N, K, H/4, W/4]`` → sigmoid → :func:`heatmap_points`. ``forward`` returns the points ``[N, K, 2]`` in
    eval mode and ``(points, heatmap logits)`` in training mode (what the loss needs, through the
    DeepSpeed engine's own forward)."""

    def __init__(self, encoder: MaskedViT, num_points: int, channels: int | None = None):
        super().__init__()
        self.backbone = ViTBackbone(encoder, farl_blocks(encoder.depth), final_norm=False)
        self.pyramid = FaRLPyramid(encoder.embed_dim, encoder.patch_embed.patch_size)
        self.head = UPerHead(encoder.embed_dim, num_points, channels or farl_head_channels(encoder.embed_dim))

    def forward(self, images: torch.Tensor):
        logits = self.head(self.pyramid(self.backbone(images)))  # (N, K, H/4, W/4)
        points = heatmap_points(logits.float().sigmoid())  # (N, K, 2)
        return (points, logits) if self.training else points


class UPerParsingModel(nn.Module):
    """FaRL's ``FaceParsingTransformer``: blocks :func:`farl_blocks` → pyramid → UPerHead → logits resized
    bilinearly to the input ``[N, classes, H, W]`` (FaRL: to its 512 frame; mcf's input is the frame)."""

    def __init__(self, encoder: MaskedViT, num_classes: int, channels: int | None = None):
        super().__init__()
        self.backbone = ViTBackbone(encoder, farl_blocks(encoder.depth), final_norm=False)
        self.pyramid = FaRLPyramid(encoder.embed_dim, encoder.patch_embed.patch_size)
        self.head = UPerHead(encoder.embed_dim, num_classes, channels or farl_head_channels(encoder.embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.pyramid(self.backbone(images)))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def build_task_model(task: str, head: str, encoder: MaskedViT, out: int) -> nn.Module:
    """``task`` alignment (``out`` points) or parsing (``out`` classes) with ``head`` 'uper' (FaRL's) or
    'light' (soft-argmax / light FPN)."""
    if head not in ("uper", "light"):
        raise ValueError(f"head must be uper or light, got {head!r}")
    if task == "alignment":
        return HeatmapLandmarkModel(encoder, out) if head == "uper" else LandmarkModel(encoder, out)
    return UPerParsingModel(encoder, out) if head == "uper" else ParsingModel(encoder, out)


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
