"""``mcf finetune alignment|parsing``: the pre-trained ViT + a task head, trained with DeepSpeed on one of
FaRL's protocols (:mod:`mcf.downstream.protocols`) and scored as FaRL's table scores it.

The protocol (``aflw19``, ``300w``, ``lapa``, ``celebamask_hq``; by default the one the data folder's
layout holds) sets the schedule, input size, crop or alignment, augmentations, EMA and metric; any
field given explicitly overrides it. The encoder comes from any checkpoint
:func:`mcf.downstream.weights.load_encoder_weights` reads (``random`` for baselines). Optimiser: AdamW
with a backbone lr and a head lr (optionally layer-wise decay), FaRL's step schedule or warm-up +
cosine, wrapped in a DeepSpeed engine (ZeRO stage and precision as in pre-training; on a machine
without a GPU DeepSpeed's CPU accelerator with gloo, one process). The test split is evaluated with
the EMA weights when ``ema_decay > 0`` (as FaRL does); ``OUTPUT/metrics.json``, ``OUTPUT/paper_row.md``
and ``OUTPUT/finetuned.pt`` (model state dict) are written on rank 0, and the run goes to MLflow
(:mod:`mcf.downstream.tracking`).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from mcf.configtree import field
from mcf.errors import ConfigError, DataError
from mcf.logs import launcher_rank

log = logging.getLogger(__name__)

CROPS = {"alignment": ("box",), "parsing": ("align", "resize")}


@dataclass(kw_only=True)
class FinetuneConfig:
    """Settings of one fine-tuning run: the ``mcf finetune`` config (``mcf config --list --command finetune``).

    A field left ``None`` takes the protocol's value (:data:`mcf.downstream.protocols.PROTOCOLS`, FaRL's
    per-benchmark settings: the named presets of this config). The command line resolves it as pretrain's
    does (:func:`mcf.configtree.resolve`): defaults, the protocol, the dedicated flags, then ``--set key=value``.
    """

    task: Literal["alignment", "parsing"] = field(help="alignment (landmarks) or parsing (segmentation); set by the "
                                                       "subcommand.")
    data: str = field(help="Dataset root, in one of the layouts of mcf.downstream.datasets.")
    pretrained: str = field(help="Encoder weights: an `mcf export` .safetensors, a run or step directory, an `mcf "
                                 "export-fp32` file, the paper's .pth, or 'random' (baseline).")
    protocol: str | None = field(None, help="FaRL's protocol (aflw19, 300w, wflw, lapa, celebamask_hq); None = the "
                                            "one the data folder's layout holds. Fills every field left None.")
    output_dir: str = field("runs/finetune", help="metrics.json, paper_row.md, finetuned.pt, mlflow.db (the CLI's "
                                                  "default: runs/finetune_<task>).")
    model: str = field("mcf_vit_tiny", help="Architecture of a 'random' encoder (a checkpoint brings its own).")
    img_size: int | None = field(None, help="Network input px (protocol: 448, the 512-px frame resized).")
    frame: int = field(512, help="FaRL's aligned frame (px): the geometry of crops, template and tanh warp.")
    batch_size: int | None = field(None, help="Micro-batch per rank; None = the protocol's global batch (40) over "
                                              "the ranks, fitted to memory.")
    epochs: int | None = field(None, help="Epochs (protocol: AFLW-19 and WFLW 150, 300W 250, LaPa and "
                                          "CelebAMask-HQ 300).")
    max_steps: int | None = field(None, help="Stop after this many optimizer steps (overrides epochs).")
    lr: float | None = field(None, help="Head lr (protocol: alignment 1e-2, parsing 1e-3).")
    backbone_lr: float | None = field(None, help="Encoder lr (protocol: 1e-4); with layer_decay < 1 block i gets "
                                                 "it x decay^(depth - i).")
    min_lr: float = field(1e-6, help="End of the cosine schedule (cosine only).")
    layer_decay: float = field(1.0, help="Layer-wise lr decay of the encoder (FaRL: 1; BEiT/MAE-style ~0.75).")
    weight_decay: float | None = field(None, help="AdamW weight decay on weight matrices (protocol: 1e-5).")
    schedule: Literal["step", "cosine"] = field("step", help="step: lr x lr_gamma after each milestone epoch "
                                                             "(FaRL's MultiStepLR); cosine: warm-up then cosine to "
                                                             "min_lr.")
    lr_milestones: tuple[int, ...] | None = field(None, help="Epochs after which the step schedule multiplies the "
                                                             "lr by lr_gamma (protocol: 200).")
    lr_gamma: float | None = field(None, help="Step schedule factor (protocol: 0.1).")
    warmup_steps: int | None = field(None, help="Linear warm-up steps; None = 0 for step (FaRL), 5 % of the run "
                                                "for cosine.")
    grad_clip: float = field(0.0, help="Gradient-norm clipping, 0 = off (FaRL's configs clip nothing).")
    ema_decay: float | None = field(None, help="Evaluate an EMA of the weights (protocol: 0.999); 0 = the trained "
                                               "weights.")
    crop: str | None = field(None, help="alignment: box; parsing: align (5 of LaPa's 106 points onto FaRL's "
                                        "template) or resize (the whole image, celebamask_hq).")
    context: float | None = field(None, help="Alignment crop side / box side (protocol: AFLW-19 1.0, 300W and WFLW "
                                             "1.25).")
    warp_factor: float | None = field(None, help="tanh warp of the frame, 0 = off (protocol: LaPa 0.8, others 0).")
    paint_order: Literal["farl", "release"] = field("farl", help="CelebAMask-HQ overlapping parts: FaRL's order (its "
                                                                 "table) or the release's g_mask.py order.")
    augment: bool = field(True, help="Random geometry and colour while training (--no-augment: off).")
    test_split: str | None = field(None, help="The evaluated split (protocol: test; 300W test_full); subsets such as "
                                              "test_frontal, test_common, test_<wflw subset>, or val.")
    precision: Literal["fp32", "bf16"] = field("fp32", help="Training precision.")
    zero: int = field(0, help="DeepSpeed ZeRO stage 0-2 (evaluation runs the whole module on every rank).")
    workers: int = field(2, help="DataLoader workers.")
    seed: int = field(0, help="Seed of the head, data order, augmentation and train_data_ratio's subset.")
    log_every: int = field(10, help="Steps between loss logs.")
    tracking_uri: str | None = field(None, help="MLflow tracking URI; None = $MLFLOW_TRACKING_URI if set, else a "
                                                "sqlite store in output_dir; 'none' = off.")
    experiment: str | None = field(None, help="MLflow experiment name; None = $MLFLOW_EXPERIMENT_NAME if set, else "
                                              "mcf-finetune.")
    # The fields below also declare their command-line flag here (flag=True): cli.py reads the metadata.
    head: str | None = field(None, flag=True, choices=("uper", "light"), help=(
        "uper: FaRL's UPerHead on blocks 3,5,7,11 (scaled to the depth), the protocol's; light: mcf's "
        "soft-argmax head (alignment) / light FPN (parsing)"))
    loss: str | None = field(None, flag=True, choices=("farl", "l1"), help=(
        "alignment loss: farl = per-point Euclidean distance + heatmap BCE (uper's default); l1 = L1 of "
        "the coordinates (light's default)"))
    box_stretch: bool | None = field(None, flag=True, bool=True, help=(
        "alignment: scale a non-square box's width and height apart onto the square frame (FaRL, the "
        "protocols'); --no-box-stretch: the square of its longer side"))
    eval_every: int = field(1, flag=True, type=int, help=(
        "evaluate the test split every N epochs and at the end; the best (by the Full metric) and the "
        "last are reported (FaRL: every epoch, its tables the best); 0 = at the end only"))
    train_data_ratio: float | None = field(None, flag=True, type=float, help=(
        "train on this random share of the train split (FaRL's train_data_ratio, the low-data rows); "
        "the subset is fixed by --seed"))
    freeze_backbone: bool = field(False, flag=True, bool=True, help=(
        "linear probing: the encoder is frozen (out of the optimizer, eval mode, no_grad); only the "
        "head trains (FaRL's freeze_backbone optimizer)"))
    grad_accum: int | None = field(None, flag=True, type=int, help=(
        "gradient accumulation steps per optimizer step (default: 1, or what the memory check picks "
        "to keep the protocol's global batch)"))
    memory_check: bool = field(True, flag=True, bool=True, help=(
        "estimate the run's memory before starting and fit the micro-batch (+ accumulation) to the "
        "machine, or stop with what fits; --no-memory-check skips it"))

    def __post_init__(self) -> None:
        from mcf.downstream.datasets import detect_protocol
        from mcf.downstream.protocols import PROTOCOLS, TASK_PROTOCOLS

        if self.task not in ("alignment", "parsing"):
            raise ConfigError(f"task must be alignment or parsing, got {self.task!r}")
        if self.protocol is None:
            self.protocol = detect_protocol(self.task, self.data)
        if self.protocol not in TASK_PROTOCOLS[self.task]:
            raise ConfigError(
                f"protocol of {self.task} must be one of {', '.join(TASK_PROTOCOLS[self.task])}, got {self.protocol!r}"
            )
        p = PROTOCOLS[self.protocol]
        defaults = {
            "img_size": p.img_size,
            "epochs": p.epochs,
            "lr": p.lr,
            "backbone_lr": p.backbone_lr,
            "weight_decay": p.weight_decay,
            "lr_milestones": p.milestones,
            "lr_gamma": p.gamma,
            "ema_decay": p.ema_decay,
            "crop": p.crop,
            "context": p.context,
            "warp_factor": p.warp_factor,
            "test_split": p.test_split,
            "head": p.head,
            "box_stretch": p.box_stretch,
        }
        for k, v in defaults.items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.loss is None:
            self.loss = ("farl" if self.head == "uper" else "l1") if self.task == "alignment" else "ce"
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)
        if self.warmup_steps is None:
            # -1: 5 % of the run, known once the loader is built
            self.warmup_steps = 0 if self.schedule == "step" else -1
        self._validate()

    def _validate(self) -> None:
        if (
            (self.batch_size is not None and self.batch_size < 1)
            or self.epochs < 1
            or (self.max_steps is not None and self.max_steps < 1)
        ):
            raise ConfigError("batch_size, epochs and max_steps must be >= 1")
        if self.img_size < 16 or self.frame < 16:
            raise ConfigError(f"img_size and frame must be >= 16 px, got {self.img_size} and {self.frame}")
        if self.lr <= 0 or self.backbone_lr < 0 or not 0 < self.layer_decay <= 1:
            raise ConfigError("lr must be > 0, backbone_lr >= 0 and layer_decay in (0, 1]")
        if self.schedule not in ("step", "cosine"):
            raise ConfigError(f"schedule must be step or cosine, got {self.schedule!r}")
        if any(m < 1 for m in self.lr_milestones) or not 0 < self.lr_gamma <= 1:
            raise ConfigError("lr_milestones must be epochs >= 1 and lr_gamma in (0, 1]")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.crop not in CROPS[self.task]:
            raise ConfigError(
                f"crop of {self.task} must be one of {', '.join(CROPS[self.task])}, got {self.crop!r}"
            )
        if self.crop == "align" and self.protocol != "lapa":
            raise ConfigError("crop 'align' needs LaPa's 106-point landmarks (protocol lapa)")
        if not self.context > 0 or not 0 <= self.warp_factor <= 1:
            raise ConfigError(
                f"context must be > 0 and warp_factor in [0, 1], got {self.context} and {self.warp_factor}"
            )
        if self.paint_order not in ("farl", "release"):
            raise ConfigError(f"paint_order must be farl or release, got {self.paint_order!r}")
        if self.zero not in (0, 1, 2):
            raise ConfigError(
                "zero must be 0, 1 or 2 (the evaluation reads the whole model on each rank; ZeRO-3 would partition it)"
            )
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError("precision must be fp32 or bf16")
        if self.head not in ("uper", "light"):
            raise ConfigError(f"head must be uper or light, got {self.head!r}")
        losses = ("farl", "l1") if self.task == "alignment" else ("ce",)
        if self.loss not in losses:
            raise ConfigError(f"the {self.task} loss must be one of {', '.join(losses)}, got {self.loss!r}")
        if self.loss == "farl" and self.head != "uper":
            raise ConfigError("the farl alignment loss needs heatmaps: use it with --head uper")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0 epochs, got {self.eval_every}")
        if self.train_data_ratio is not None and not 0 < self.train_data_ratio <= 1:
            raise ConfigError(f"train_data_ratio must be in (0, 1], got {self.train_data_ratio}")
        if self.grad_accum is not None and self.grad_accum < 1:
            raise ConfigError(f"grad_accum must be >= 1, got {self.grad_accum}")


class TaskData(torch.utils.data.Dataset):
    """A benchmark dataset + its transform; randomness from ``(seed, epoch, index)``.

    Training items: ``(image, target)``; test items: alignment ``(image, matrix [3, 3], points, box, index)``,
    parsing ``(image, original label map, matrix [3, 3])``.
    """

    def __init__(self, task: str, base: Any, transform: Any, seed: int, train: bool):
        self.task, self.base, self.transform = task, base, transform
        self.seed, self.train, self.epoch = seed, train, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        from mcf.downstream.transforms import sample_rng

        rng = sample_rng(self.seed, self.epoch, i) if self.train else None
        if self.task == "alignment":
            image, pts, box = self.base[i]
            x, target, m = self.transform(image, pts, box, rng)
            if self.train:
                return x, target
            return x, torch.from_numpy(m), torch.from_numpy(pts), torch.from_numpy(box), i
        image, label = self.base[i]
        x, lab, m = self.transform(image, label, self.base.align_points(i), rng)
        if self.train:
            return x, lab
        return x, torch.from_numpy(label.astype(np.int64)), torch.from_numpy(m)


def _collate_eval_parsing(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch], torch.stack([b[2] for b in batch])


def lr_at(step: int, *, peak: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine from ``peak`` to ``min_lr`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def step_lr_at(step: int, *, peak: float, warmup: int, milestones: tuple[int, ...], gamma: float) -> float:
    """FaRL's ``MultiStepLR``: ``peak × gamma^(milestones passed)`` (milestones in steps), after an optional
    warm-up."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * gamma ** sum(step >= m for m in milestones)


