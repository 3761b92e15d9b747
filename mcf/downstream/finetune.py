"""``mcf finetune alignment|parsing``: the pre-trained ViT + a task head, trained with DeepSpeed.

The encoder comes from any checkpoint :func:`mcf.downstream.weights.load_encoder_weights` reads
(``random`` for baselines). Optimiser: AdamW with layer-wise lr decay (BEiT/MAE), linear warm-up
then cosine, wrapped in a DeepSpeed engine (ZeRO stage and precision as in pre-training; on a
machine without a GPU DeepSpeed's CPU accelerator with gloo, one process). After training the test
split is evaluated with the benchmark metric (:mod:`mcf.downstream.metrics`) and
``OUTPUT/metrics.json`` + ``OUTPUT/finetuned.pt`` (model state dict) are written on rank 0.
"""

from __future__ import annotations

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

from mcf.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class FinetuneConfig:
    """Settings of one fine-tuning run (every CLI flag of ``mcf finetune``)."""

    task: Literal["alignment", "parsing"]
    data: str  # dataset root, in one of the layouts of mcf.downstream.datasets
    pretrained: str  # checkpoint (export, run/step dir, consolidated file, paper layout) or 'random'
    output_dir: str = "runs/finetune"
    model: str = "mcf_vit_tiny"  # architecture of a 'random' encoder (a checkpoint brings its own)
    img_size: int | None = None  # input size; None = the encoder's pre-training size
    batch_size: int = 32  # per rank
    epochs: int = 60
    max_steps: int | None = None  # overrides epochs
    lr: float = 5e-4  # peak lr of the head; the encoder's block i gets lr * layer_decay ** (depth - i)
    min_lr: float = 1e-6
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_steps: int | None = None  # None = 5 % of the run
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    zero: int = 0  # ZeRO 0-2: evaluation runs the whole module on every rank (rank 0 writes)
    workers: int = 2
    seed: int = 0
    log_every: int = 10
    augment: bool = True
    test_split: str = "test"

    def __post_init__(self) -> None:
        if self.task not in ("alignment", "parsing"):
            raise ConfigError(f"task must be alignment or parsing, got {self.task!r}")
        if self.batch_size < 1 or self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ConfigError("batch_size, epochs and max_steps must be >= 1")
        if self.lr <= 0 or not 0 < self.layer_decay <= 1:
            raise ConfigError("lr must be > 0 and layer_decay in (0, 1]")
        if self.zero not in (0, 1, 2):
            raise ConfigError("zero must be 0, 1 or 2 (the evaluation reads the whole model on each rank; ZeRO-3 would partition it)")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError("precision must be fp32 or bf16")


class TaskData(torch.utils.data.Dataset):
    """A benchmark dataset + its transform; randomness from ``(seed, epoch, index)``."""

    def __init__(self, base: Any, transform: Any, seed: int, train: bool):
        self.base, self.transform, self.seed, self.train, self.epoch = base, transform, seed, train, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        from mcf.downstream.transforms import sample_rng

        rng = sample_rng(self.seed, self.epoch, i) if self.train else None
        sample = self.base[i]
        if len(sample) == 3:  # alignment: image, points, box
            image, pts, box = sample
            x, target, a = self.transform(image, pts, box, rng)
            if self.train:
                return x, target
            return x, torch.from_numpy(a).float(), torch.from_numpy(pts).float(), torch.from_numpy(box).float(), i
        image, label = sample
        x, lab = self.transform(image, label, rng)
        if self.train:
            return x, lab
        return x, torch.from_numpy(label.astype(np.int64))


