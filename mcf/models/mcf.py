"""The MCF model: online encoder + decoder + contrastive heads, EMA target encoder, frozen teacher."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.profiler import record_function

from mcf.losses.contrastive import ContrastiveLoss
from mcf.losses.perceptual import PerceptualLoss
from mcf.losses.pixel import pixel_loss, unpatchify
from mcf.models.arch import MCFSpec
from mcf.models.decoder import MAEDecoder
from mcf.models.heads import build_predictor, build_projector
from mcf.models.objective import Objective
from mcf.models.teacher import PerceptualTeacher
from mcf.models.vit import MaskedViT


@dataclass
class MCFOutput:
    """``loss``: weighted total (scalar); ``losses``: the unweighted terms (detached scalars);
    ``pred``: ``[N, L, p·p·3]`` every patch rebuilt; ``mask``: ``[N, L]``, 1 = removed."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    pred: torch.Tensor
    mask: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class OnlineOutput(NamedTuple):
    pred: torch.Tensor  # (N, L, p·p·3)
    mask: torch.Tensor  # (N, L), 1 = removed
    q: torch.Tensor  # (N, proj_dim) predictor(projector(class token)), not normalised


class MCFOnline(nn.Module):
    """The trainable part — the module the DeepSpeed engine wraps."""

    def __init__(self, spec: MCFSpec, norm_impl: str = "torch", attn_backend: str = "auto"):
        super().__init__()
        self.spec = spec
        self.encoder = MaskedViT(
            spec.img_size, spec.patch_size, 3, spec.embed_dim, spec.depth, spec.num_heads, spec.mlp_ratio, norm_impl,
            attn_backend,
        )
        self.projector = build_projector(spec.embed_dim, spec.proj_hidden, spec.proj_dim)
        self.predictor = build_predictor(spec.proj_dim, spec.proj_hidden)
        self.decoder = MAEDecoder(
            self.encoder.num_patches, spec.patch_size, spec.embed_dim, spec.decoder_dim, spec.decoder_depth,
            spec.decoder_heads, spec.mlp_ratio, 3, norm_impl, attn_backend, fused_input=attn_backend == "triton",
        )

    def forward(
        self, images: torch.Tensor, ratio: float, noise: torch.Tensor | None = None, ratios: torch.Tensor | None = None
    ) -> OnlineOutput:
        latent, m, _ = self.encoder(images, ratio, noise, ratios)  # (N, 1 + keep, D)
        pred = self.decoder(latent, m.ids_restore, m.keep_lens)
        q = self.predictor(self.projector(latent[:, 0]))
        return OnlineOutput(pred, m.mask, q)


class TargetEncoder(nn.Module):
    """EMA copy of the online encoder + projector: no gradients, eval mode kept through ``train()``.

    It computes in its parameters' dtype. Alone (tests, benchmarks) its parameters are the fp32 EMA
    (:meth:`MCF.update_target`); in the trainer ``mcf.train.ema.TargetEMA`` keeps the fp32 EMA
    sharded like the master weights and makes the parameters the forward weights, in the training
    precision (``train.target_precision``).

    Its projector's BatchNorms normalise with batch statistics (``track_running_stats=False``),
    exactly as the released code's target did (it ran in train mode, its running stats unused).
    """

    def __init__(self, online: MCFOnline):
        super().__init__()
        spec = online.spec
        self.encoder = copy.deepcopy(online.encoder)
        self.projector = build_projector(spec.embed_dim, spec.proj_hidden, spec.proj_dim, target=True)
        self.projector.load_state_dict(
            {k: v for k, v in online.projector.state_dict().items() if "running" not in k and "num_batches" not in k}
        )
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TargetEncoder:  # noqa: ARG002 - never trained
        return super().train(False)

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, ratio: float, noise: torch.Tensor | None = None, ratios: torch.Tensor | None = None
    ) -> torch.Tensor:
        latent, _, _ = self.encoder(images, ratio, noise, ratios)
        return self.projector(latent[:, 0])  # (N, proj_dim)