class ModelEMA:
    """An fp32 exponential moving average of a model's parameters (buffers copied), evaluated instead of the
    trained weights (FaRL's ``main_ema``, decay 0.999, updated after every optimiser step)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema = list(self.model.parameters())
        torch._foreach_lerp_(
            ema, [p.detach().to(e.device, torch.float32) for e, p in zip(ema, model.parameters())], 1.0 - self.decay
        )
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def _alignment_data(cfg: FinetuneConfig, split: str):
    from mcf.downstream import datasets as D

    root = Path(cfg.data).expanduser()
    if cfg.protocol == "aflw19":
        return D.AFLW19(root, split)
    if not root.is_dir():
        raise DataError(f"alignment data folder not found: {root}")
    if cfg.protocol == "wflw":
        return D.WFLW(root, split)
    if (root / D.HRNET_300W_CSV["train"]).is_file():
        return D.Face300WCSV(root, split)
    return D.PtsFolder(root, split)


def _parsing_data(cfg: FinetuneConfig, split: str):
    from mcf.downstream import datasets as D

    if cfg.protocol == "lapa":
        return D.LaPa(Path(cfg.data).expanduser(), split, landmarks=cfg.crop == "align")
    return D.CelebAMaskHQ(Path(cfg.data).expanduser(), split, cfg.paint_order)


class _Subset:
    """Items ``indices`` of ``base`` (its ``num_points`` / ``classes`` / ``align_points`` carried over)."""

    def __init__(self, base: Any, indices: np.ndarray):
        self.base, self.indices = base, indices
        for name in ("num_points", "classes", "name"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))
        self.subsets: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])]

    def align_points(self, i: int):
        return self.base.align_points(int(self.indices[i]))


def train_subset(base: Any, ratio: float, seed: int) -> Any:
    """FaRL's ``train_data_ratio``: ``max(1, round(ratio × N))`` items drawn without replacement by a generator
    seeded with ``seed`` (the same subset for every epoch and rank), in their original order."""
    if ratio >= 1:
        return base
    n = max(1, round(ratio * len(base)))
    keep = np.sort(np.random.default_rng([seed & 0xFFFFFFFF, 0x7261]).permutation(len(base))[:n])
    return _Subset(base, keep)


def _build(cfg: FinetuneConfig):
    """(model, train data, test data, encoder weights, classes or num_points) for ``cfg``."""
    from mcf.downstream.heads import build_task_model
    from mcf.downstream.protocols import PROTOCOLS
    from mcf.downstream.transforms import AlignmentTransform, ParsingTransform
    from mcf.downstream.weights import arch_from_spec, build_encoder, load_encoder_weights
    from mcf.models.registry import get_spec

    weights = load_encoder_weights(cfg.pretrained, random_arch=arch_from_spec(get_spec(cfg.model)))
    encoder = build_encoder(weights, cfg.img_size)
    p = PROTOCOLS[cfg.protocol]
    aug, color = (p.augment, p.color) if cfg.augment else (None, None)
    geometry = {"frame": cfg.frame, "warp_factor": cfg.warp_factor}
    if cfg.task == "alignment":
        train, test = _alignment_data(cfg, "train"), _alignment_data(cfg, cfg.test_split)
        if train.num_points != test.num_points:
            raise ConfigError(f"train has {train.num_points} points, {cfg.test_split} {test.num_points}")
        model = build_task_model("alignment", cfg.head, encoder, train.num_points)
        geometry["stretch"] = cfg.box_stretch
        t_train = AlignmentTransform(cfg.img_size, cfg.context, aug, color, **geometry)
        t_test = AlignmentTransform(cfg.img_size, cfg.context, **geometry)
        info: Any = train.num_points
    else:
        train, test = _parsing_data(cfg, "train"), _parsing_data(cfg, cfg.test_split)
        model = build_task_model("parsing", cfg.head, encoder, len(train.classes))
        t_train = ParsingTransform(cfg.img_size, cfg.crop, aug, color, **geometry)
        t_test = ParsingTransform(cfg.img_size, cfg.crop, **geometry)
        info = train.classes
    if cfg.freeze_backbone:
        model.backbone.freeze()
    if cfg.train_data_ratio is not None:
        train = train_subset(train, cfg.train_data_ratio, cfg.seed)
    return (
        model,
        TaskData(cfg.task, train, t_train, cfg.seed, True),
        TaskData(cfg.task, test, t_test, cfg.seed, False),
        weights,
        info,
    )


def finetune_ds_config(cfg: FinetuneConfig, world_size: int, batch: int, accum: int = 1, *,
                       trainable_params: int) -> dict[str, Any]:
    """The DeepSpeed config of a fine-tuning run, filled by the trainer's builder
    (:func:`mcf.train.engine.fill_ds_config`) from nothing (no ds_configs/ JSON), with pre-training's
    communication defaults (:func:`mcf.train.engine.communication_defaults`: at ZeRO-1/2 the gradient
    reduction overlapped with the backward in buckets sized from ``trainable_params``, owner reduces up
    to ``OWNER_REDUCE_MAX_RANKS`` ranks) but none of its communication dtype or sync savings (gradients
    are reduced in the training dtype, DeepSpeed's default)."""
    from mcf.train.engine import communication_defaults, fill_ds_config

    ds = fill_ds_config({}, micro_batch=batch, accum=accum, world_size=world_size, zero=cfg.zero,
                        precision=cfg.precision, grad_clip=cfg.grad_clip,
                        keys={"batch": "batch_size", "accum": "grad_accum", "grad_clip": "grad_clip", "zero": "zero",
                              "precision": "precision"})
    ds["zero_optimization"].update(communication_defaults(cfg.zero, trainable_params, world_size))
    return ds


def build_engine(
    model: torch.nn.Module, groups: list[dict], cfg: FinetuneConfig, world_size: int, batch: int, accum: int = 1
):
    """A DeepSpeed engine around ``model`` with a client AdamW (nothing JIT-compiled); ``batch`` per rank and
    micro-step, ``accum`` micro-steps per optimizer step."""
    import deepspeed

    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))  # refine_backbone.yaml: betas [0.9, 0.999]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # the head alone under freeze_backbone
    ds = finetune_ds_config(cfg, world_size, batch, accum, trainable_params=trainable)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine


