"""Models by name: ``create_model`` builds the whole MCF model, teacher included."""

from __future__ import annotations

import dataclasses
import logging
from operator import attrgetter
from typing import Any

from mcf.errors import ConfigError
from mcf.logs import launcher_rank
from mcf.models.arch import MCFSpec, ViTArch
from mcf.models.loading import init_from_mae, load_teacher_weights
from mcf.models.mcf import MCF
from mcf.models.objective import Objective
from mcf.models.teacher import TEACHERS, PerceptualTeacher

log = logging.getLogger(__name__)

_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_LARGE = dict(embed_dim=1024, depth=24, num_heads=16)
_HUGE = dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16)

MODELS: dict[str, MCFSpec] = {
    # debug model + matching tiny teacher (32 px, 4 px patches): tests and the demo
    "mcf_vit_tiny": MCFSpec(
        img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, decoder_dim=64, decoder_depth=2, decoder_heads=2,
        proj_hidden=256, proj_dim=64, teacher="vit_tiny_debug",
    ),
    "mcf_vit_small_patch16": MCFSpec(**_SMALL, decoder_dim=256, decoder_depth=2, decoder_heads=16),
    "mcf_vit_base_patch16": MCFSpec(**_BASE),
    "mcf_vit_large_patch16": MCFSpec(**_LARGE),
    "mcf_vit_huge_patch14": MCFSpec(**_HUGE),
}
for _depth in (1, 2, 4, 8):
    MODELS[f"mcf_vit_base_patch16_dec512d{_depth}b"] = MCFSpec(**_BASE, decoder_depth=_depth)
MODELS["mcf_vit_small_patch16_dec256d2b"] = MODELS["mcf_vit_small_patch16"]

# timm architecture names of each encoder (for ``mcf export``)
TIMM_NAMES = {
    "mcf_vit_small_patch16": "vit_small_patch16_224",
    "mcf_vit_base_patch16": "vit_base_patch16_224",
    "mcf_vit_large_patch16": "vit_large_patch16_224",
    "mcf_vit_huge_patch14": "vit_huge_patch14_224",
}


def list_models() -> list[str]:
    return sorted(MODELS)


def get_spec(name: str, **overrides: Any) -> MCFSpec:
    if name not in MODELS:
        import difflib

        close = difflib.get_close_matches(name, MODELS, n=3)
        raise ConfigError(
            f"unknown model '{name}'"
            + (f"; did you mean {', '.join(close)}?" if close else f" (models: {', '.join(list_models())})")
        )
    spec = MODELS[name]
    unknown = set(overrides) - {f.name for f in dataclasses.fields(MCFSpec)}
    if unknown:
        objective = sorted(unknown & set(Objective.config_keys()))
        hint = f"; {', '.join(objective)} belong(s) to the objective: objective=Objective(...)" if objective else ""
        raise ConfigError(f"unknown model override(s) {sorted(unknown)}{hint}")
    spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    if spec.img_size % spec.patch_size:
        raise ConfigError(f"model.img_size={spec.img_size} is not a multiple of {name}'s patch size {spec.patch_size}")
    return spec


def create_teacher(name: str, checkpoint: str | None, img_size: int | None = None) -> PerceptualTeacher:
    """The frozen teacher; ``checkpoint='random'`` is the only way to a random one."""
    if name not in TEACHERS:
        raise ConfigError(f"unknown teacher '{name}' (teachers: {', '.join(sorted(TEACHERS))})")
    spec: ViTArch = TEACHERS[name]
    if img_size is not None:
        spec = dataclasses.replace(spec, img_size=img_size)
    if spec.img_size % spec.patch_size:
        raise ConfigError(
            f"teacher.img_size={spec.img_size} is not a multiple of teacher {name}'s patch size {spec.patch_size}"
        )
    if checkpoint is None:
        raise ConfigError(
            "a perceptual teacher checkpoint is required: teacher_checkpoint=PATH (MoCo v3 ViT-B/16 in the paper), "
            "or the explicit value 'random' for tests and benchmarks"
        )
    teacher = PerceptualTeacher(spec, name)
    if checkpoint == "random":
        # once per job, not once per rank (RANK is set by every launcher before the model is built)
        (log.warning if launcher_rank()[0] == 0 else log.debug)(
            "perceptual teacher '%s' has RANDOM weights (teacher_checkpoint='random'): fine for tests and benchmarks, "
            "not for real pre-training",
            name,
        )
    else:
        load_teacher_weights(teacher, checkpoint)
    return teacher


def create_model(name: str, *, teacher_checkpoint: str | None = None, teacher_name: str | None = None,
                 teacher_img_size: int | None = None, objective: Objective | None = None,
                 init_from: str | None = None, init_decoder: bool = True, norm_impl: str = "torch",
                 attn_backend: str = "auto", **arch_overrides: Any) -> MCF:
    """Build the MCF model ``name`` (see :func:`list_models`), teacher included.

    Args:
        teacher_checkpoint: required: a path (MoCo v3, MAE, timm or safetensors), or ``"random"``
            for tests and benchmarks. ``teacher_name`` / ``teacher_img_size`` replace the model's
            matching teacher / its input size.
        objective: the masking and loss options (:class:`Objective`; default: the paper's).
        init_from: an MAE checkpoint that initialises encoder and decoder (the decoder only with
            ``init_decoder``).
        norm_impl, attn_backend: LayerNorm and attention implementations (same parameters, same numbers).
        arch_overrides: fields of :class:`MCFSpec` (``img_size=64``, ``depth=2`` …; None = the model's).
    """
    spec = get_spec(name, **arch_overrides)
    teacher = create_teacher(teacher_name or spec.teacher, teacher_checkpoint, teacher_img_size)
    model = MCF(spec, teacher, objective, norm_impl=norm_impl, attn_backend=attn_backend)
    if init_from:
        init_from_mae(model.online, init_from, decoder=init_decoder)
        model.target.encoder.load_state_dict(model.online.encoder.state_dict())
    return model


# config keys that override a field of the model's MCFSpec (None = the model's own value)
ARCH_KEYS = {"model.img_size": "img_size", "loss.projector_hidden": "proj_hidden", "loss.projector_dim": "proj_dim"}


def create_model_from_config(cfg: Any) -> MCF:
    """Build the model described by an :class:`mcf.config.Config`: its ``model``, ``teacher`` and
    ``attention`` sections, the :class:`Objective` of ``loss`` and ``masking``, the :data:`ARCH_KEYS`."""
    overrides = {field: attrgetter(key)(cfg) for key, field in ARCH_KEYS.items()}
    model_size = get_spec(cfg.model.name, img_size=cfg.model.img_size).img_size
    if cfg.data.img_size is not None and cfg.data.img_size != model_size:
        raise ConfigError(
            f"data.img_size={cfg.data.img_size} but the model {cfg.model.name} takes {model_size} px images: set "
            f"model.img_size={cfg.data.img_size} to train at that size (the position embeddings follow) and leave "
            "data.img_size unset"
        )
    return create_model(cfg.model.name, teacher_checkpoint=cfg.teacher.checkpoint, teacher_name=cfg.teacher.name,
                        teacher_img_size=cfg.teacher.img_size, objective=Objective.from_config(cfg),
                        init_from=cfg.model.init_from, init_decoder=cfg.model.init_decoder,
                        norm_impl=cfg.model.norm_impl, attn_backend=cfg.attention.backend, **overrides)