class MCF(nn.Module):
    """Mask Contrastive Face: total = w_p·perceptual + w_c·contrastive + w_x·pixel.

    ``spec`` is the architecture, ``teacher`` the frozen perceptual teacher, ``objective`` the
    masking and loss options (:class:`Objective`: weights, temperature, perceptual layers …).

    ``forward(images, online_noise, target_noise)`` → :class:`MCFOutput`. The noises (``[N, L]``)
    fix the two masks; by default each is drawn uniformly on the images' device. ``online`` lets the
    trainer pass the DeepSpeed engine that wraps ``self.online``.
    """

    def __init__(self, spec: MCFSpec, teacher: PerceptualTeacher, objective: Objective | None = None, *,
                 norm_impl: str = "torch", attn_backend: str = "auto"):
        super().__init__()
        self.spec = spec
        self.objective = Objective() if objective is None else objective
        o = self.objective
        self.online = MCFOnline(spec, norm_impl, attn_backend)
        self.target = TargetEncoder(self.online)
        self.perceptual = PerceptualLoss(teacher, o.perceptual_layers, o.perceptual_norm, o.perceptual_resize)
        self.contrastive = ContrastiveLoss(o.temperature)
        teacher.set_attention_backend(attn_backend)  # attention.backend is the whole model's, the teacher's too
        self._register_state_dict_hook(_drop_teacher_keys)

    @property
    def teacher(self) -> PerceptualTeacher:
        return self.perceptual.teacher

    @property
    def num_patches(self) -> int:
        return self.online.encoder.num_patches

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Tell the contrastive loss which slice of the gathered keys is this rank's positives."""
        self.contrastive.rank, self.contrastive.world_size = rank, world_size

    def set_attention_backend(self, backend: str) -> None:
        """Every attention of the model: the online and target encoders, the decoder and the frozen teacher."""
        self.teacher.set_attention_backend(backend)
        for enc in (self.online.encoder, self.target.encoder):
            enc.set_attention_backend(backend)
        for blk in self.online.decoder.decoder_blocks:
            blk.attn.backend = backend
        self.online.decoder.fused_input = backend == "triton"

    def set_activation_checkpointing(self, mode: str) -> None:
        """``none | encoder | decoder | teacher | all``: whose transformer blocks recompute their
        activations in the backward (the online encoder, the decoder, the teacher's pass over the
        rebuilt image) instead of keeping them. The EMA target runs without autograd: nothing to save."""
        parts = {"none": (), "encoder": ("encoder",), "decoder": ("decoder",), "teacher": ("teacher",),
                 "all": ("encoder", "decoder", "teacher")}
        if mode not in parts:
            raise ValueError(f"activation checkpointing mode {mode!r} (none, encoder, decoder, teacher, all)")
        self.online.encoder.set_grad_checkpointing("encoder" in parts[mode])
        self.online.decoder.set_grad_checkpointing("decoder" in parts[mode])
        self.teacher.set_grad_checkpointing("teacher" in parts[mode])

    def _draw_ratios(self, n: int, device: torch.device) -> torch.Tensor | None:
        if self.objective.mask_ratio_range is None:
            return None
        lo, hi = self.objective.mask_ratio_range
        return lo + (hi - lo) * torch.rand(n, device=device)

    def forward(
        self, images: torch.Tensor, online_noise: torch.Tensor | None = None, target_noise: torch.Tensor | None = None,
        *, online: nn.Module | None = None,
    ) -> MCFOutput:
        online = self.online if online is None else online
        N = images.shape[0]
        ratio = self.objective.encoder_ratio  # a host float: the padded length is known without a device sync
        # record_function ranges: stable names for `logging.profile_step` (a few µs each when not profiling)
        with record_function("mcf.online"):
            o: OnlineOutput = online(images, ratio, online_noise, self._draw_ratios(N, images.device))
        target_dtype = self.target.projector[0].weight.dtype  # its forward weights' (the training precision by default)
        with record_function("mcf.target"):
            k = self.target(images.to(target_dtype), ratio, target_noise, self._draw_ratios(N, images.device))
        rebuilt = unpatchify(o.pred, self.spec.patch_size)  # (N, 3, H, W), in the normalised input space
        with record_function("mcf.teacher"):  # the frozen teacher on the rebuilt and the original images
            perceptual = self.perceptual(rebuilt, images)
        terms = {
            "perceptual": perceptual,
            "contrastive": self.contrastive(o.q, k),
            "pixel": pixel_loss(images, o.pred, o.mask, self.spec.patch_size, self.objective.norm_pix),
        }
        weights = self.objective.weights
        loss = sum(weights[name] * value for name, value in terms.items())
        return MCFOutput(loss=loss, losses={k: v.detach() for k, v in terms.items()}, pred=o.pred, mask=o.mask)

    # -- EMA ------------------------------------------------------------------------------------
    def ema_pairs(self) -> list[tuple[str, torch.Tensor]]:
        """(online parameter name, target parameter) for every EMA-tracked parameter."""
        return [(name, p) for name, p in self.target.named_parameters()]

    @torch.no_grad()
    def update_target(self, momentum: float, online_params: dict[str, torch.Tensor] | None = None) -> None:
        """``target ← m·target + (1 − m)·online`` in the target's dtype (fp32), in one process (the
        trainer's sharded version is ``mcf.train.ema.TargetEMA``).

        ``online_params`` maps names (``encoder.…``, ``projector.…``) to the fp32 master weights
        (the trainer gathers them from the optimizer under mixed precision / ZeRO); by default the
        online module's own parameters are used.
        """
        if online_params is None:
            source = dict(self.online.named_parameters())
        else:
            source = online_params
        targets, sources = [], []
        for name, t in self.ema_pairs():
            targets.append(t)
            sources.append(source[name].to(device=t.device, dtype=t.dtype))
        torch._foreach_mul_(targets, momentum)
        torch._foreach_add_(targets, sources, alpha=1.0 - momentum)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Like nn.Module's, but the frozen teacher's keys are optional (they are never saved)."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith("perceptual.teacher.")]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"error loading MCF state dict: missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}"
            )
        return result


def _drop_teacher_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "perceptual.teacher.")]:
        del state_dict[key]