def per_rank_batch(cfg: FinetuneConfig, world_size: int) -> int:
    """``batch_size`` when given, else the protocol's global batch split over the ranks."""
    from mcf.downstream.protocols import PROTOCOLS

    if cfg.batch_size is not None:
        return cfg.batch_size
    total = PROTOCOLS[cfg.protocol].global_batch_size
    if total % world_size:
        log.warning(
            "the protocol's global batch %d does not split over %d ranks: %d per rank",
            total,
            world_size,
            max(1, round(total / world_size)),
        )
    return max(1, round(total / world_size))


@torch.no_grad()
def evaluate_alignment(
    model: torch.nn.Module,
    data: TaskData,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    auc_threshold: float | None = None,
    auc_norm: str = "box",
) -> dict[str, float]:
    """NMEs on ``data`` (a test split) in the original image's pixels, overall and per named subset
    (``frontal/…``, ``common/…``, ``challenging/…``, WFLW's ``largepose/…`` ...); fractions and ``_percent``."""
    from mcf.downstream.metrics import add_percent, alignment_metrics
    from mcf.downstream.warp import from_frame

    t = data.transform
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    preds, gts, boxes, idx = [], [], [], []
    model.eval()
    for x, m, pts, box, i in loader:
        p = model(x.to(device=device, dtype=dtype)).double().cpu() * t.frame - 0.5  # (N, K, 2) frame px
        preds.append(from_frame(p, m, t.frame, t.warp_factor))  # (N, K, 2) source px
        gts.append(pts), boxes.append(box), idx.append(i)
    pred, gt, box, idx = torch.cat(preds), torch.cat(gts), torch.cat(boxes), torch.cat(idx)
    metrics = alignment_metrics(pred, gt, box, auc_threshold, auc_norm)
    for name, mask in getattr(data.base, "subsets", {}).items():
        sel = torch.from_numpy(mask[idx.numpy()])
        if sel.any():
            part = alignment_metrics(pred[sel], gt[sel], box[sel], auc_threshold, auc_norm)
            metrics.update({f"{name}/{k}": v for k, v in part.items()})
    return add_percent(metrics)


