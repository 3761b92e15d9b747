"""The mcf config: one tree of documented, validated dataclasses; named YAML presets; overrides.

Resolution order (later wins): the dataclass defaults, the preset or YAML file named by
``--config``, the dedicated CLI flags (``--batch-size`` …), then each ``--set key.sub=value``.
The resolved tree is written to ``config.yaml`` in the output folder and into every checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from mcf.configtree import field, from_dict, load_yaml, merge, resolve, short, to_dict
from mcf.data.core.config import DataConfig
from mcf.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"
SEED_MAX = 2**32 - 1


@dataclass(kw_only=True)
class ModelConfig:
    name: str = field("mcf_vit_base_patch16", help="Registered model (mcf.models.list_models()).")
    img_size: int | None = field(None, help="Input resolution; None = the model's default.")
    norm_impl: Literal["torch", "apex"] = field("torch", help="LayerNorm implementation: torch, or NVIDIA apex's FusedLayerNorm (must be installed).")
    init_from: str | None = field(None, help="MAE checkpoint to initialise encoder and decoder from ('partially pre-trained decoder').")
    init_decoder: bool = field(True, help="With init_from: also load the decoder weights when the checkpoint has them.")

    def __post_init__(self) -> None:
        if self.img_size is not None and self.img_size <= 0:
            raise ConfigError("model.img_size must be positive")


@dataclass(kw_only=True)
class MaskingConfig:
    ratio: float = field(0.75, help="Fraction of patches removed from the online and target encoders' input.")
    ratio_range: tuple[float, float] | None = field(None, help="Draw a mask ratio per image uniformly in [min, max] (beyond the paper; padded encoder with key mask).")

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError("masking.ratio must be in [0, 1)")
        if self.ratio_range is not None:
            lo, hi = self.ratio_range
            if not 0.0 <= lo <= hi < 1.0:
                raise ConfigError("masking.ratio_range must satisfy 0 <= min <= max < 1")


@dataclass(kw_only=True)
class AttentionConfig:
    backend: Literal["auto", "sdpa", "sdpa_fp32", "triton", "math"] = field(
        "auto", help="Attention kernel: math (reference), sdpa (PyTorch), sdpa_fp32 (SDPA on fp32 casts), triton (mcf "
        "kernels), auto (the measured choice per host, dtype and shape: kernels/attention_table.json).")


@dataclass(kw_only=True)
class LossConfig:
    perceptual_weight: float = field(1000.0, help="Weight of the perceptual loss (the paper: 1000).")
    contrastive_weight: float = field(1.0, help="Weight of the momentum contrastive loss.")
    pixel_weight: float = field(0.0, help="Weight of the MAE pixel loss on masked patches (ablations; 0 = off, the paper).")
    norm_pix: bool = field(False, help="Pixel loss on per-patch normalised pixels (MAE's norm_pix_loss).")
    temperature: float = field(0.2, help="InfoNCE temperature tau; the loss is scaled by 2*tau.")
    perceptual_layers: tuple[int, ...] = field((2, 5, 8, 11), help="Teacher blocks whose token outputs are compared.")
    perceptual_norm: Literal["token", "feature"] = field("token", help="L2-normalise teacher features along the token axis (as released) or the feature axis.")
    perceptual_resize: Literal["nearest", "bilinear"] = field("nearest", help="Resize to the teacher's input size: nearest (as released) or bilinear.")
    projector_hidden: int | None = field(None, help="Hidden width of projector and predictor MLPs; None = the model's (4096 for the paper's models).")
    projector_dim: int | None = field(None, help="Output width of projector and predictor; None = the model's (256 for the paper's models).")

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError("loss.temperature must be > 0")
        for name in ("perceptual_weight", "contrastive_weight", "pixel_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0")
        if not self.perceptual_layers:
            raise ConfigError("loss.perceptual_layers must name at least one block")


@dataclass(kw_only=True)
class TeacherConfig:
    checkpoint: str | None = field(None, help="Frozen perceptual teacher weights (MoCo v3, MAE, timm or safetensors); 'random' only for tests/benchmarks.")
    name: str | None = field(None, help="Teacher architecture; None = the model's matching teacher (ViT-B/16 for the paper's models).")
    img_size: int | None = field(None, help="Teacher input size; None = the teacher architecture's default.")


@dataclass(kw_only=True)
class MomentumConfig:
    base: float = field(0.99, help="EMA momentum of the target encoder (the paper: 0.99).")
    schedule: Literal["constant", "cosine"] = field("constant", help="constant (as released) or cosine from base to 1 over training.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.base <= 1.0:
            raise ConfigError("momentum.base must be in [0, 1]")


@dataclass(kw_only=True)
class OptimConfig:
    impl: Literal["torch", "apex"] = field("torch", help="AdamW implementation: torch (fused where supported) or NVIDIA apex FusedAdam (must be installed).")
    blr: float = field(1.5e-4, help="Base learning rate; lr = blr * global_batch / 256.")
    lr: float | None = field(None, help="Absolute learning rate; overrides blr when set.")
    min_lr: float = field(0.0, help="Floor of the cosine schedule.")
    weight_decay: float = field(0.05, help="AdamW weight decay (none on biases, norms, tokens, position embeddings).")
    betas: tuple[float, float] = field((0.9, 0.95), help="AdamW betas.")
    warmup_steps: int | None = field(None, help="Linear warm-up steps; None = warmup_epochs converted to steps.")
    warmup_epochs: float = field(40.0, help="Linear warm-up length in epochs (as released), used when warmup_steps is None.")
    grad_clip: float = field(0.0, help="Gradient-norm clipping (0 = off, as released).")

    def __post_init__(self) -> None:
        numbers = {"blr": self.blr, "lr": self.lr, "min_lr": self.min_lr, "weight_decay": self.weight_decay,
                   "grad_clip": self.grad_clip, "warmup_epochs": self.warmup_epochs, "betas": self.betas}
        for name, value in numbers.items():
            if any(v is not None and not math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,))):
                raise ConfigError(f"optim.{name} must be a finite number, got {value}")
        if self.blr <= 0 or (self.lr is not None and self.lr <= 0):
            raise ConfigError("optim.blr / optim.lr must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {short(list(self.betas))}")
        if self.warmup_epochs < 0:
            raise ConfigError("optim.warmup_epochs must be >= 0")
        if self.min_lr < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.min_lr, weight_decay and grad_clip must be >= 0")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps must be >= 0")


@dataclass(kw_only=True)
class TrainConfig:
    output_dir: str = field("runs/mcf", help="Run folder: config.yaml, metrics.jsonl, checkpoints/, reconstructions/, mlflow.db.")
    batch_size: int = field(64, help="Micro-batch size per rank.")
    accum_steps: int = field(1, help="Gradient accumulation steps per optimizer step.")
    epochs: int = field(400, help="Epochs (ignored when max_steps is set).")
    max_steps: int | None = field(None, help="Stop after this many optimizer steps (overrides epochs).")
    precision: Literal["fp32", "bf16", "fp16"] = field("bf16", help="Training precision (fp16 uses dynamic loss scaling).")
    seed: int = field(0, help="Seed of weights, masks, augmentation and data order.")
    resume: str = field("auto", help="auto (newest intact checkpoint in output_dir, else the previous one), none, or a checkpoint path; "
                        "none or another folder's checkpoint is refused while output_dir holds a run (see overwrite_run).")
    overwrite_run: bool = field(False, help="Start a new run (resume none or a checkpoint of another folder) in an output_dir that holds "
                                "a run: that run's checkpoints, metrics.jsonl and reconstructions are deleted first.")
    compile: bool = field(False, help="torch.compile the online model.")
    target_precision: Literal["auto", "fp32"] = field(
        "auto", help="Dtype of the EMA target's forward: auto = the training precision (the EMA itself stays fp32), "
                     "fp32 = as released.")
    ema_source: Literal["fp32_masters", "bf16_params"] = field(
        "fp32_masters", help="What the EMA target averages: fp32_masters = the optimizer's fp32 master weights, exact "
                             "(sharded like them: one all-gather of the target per step at ZeRO-1-3 under bf16); "
                             "bf16_params = the module's weights DeepSpeed already gathers after its step (ZeRO 0-2 "
                             "only): no EMA collective, a whole fp32 EMA on every rank, each update rounded to bf16 "
                             "(measured drift: benchmarks/RESULTS.md).")
    tf32: bool = field(True, help="TF32 tensor cores for fp32 matmuls and convolutions (CUDA only; no effect "
                                  "elsewhere).")
    activation_checkpointing: Literal["none", "encoder", "decoder", "teacher", "all"] = field(
        "none", help="Recompute the activations of these transformer blocks in the backward instead of keeping them "
                     "(per block; teacher = its pass over the rebuilt image).")
    lock_stale_s: float = field(120.0, help="The output folder's lock is taken over when its holder on another node has not "
                                            "refreshed it for this long (on the same node: as soon as its process is gone).")
    elastic: Literal["keep_global_batch", "keep_micro_batch", "refuse"] = field(
        "keep_global_batch",
        help="Resuming on another number of ranks: keep_global_batch (accum_steps re-derived so that batch_size*accum_steps*ranks "
             "stays the checkpoint's; an error when it cannot divide), keep_micro_batch (batch_size and accum_steps as configured: "
             "the global batch changes), refuse (an error).")
    step_timeout_s: float = field(
        900.0, help="Step watchdog: a step (data wait, forward/backward, optimizer, sync) that takes longer than this many "
                    "seconds is a stall: the rank logs which phase stalled with a stack dump and exits with 4 (mcf.train."
                    "STALL_EXIT_CODE) so the launcher can requeue. 0 = off. Keep it below deepspeed.timeout_s.")
    step_timeout_slow_s: float = field(
        3600.0, help="The watchdog's deadline for the first steps after a start or resume (compilation, warm-up) and for "
                     "checkpoints, the monitor's evaluation and the final save.")
    stop_grace_s: float = field(
        120.0, help="After SIGTERM/SIGUSR1 the run checkpoints at the next step boundary; when none comes within this many "
                    "seconds (a stalled data stream, a hung file system) the process exits with 3 (REQUEUE_EXIT_CODE) "
                    "without a new checkpoint. 0 = wait for the boundary however long it takes.")

    def __post_init__(self) -> None:
        if min(self.step_timeout_s, self.step_timeout_slow_s, self.stop_grace_s) < 0:
            raise ConfigError("train.step_timeout_s, step_timeout_slow_s and stop_grace_s must be >= 0 (seconds; 0 = off)")
        if self.batch_size < 1 or self.accum_steps < 1 or self.epochs < 1:
            raise ConfigError("train.batch_size, accum_steps and epochs must be >= 1")
        if self.elastic not in ("keep_global_batch", "keep_micro_batch", "refuse"):
            raise ConfigError(f"train.elastic must be keep_global_batch, keep_micro_batch or refuse, not {self.elastic!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("train.max_steps must be >= 1")
        if not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(f"train.seed must be in [0, {SEED_MAX}] (numpy's seed range), got {self.seed}")
        if self.lock_stale_s < 1:
            raise ConfigError("train.lock_stale_s must be >= 1 (seconds)")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    zero: int = field(1, help="ZeRO stage 0-3.")
    config: str | None = field(None, help="DeepSpeed JSON (ds_configs/…); None = chosen from zero and precision. Batch keys are filled by mcf.")
    reduce_dtype: Literal["fp32", "bf16", "fp16"] = field(
        "fp32", help="dtype in which gradients are summed across ranks (DeepSpeed's communication_data_type, every ZeRO stage); "
                     "fp32 as the paper's DDP did; bf16/fp16 halve the traffic but round every partial sum.")
    timeout_s: float = field(
        1800.0, help="Collective timeout of the process group (NCCL's watchdog aborts a collective that waits longer; "
                     "torch's default is 10 min). Long work of one rank (checkpoint conversion, indexing) is waited for "
                     "without a collective, so this only bounds real hangs.")

    def __post_init__(self) -> None:
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError("deepspeed.zero must be 0, 1, 2 or 3")
        if self.timeout_s < 60:
            raise ConfigError(f"deepspeed.timeout_s must be >= 60 (seconds), got {self.timeout_s}")


@dataclass(kw_only=True)
class LoggingConfig:
    log_every: int = field(10, help="Steps between metric logs (values are gathered from the device only then).")
    recon_every: int = field(500, help="Steps between reconstruction PNGs (0 = only at the end).")
    tracking_uri: str | None = field(None, help="MLflow tracking URI; None = $MLFLOW_TRACKING_URI if set, else a "
                                                "local sqlite store in the output folder; 'none' disables MLflow.")
    experiment: str | None = field(None, help="MLflow experiment name; None = $MLFLOW_EXPERIMENT_NAME if set, "
                                              "else 'mcf'.")
    system_metrics: bool = field(True, help="MLflow samples CPU/GPU utilisation and memory every 10 s (its System "
                                            "metrics tab).")
    progress: bool = field(True, help="tqdm progress bar on rank 0 when stderr is a terminal; plain log lines every "
                                      "log_every steps otherwise (or when false).")
    profile_step: int = field(0, help="Profile this optimizer step (torch.profiler, rank 0): time shares of the mcf.* ranges "
                                      "(data, online, target, teacher, backward, optimizer, ema, sync) in OUTPUT/profile_step_N.json; 0 = off.")

    def __post_init__(self) -> None:
        if self.log_every < 1 or self.recon_every < 0:
            raise ConfigError("logging.log_every must be >= 1 and recon_every >= 0")
        if self.profile_step < 0:
            raise ConfigError("logging.profile_step must be >= 0 (0 = off)")


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = field(1000, help="Steps between checkpoints (a final one is always written).")
    keep_last: int = field(3, help="Complete checkpoints kept; older ones are deleted.")
    hash: bool = field(False, help="Record each file's SHA-256 in the COMPLETE marker (hashed while writing) and check it on "
                                   "resume (reads the whole checkpoint); sizes are always recorded and checked.")

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep_last < 1:
            raise ConfigError("checkpoint.every and keep_last must be >= 1")


@dataclass(kw_only=True)
class MonitorConfig:
    every: int = field(0, help="Steps between representation probes on held-out built-in faces (0 = off).")
    data: str = field("builtin", help="Held-out images for the probe ('builtin' = the built-in validation split).")


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig, help="Architecture.")
    masking: MaskingConfig = field(default_factory=MaskingConfig, help="Random masking.")
    attention: AttentionConfig = field(default_factory=AttentionConfig, help="Attention kernels.")
    loss: LossConfig = field(default_factory=LossConfig, help="Objective.")
    teacher: TeacherConfig = field(default_factory=TeacherConfig, help="Frozen perceptual teacher.")
    momentum: MomentumConfig = field(default_factory=MomentumConfig, help="EMA target encoder.")
    data: DataConfig = field(default_factory=DataConfig, help="Input pipeline.")
    optim: OptimConfig = field(default_factory=OptimConfig, help="Optimizer and learning-rate schedule.")
    train: TrainConfig = field(default_factory=TrainConfig, help="Run length, batch, precision, seed.")
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig, help="DeepSpeed engine.")
    logging: LoggingConfig = field(default_factory=LoggingConfig, help="Metrics, pictures, MLflow.")
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, help="Checkpointing.")
    monitor: MonitorConfig = field(default_factory=MonitorConfig, help="Representation monitor.")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_dict(name_or_path: str, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The partial dict of a named preset or a YAML file (a preset may ``inherit:`` another; a
    relative path is looked up beside the inheriting file first). A cycle is an error."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset '{name_or_path}' (presets: {', '.join(list_presets())}; or give a YAML path)")
    elif _chain and not path.is_absolute() and (_chain[-1].parent / path).is_file():
        path = _chain[-1].parent / path
    key = path.resolve()
    if key in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain[_chain.index(key):], key))
        raise ConfigError(f"config 'inherit:' cycle: {cycle}")
    data = load_yaml(path)
    parent = data.pop("inherit", None)
    if parent is not None:
        if not isinstance(parent, str) or not parent:
            raise ConfigError(f"config file {path}: 'inherit' must name a preset or a YAML file, got {parent!r}")
        data = merge(preset_dict(parent, (*_chain, key)), data)
    return data


def build_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = (), updates: dict[str, Any] | None = None) -> Config:
    """Resolve a config: preset/YAML, then the nested ``updates`` dict (CLI flags), then overrides."""
    return resolve(Config, preset_dict(preset) if preset else {}, flags=updates, overrides=overrides)


def load_config_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config from its saved dict (``config.yaml`` or a checkpoint)."""
    return from_dict(Config, data)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