def _collate_eval_parsing(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def lr_at(step: int, *, peak: float, min_lr: float, warmup: int, total: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def _build(cfg: FinetuneConfig):
    """(model, train data, test data, encoder weights, classes or num_points) for ``cfg``."""
    from mcf.downstream import datasets as D
    from mcf.downstream.heads import LandmarkModel, ParsingModel
    from mcf.downstream.transforms import AlignmentTransform, Augment, ParsingTransform
    from mcf.downstream.weights import arch_from_spec, build_encoder, load_encoder_weights
    from mcf.models.registry import get_spec

    weights = load_encoder_weights(cfg.pretrained, random_arch=arch_from_spec(get_spec(cfg.model)))
    encoder = build_encoder(weights, cfg.img_size)
    size = cfg.img_size or weights.arch.img_size
    aug = Augment() if cfg.augment else None
    if cfg.task == "alignment":
        train, test = D.open_alignment(cfg.data, "train"), D.open_alignment(cfg.data, cfg.test_split)
        if train.num_points != test.num_points:
            raise ConfigError(f"train has {train.num_points} points, {cfg.test_split} {test.num_points}")
        model = LandmarkModel(encoder, train.num_points)
        t_train, t_test = AlignmentTransform(size, augment=aug), AlignmentTransform(size)
        info: Any = train.num_points
    else:
        train, test = D.open_parsing(cfg.data, "train"), D.open_parsing(cfg.data, cfg.test_split)
        model = ParsingModel(encoder, len(train.classes))
        t_train, t_test = ParsingTransform(size, augment=aug), ParsingTransform(size)
        info = train.classes
    return model, TaskData(train, t_train, cfg.seed, True), TaskData(test, t_test, cfg.seed, False), weights, info


def build_engine(model: torch.nn.Module, groups: list[dict], cfg: FinetuneConfig, world_size: int, batch: int):
    """A DeepSpeed engine around ``model`` with a client AdamW (nothing JIT-compiled); ``batch`` per rank."""
    import deepspeed

    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    ds = {
        "train_batch_size": batch * world_size,
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.zero},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "gradient_clipping": cfg.grad_clip,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine


@torch.no_grad()
def evaluate_alignment(model: torch.nn.Module, data: TaskData, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """NMEs on ``data`` (a test split), predictions mapped back to the original image pixels."""
    from mcf.downstream.metrics import alignment_metrics

    size = data.transform.size
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    preds, gts, boxes, idx = [], [], [], []
    model.eval()
    for x, a, pts, box, i in loader:
        p = model(x.to(device=device, dtype=dtype)).float().cpu() * size  # (N, K, 2) crop pixels
        full = torch.cat([a, torch.tensor([0.0, 0.0, 1.0]).expand(a.shape[0], 1, 3)], dim=1)  # (N, 3, 3)
        inv = torch.linalg.inv(full.double())[:, :2].float()
        preds.append(p @ inv[:, :, :2].transpose(1, 2) + inv[:, None, :, 2])
        gts.append(pts), boxes.append(box), idx.append(i)
    pred, gt, box, idx = torch.cat(preds), torch.cat(gts), torch.cat(boxes), torch.cat(idx)
    metrics = alignment_metrics(pred, gt, box)
    frontal = getattr(data.base, "frontal", None)
    if frontal is not None and frontal[idx.numpy()].any():
        sel = torch.from_numpy(frontal[idx.numpy()])
        metrics.update({f"frontal/{k}": v for k, v in alignment_metrics(pred[sel], gt[sel], box[sel]).items()})
    return metrics


@torch.no_grad()
def evaluate_parsing(model: torch.nn.Module, data: TaskData, classes: tuple[str, ...], batch_size: int, device: torch.device,
                     dtype: torch.dtype) -> dict[str, float]:
    """Per-class and mean F1 at each label map's own resolution (see :mod:`mcf.downstream.metrics`)."""
    from mcf.downstream.metrics import ConfusionMatrix, parsing_metrics

    cm = ConfusionMatrix(len(classes))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=_collate_eval_parsing)
    model.eval()
    for x, labels in loader:
        logits = model(x.to(device=device, dtype=dtype)).float()
        for lg, lab in zip(logits, labels):
            up = F.interpolate(lg[None], size=lab.shape, mode="bilinear", align_corners=False)[0]
            cm.update(up.argmax(0).cpu(), lab)
    return parsing_metrics(cm, classes)


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train, evaluate, write ``metrics.json``; returns ``{'metrics', 'train_losses', 'steps', ...}``."""
    from mcf.downstream.heads import param_groups_lrd
    from mcf.train.engine import init_distributed

    torch.manual_seed(cfg.seed)
    model, train, test, weights, info = _build(cfg)  # data and checkpoint errors surface before DeepSpeed starts
    rank, world_size, device = init_distributed()
    depth = model.backbone.depth
    groups = param_groups_lrd(model, depth, cfg.weight_decay, cfg.layer_decay)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32

    if world_size > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(train, num_replicas=world_size, rank=rank, seed=cfg.seed, drop_last=True)
    else:
        sampler = torch.utils.data.RandomSampler(train, generator=torch.Generator().manual_seed(cfg.seed))
    batch = min(cfg.batch_size, len(train) // world_size) or 1
    engine = build_engine(model, groups, cfg, world_size, batch)
    loader = torch.utils.data.DataLoader(train, batch_size=batch, sampler=sampler, drop_last=True, num_workers=cfg.workers,
                                         persistent_workers=False)
    steps_per_epoch = max(1, len(loader))
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 20)
    if rank == 0:
        log.info("fine-tuning %s on %s (%d train, %d %s) from %s [%s]: %d steps, batch %d x %d ranks", cfg.task, cfg.data, len(train),
                 len(test), cfg.test_split, cfg.pretrained, weights.source_format, total, batch, world_size)

    losses: list[float] = []
    step, epoch, t0 = 0, 0, time.time()
    while step < total:
        train.epoch = epoch
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        else:
            sampler.generator.manual_seed(cfg.seed + epoch)
        for x, y in loader:
            lr = lr_at(step, peak=cfg.lr, min_lr=cfg.min_lr, warmup=warmup, total=total)
            for g in engine.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            engine.train()
            out = engine(x.to(device=device, dtype=dtype))
            y = y.to(device)
            loss = F.l1_loss(out.float(), y) if cfg.task == "alignment" else F.cross_entropy(out.float(), y)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            step += 1
            if rank == 0 and (step % cfg.log_every == 0 or step == total):
                log.info("step %d/%d loss %.5f lr %.2e (%.1f s)", step, total, float(np.mean(losses[-cfg.log_every:])), lr, time.time() - t0)
            if step >= total:
                break
        epoch += 1

    module = engine.module
    if cfg.task == "alignment":
        metrics = evaluate_alignment(module, test, cfg.batch_size, device, dtype)
    else:
        metrics = evaluate_parsing(module, test, info, max(1, cfg.batch_size // 4), device, dtype)
    result = {"task": cfg.task, "pretrained": cfg.pretrained, "source_format": weights.source_format, "steps": step,
              "train_size": len(train), "test_size": len(test), "test_split": cfg.test_split, "metrics": metrics,
              "final_loss": float(np.mean(losses[-cfg.log_every:])), "config": asdict(cfg), "train_losses": losses}
    if rank == 0:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        torch.save({k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in module.state_dict().items()},
                   out / "finetuned.pt")
        log.info("%s test metrics: %s", cfg.task, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return result