@torch.no_grad()
def evaluate_parsing(
    model: torch.nn.Module,
    data: TaskData,
    classes: tuple[str, ...],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, float]:
    """Per-class and mean F1 over one confusion matrix at each label map's own resolution: the frame's
    logits are warped back onto the original image (zeros where the frame does not reach, so
    background wins there) before the argmax, as FaRL's ``test_post.yaml`` does."""
    from mcf.downstream.metrics import ConfusionMatrix, add_percent, parsing_metrics
    from mcf.downstream.warp import warp_from_frame

    t = data.transform
    cm = ConfusionMatrix(len(classes))
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=False, collate_fn=_collate_eval_parsing
    )
    model.eval()
    for x, labels, mats in loader:
        logits = model(x.to(device=device, dtype=dtype)).float().cpu()  # (N, C, S, S)
        for lg, lab, m in zip(logits, labels, mats):
            back = warp_from_frame(lg, m, tuple(lab.shape), t.frame, t.warp_factor)  # (C, H, W)
            cm.update(back.argmax(0), lab)
    return add_percent(parsing_metrics(cm, classes))


def plan_batch(cfg: FinetuneConfig, model: torch.nn.Module, world_size: int, device: torch.device,
               train_size: int) -> tuple[int, int, str]:
    """``(micro-batch per rank, accumulation steps, what the memory check said)``. Without ``batch_size`` the
    protocol's global batch is kept: the largest micro-batch that fits this rank's memory, the accumulation
    making up the rest; an explicit ``batch_size`` that does not fit raises with what would."""
    from mcf.downstream import memory
    from mcf.downstream.protocols import PROTOCOLS

    min_batch = 2 if cfg.head == "uper" else 1  # BatchNorm needs two values per channel at the 1×1 pooling
    accum = cfg.grad_accum or 1
    batch = min(per_rank_batch(cfg, world_size), max(1, train_size // world_size))
    if cfg.batch_size is not None and cfg.batch_size < min_batch:
        raise ConfigError(
            f"--head uper needs a micro-batch of at least {min_batch} per rank (BatchNorm), got {cfg.batch_size}"
        )
    batch = max(batch, min(min_batch, max(1, train_size // world_size)))
    if not cfg.memory_check:
        return batch, accum, "memory check off"
    est = memory.estimate(model, cfg.img_size, batch, ema=cfg.ema_decay > 0, bf16=cfg.precision == "bf16")
    budget = memory.available(device)
    gib = 2**30
    if est.total <= budget:
        return batch, accum, f"fits: {est.describe()}; {budget / gib:.1f} GiB available"
    if cfg.batch_size is not None or cfg.grad_accum is not None:
        found = memory.fit(est, budget, batch * accum * world_size, world_size, min_batch)
        hint = (f"--batch-size {found[0]} --grad-accum {found[1]} fits (the same global batch)" if found
                else "not even the smallest micro-batch fits: lower --img-size, use --freeze-backbone or bf16")
        raise ConfigError(
            f"not enough memory for batch {batch} per rank: {est.describe()}, {budget / gib:.1f} GiB available; {hint}"
        )
    found = memory.fit(est, budget, PROTOCOLS[cfg.protocol].global_batch_size, world_size, min_batch)
    if found is None:
        raise ConfigError(
            f"not enough memory for the smallest micro-batch ({min_batch}): {est.describe()}, {budget / gib:.1f} GiB "
            "available; lower --img-size, use --freeze-backbone or --precision bf16"
        )
    batch, accum = found
    return batch, accum, (
        f"the protocol's batch does not fit ({est.describe()}; {budget / gib:.1f} GiB available): "
        f"micro-batch {batch} x {accum} accumulation steps per rank keeps the global batch"
    )


def _evaluate(cfg: FinetuneConfig, model: torch.nn.Module, test: TaskData, info: Any, batch: int,
              device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    from mcf.downstream.protocols import PROTOCOLS

    p = PROTOCOLS[cfg.protocol]
    if cfg.task == "alignment":
        return evaluate_alignment(model, test, batch, device, dtype, p.auc_threshold, p.auc_norm)
    return evaluate_parsing(model, test, info, max(1, batch // 4), device, dtype)


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train, evaluating the test split every ``eval_every`` epochs and at the end; write ``metrics.json`` /
    ``paper_row.md``; returns ``{'metrics' (the reported = best), 'best', 'last', 'evaluations', 'paper_row',
    'train_losses', 'steps', ...}``."""
    from mcf.downstream.heads import param_groups_lrd
    from mcf.downstream.losses import alignment_loss
    from mcf.downstream.protocols import BEST_KEYS, REPORTED, format_best_last, is_better, paper_row
    from mcf.downstream.tracking import FinetuneTracker
    from mcf.downstream.tracking import probe as probe_tracking
    from mcf.fileio import atomic_path, write_text_atomic
    from mcf.train.engine import init_distributed

    if launcher_rank()[0] == 0:
        probe_tracking(cfg.tracking_uri, cfg.experiment, Path(cfg.output_dir))
    torch.manual_seed(cfg.seed)
    model, train, test, weights, info = _build(cfg)  # data and checkpoint errors surface before DeepSpeed starts
    rank, world_size, device = init_distributed(cfg.precision)
    if world_size > 1 and device.type == "cuda":  # FaRL's SyncBN (the UPerHead, the pyramid); gloo has no SyncBN
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    batch, accum, memory_note = plan_batch(cfg, model, world_size, device, len(train))
    if rank == 0:
        log.info("memory: %s", memory_note)
    depth = model.backbone.depth
    groups = param_groups_lrd(
        model, depth, cfg.weight_decay, cfg.layer_decay, encoder_lr_scale=cfg.backbone_lr / cfg.lr
    )
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    if world_size > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(
            train, num_replicas=world_size, rank=rank, seed=cfg.seed, drop_last=True
        )
    else:
        sampler = torch.utils.data.RandomSampler(train, generator=torch.Generator().manual_seed(cfg.seed))
    engine = build_engine(model, groups, cfg, world_size, batch, accum)
    if ema is not None:
        ema.model.to(device)
    loader = torch.utils.data.DataLoader(
        train, batch_size=batch, sampler=sampler, drop_last=True, num_workers=cfg.workers, persistent_workers=False
    )
    if len(loader) < accum:
        raise ConfigError(
            f"{len(loader)} micro-batches of {batch} per epoch and rank cannot make one step of {accum} accumulation "
            "steps: lower --grad-accum or --batch-size"
        )
    steps_per_epoch = len(loader) // accum  # optimizer steps; the last len(loader) % accum micro-batches are dropped
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, total // 20)
    milestones = tuple(m * steps_per_epoch for m in cfg.lr_milestones)
    out = Path(cfg.output_dir)
    resolved = {"world_size": world_size, "batch_per_rank": batch, "grad_accum": accum, "total_steps": total,
                "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup, "train_size": len(train),
                "memory": memory_note}
    tracker = FinetuneTracker(cfg.tracking_uri, cfg.experiment, out, out.name, enabled=rank == 0,
                              params={**asdict(cfg), "resolved": resolved})
    tracker.set_tags({"task": cfg.task, "protocol": cfg.protocol, "pretrained": cfg.pretrained,
                      "source_format": weights.source_format, "reported": REPORTED})
    if rank == 0:
        log.info(
            "fine-tuning %s (%s protocol, %s head, %s loss) on %s (%d train, %d %s) from %s [%s]: %d steps, "
            "batch %d x %d accumulation x %d ranks",
            cfg.task, cfg.protocol, cfg.head, cfg.loss, cfg.data, len(train), len(test), cfg.test_split,
            cfg.pretrained, weights.source_format, total, batch, accum, world_size,
        )

    losses: list[float] = []
    evaluations: list[dict[str, Any]] = []  # {'epoch', 'step', 'metrics'} in order
    best: dict[str, Any] | None = None
    step, micro, epoch, t0 = 0, 0, 0, time.time()
    status = "FAILED"

    def evaluate_now(epoch_done: int) -> None:
        nonlocal best
        evaluated, eval_dtype = (ema.model, torch.float32) if ema is not None else (engine.module, dtype)
        metrics = _evaluate(cfg, evaluated, test, info, batch, device, eval_dtype)
        record = {"epoch": epoch_done, "step": step, "metrics": metrics}
        evaluations.append(record)
        if is_better(cfg.protocol, metrics, best["metrics"] if best else None):
            best = record
        key = BEST_KEYS[cfg.protocol][0]
        tracker.log_metrics({**{f"test/{k}": v for k, v in metrics.items()}, "test/epoch": float(epoch_done),
                             f"best/{key}": best["metrics"].get(key, float("nan")) if best else float("nan"),
                             "best/epoch": float(best["epoch"]) if best else float("nan")}, step)
        if rank == 0:
            log.info("epoch %d (step %d) %s %.6g; best epoch %s", epoch_done, step, key, metrics.get(key, float("nan")),
                     best["epoch"] if best else "none")

    try:
        while step < total:
            train.epoch = epoch
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            else:
                sampler.generator.manual_seed(cfg.seed + epoch)
            for x, y in itertools.islice(loader, steps_per_epoch * accum):  # whole accumulation cycles only
                if cfg.schedule == "step":
                    lr = step_lr_at(step, peak=cfg.lr, warmup=warmup, milestones=milestones, gamma=cfg.lr_gamma)
                else:
                    lr = lr_at(step, peak=cfg.lr, min_lr=cfg.min_lr, warmup=warmup, total=total)
                for g in engine.optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                engine.train()
                output = engine(x.to(device=device, dtype=dtype))
                y = y.to(device)
                if cfg.task == "alignment":
                    loss = alignment_loss(output, y, cfg.loss)
                else:
                    loss = F.cross_entropy(output.float(), y)
                engine.backward(loss)
                engine.step()
                losses.append(float(loss.detach()))
                micro += 1
                if micro % accum:
                    continue
                if ema is not None:
                    ema.update(engine.module)
                step += 1
                if step % cfg.log_every == 0 or step == total:
                    mean_loss = float(np.mean(losses[-cfg.log_every * accum :]))
                    tracker.log_metrics({"train/loss": mean_loss, "train/lr": lr}, step)
                    if rank == 0:
                        log.info(
                            "step %d/%d loss %.5f lr %.2e (%.1f s)", step, total, mean_loss, lr, time.time() - t0
                        )
                if step >= total:
                    break
            else:
                epoch += 1  # a whole epoch done
            if step < total and cfg.eval_every and epoch % cfg.eval_every == 0:
                evaluate_now(epoch)
        # the last evaluation, at the end of training: epochs are counted from 1, the one the last step fell in
        if not evaluations or evaluations[-1]["step"] != step:
            evaluate_now(epoch + 1)
        last = evaluations[-1]
        if best is None:  # every evaluation NaN: report the last
            best = last
        metrics = best["metrics"] if REPORTED == "best" else last["metrics"]
        headers, values = paper_row(cfg.protocol, metrics, cfg.test_split)
        module = engine.module
        result = {
            "task": cfg.task,
            "protocol": cfg.protocol,
            "pretrained": cfg.pretrained,
            "source_format": weights.source_format,
            "steps": step,
            "train_size": len(train),
            "test_size": len(test),
            "test_split": cfg.test_split,
            "evaluated": "ema" if ema is not None else "trained",
            "reported": REPORTED,
            "metrics": metrics,
            "best": {"epoch": best["epoch"], "step": best["step"], "metrics": best["metrics"]},
            "last": {"epoch": last["epoch"], "step": last["step"], "metrics": last["metrics"]},
            "evaluations": [{"epoch": r["epoch"], "step": r["step"], **{k: r["metrics"][k] for k in
                             (BEST_KEYS[cfg.protocol][0],) if k in r["metrics"]}} for r in evaluations],
            "paper_row": dict(zip(headers, values)),
            "paper_row_last": dict(zip(*paper_row(cfg.protocol, last["metrics"], cfg.test_split))),
            "final_loss": float(np.mean(losses[-cfg.log_every * accum :])),
            "config": asdict(cfg),
            "resolved": resolved,
            "train_losses": losses,
        }
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out / "metrics.json", json.dumps(result, indent=2) + "\n")
            write_text_atomic(out / "paper_row.md", format_best_last(cfg.protocol, result["best"], result["last"],
                                                                     cfg.test_split) + "\n")
            state = (ema.model if ema is not None else module).state_dict()
            state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in state.items()}
            with atomic_path(out / "finetuned.pt") as tmp:
                torch.save(state, tmp)
            tracker.log_metrics({**{f"best/{k}": v for k, v in best["metrics"].items()},
                                 **{f"last/{k}": v for k, v in last["metrics"].items()},
                                 "best/epoch": float(best["epoch"]), "last/epoch": float(last["epoch"])}, step)
            tracker.log_artifact(out / "metrics.json")
            tracker.log_artifact(out / "paper_row.md")
            log.info("%s: best epoch %d, last epoch %d; %s", cfg.task, best["epoch"], last["epoch"],
                     ", ".join(f"{h} {v}" for h, v in zip(headers, values)))
        status = "FINISHED"
    finally:
        tracker.close(status)
    return result
