"""The distributed runtime and the DeepSpeed engine: ranks from any launcher, the DeepSpeed JSON
filled and checked against the config.

The DeepSpeed set-up the trainer needs lives here, so ``trainer.py`` reads as a loop; what mcf reads
of DeepSpeed's private state (where the fp32 masters live) is :mod:`mcf.train.ds_internals`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mcf.config import Config
from mcf.errors import ConfigError

log = logging.getLogger(__name__)

# ds_configs/ of the source tree; an installed wheel carries the same files as mcf/ds_configs/
_REPO_DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"
DS_CONFIG_DIR = _REPO_DS_CONFIGS if _REPO_DS_CONFIGS.is_dir() else Path(__file__).resolve().parents[1] / "ds_configs"
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- ranks ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or ""
    if not nodes or int(os.environ.get("SLURM_NNODES", "1")) <= 1:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True, timeout=30
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        raise ConfigError(
            "multi-node srun without MASTER_ADDR: export MASTER_ADDR (the first node) and MASTER_PORT"
        ) from None


def setup_env() -> tuple[int, int, int]:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from the launcher's environment.

    torchrun and the ``deepspeed`` launcher set them; under ``srun`` they come from SLURM_PROCID,
    SLURM_NTASKS and SLURM_LOCALID (MASTER_ADDR = the first node, MASTER_PORT from the job id unless
    set); a plain process is rank 0 of 1 on a free local port. Returns (rank, world_size, local_rank).
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("LOCAL_RANK", "0")
    if int(env.get("WORLD_SIZE", "1")) == 1:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in env:
            raise ConfigError(f"{key} is not set: start multi-rank runs with torchrun, the deepspeed launcher or srun")
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])


def init_distributed(wanted_precision: str = "fp32", timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """Start the process group on DeepSpeed's accelerator (NCCL on CUDA, gloo on CPU).

    Returns (rank, world_size, device). mcf starts the process group itself (:func:`process_group_kwargs`):
    DeepSpeed 0.19.8 would pass ``device_id=cuda:LOCAL_RANK``, which torch rejects when each task sees
    only its own GPU, and torch's 10-minute default timeout; DeepSpeed then finds the group started and
    only wraps it. On the CPU accelerator DeepSpeed's shared-memory collective op is disabled before init:
    it is JIT-compiled (27–70 s) and gloo is enough here.
    """
    rank, world_size, local_rank = setup_env()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "mcf" / "torch_extensions"))
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    for precision, supported in (("fp16", accel.is_fp16_supported), ("bf16", accel.is_bf16_supported)):
        if wanted_precision == precision and not supported():
            raise ConfigError(
                f"train.precision={precision} is not supported on this device ({accel.device_name()}); use fp32"
                + (" or bf16" if precision == "fp16" and accel.is_bf16_supported() else "")
            )
    if accel.device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        device = torch.device("cpu")
        if rank == 0:
            warn_emulated_bf16(wanted_precision)
    else:
        device = bind_device(accel, local_rank)
    import torch.distributed as dist

    backend = accel.communication_backend_name()
    if not dist.is_initialized():
        dist.init_process_group(**process_group_kwargs(backend, device, world_size, timeout_s))
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def warn_emulated_bf16(precision: str) -> bool:
    """Warn (and return True) when ``precision`` is bf16 on a CPU that only emulates bf16 products (no
    AVX512-BF16 or AMX, or torch told to leave them out: :func:`mcf.measure.cpu_isa`). The run goes on, as
    configured; its matrix products are then tens of times slower than in fp32 (a 2048³ product at
    1.8 GFLOP/s against fp32's 138 with the ISA limited to AVX2, benchmarks/RESULTS.md)."""
    from mcf.measure import cpu_isa, native_bf16

    if precision != "bf16" or native_bf16("cpu"):
        return False
    log.warning("precision bf16 on a CPU without native bf16 (its class: %s; no AVX512-BF16 or AMX): bf16 matrix "
                "products are emulated, tens of times slower than fp32; --precision fp32 (train.precision) is the "
                "fast choice here", cpu_isa())
    return True


def process_group_kwargs(backend: str, device: torch.device, world_size: int, timeout_s: float) -> dict[str, Any]:
    """The arguments of ``torch.distributed.init_process_group`` (ranks and address come from the environment).

    ``device_id`` (the rank's own bound device, not ``cuda:LOCAL_RANK``) lets NCCL create its communicator
    eagerly and bind it to that GPU; it is given on CUDA with more than one rank, as DeepSpeed does
    (a single rank has no peer; torch 2.6.0 < v < 2.7.1 could hang with it, pytorch#153960).
    ``timeout`` bounds every collective (the NCCL watchdog aborts one that waits longer).
    """
    import inspect

    import torch.distributed as dist
    from packaging import version

    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    hangs = version.parse("2.6.0") < version.parse(torch.__version__.split("+")[0]) < version.parse("2.7.1")
    if (device.type == "cuda" and world_size != 1 and not hangs
            and "device_id" in inspect.signature(dist.init_process_group).parameters):
        kwargs["device_id"] = device
    return kwargs


def device_index(local_rank: int, device_count: int) -> int:
    """The visible device a rank uses: ``local_rank % device_count``.

    ``LOCAL_RANK`` indexes the node's GPUs only when every rank sees all of them (torchrun, the
    deepspeed launcher); with per-task binding (slurm ``--gpus-per-task``, or CUDA_VISIBLE_DEVICES
    set per rank) each rank sees its own, and ``cuda:LOCAL_RANK`` would be an invalid ordinal.
    """
    if device_count < 1:
        raise ConfigError(
            "no accelerator device is visible to this rank (check CUDA_VISIBLE_DEVICES and the job's GPU binding)"
        )
    return local_rank % device_count


def bind_device(accel: Any, local_rank: int) -> torch.device:
    """Make this rank's device (:func:`device_index` of DeepSpeed's accelerator) current and return it."""
    index = device_index(local_rank, accel.device_count())
    accel.set_device(index)
    return torch.device(accel.device_name(index))


# -- the DeepSpeed JSON ---------------------------------------------------------------------------
def default_ds_config_path(zero: int, precision: str) -> Path:
    return DS_CONFIG_DIR / f"zero{zero}_{precision}.json"


def load_ds_json(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.is_file() and not path.suffix:
        path = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config not found: {name_or_path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
    return data


# A backward issues its gradient reduction in about this many buckets: the first ones overlap the rest of
# the backward (overlap_comm), only the last is left when it ends (1/8 of the reduction exposed)
GRAD_BUCKETS = 8
MIN_BUCKET = 100_000  # elements (0.4 MB fp32): smaller buckets would be latency-bound
MAX_BUCKET = 500_000_000  # DeepSpeed's default; also its ipg buffer (x2 with overlap_comm) in the reduce dtype
# Up to this many ranks (one 8-GPU node) each bucket is reduced to its owners; beyond, all-reduced (see below)
OWNER_REDUCE_MAX_RANKS = 8


def online_trainable_params(cfg: Config) -> int:
    """Trainable elements of the online model ``cfg`` describes, counted on the meta device (no weights,
    no teacher; ~0.1 s): what the gradient reduction moves per step."""
    from mcf.models.mcf import MCFOnline
    from mcf.models.registry import get_spec

    overrides = {k: v for k, v in (("proj_hidden", cfg.loss.projector_hidden), ("proj_dim", cfg.loss.projector_dim))
                 if v is not None}
    spec = get_spec(cfg.model.name, img_size=cfg.model.img_size, **overrides)
    with torch.device("meta"):
        online = MCFOnline(spec)
    return sum(p.numel() for p in online.parameters() if p.requires_grad)


def grad_bucket_elements(trainable_params: int) -> int:
    """``reduce_bucket_size`` (elements) for a model: :data:`GRAD_BUCKETS` buckets per backward, within
    [:data:`MIN_BUCKET`, :data:`MAX_BUCKET`], even (DeepSpeed's 4-byte alignment of 2-byte elements)."""
    return 2 * (min(MAX_BUCKET, max(MIN_BUCKET, -(-trainable_params // GRAD_BUCKETS))) // 2)


def communication_defaults(zero: int, trainable_params: int, world_size: int) -> dict[str, Any]:
    """The ``zero_optimization`` keys mcf sets unless the JSON does (see the README's "Communication"):

    - ZeRO-1/2 ``overlap_comm``: each full bucket's reduction is issued from the gradient hooks during
      the backward, on DeepSpeed's reduction stream; at ZeRO-1 only in the accumulation boundary's
      backward, so the gradients are reduced once per optimizer step (ZeRO-2 reduces each micro-batch);
    - ZeRO-1/2 ``use_multi_rank_bucket_allreduce``: false up to :data:`OWNER_REDUCE_MAX_RANKS` ranks (each
      bucket reduced to the ranks owning its slices, one ``reduce`` per owner: a reduce-scatter's bytes,
      half an all-reduce's), true beyond (DeepSpeed's default: one all-reduce per bucket), because the
      owner reduces number ~2·W per step and each pays a ring's latency: ``mcf bench scale --project``
      projects ViT-B/16 at 64 GPUs to 85.8 % with them and 93.4 % with all-reduces (RESULTS.md);
    - every stage ``reduce_bucket_size`` from the model size (:func:`grad_bucket_elements`);
    - ZeRO-3 ``stage3_param_persistence_threshold: 0``: no parameter stays whole on every rank. DeepSpeed's
      default (1e5 elements) keeps every bias and norm whole and all-gathers each one alone after every step
      (173 for ViT-B/16, one ring latency each: 17 ms per step at 64 GPUs); at 0 they travel with their
      module's weights in the forward's coalesced gathers: ViT-B/16 at 64 GPUs projects to 58.1 % with the
      threshold at 1e4 and 94.6 % at 0, counted at its real widths (``mcf.bench.scale_widths``, RESULTS.md).
    """
    out: dict[str, Any] = {}
    if zero in (1, 2, 3):
        out["reduce_bucket_size"] = grad_bucket_elements(trainable_params)
    if zero == 3:
        out["stage3_param_persistence_threshold"] = 0
    if zero in (1, 2):
        out.update(overlap_comm=True, contiguous_gradients=True,
                   use_multi_rank_bucket_allreduce=world_size > OWNER_REDUCE_MAX_RANKS)
    return out


# The config keys the DeepSpeed keys mcf fills come from (named in conflict errors): pretrain's tree.
PRETRAIN_DS_KEYS = {"batch": "train.batch_size", "accum": "train.accum_steps", "grad_clip": "optim.grad_clip",
                    "zero": "deepspeed.zero", "precision": "train.precision"}


def fill_ds_config(ds: dict[str, Any], *, micro_batch: int, accum: int, world_size: int, zero: int, precision: str,
                   grad_clip: float, source: str = "built-in defaults",
                   keys: dict[str, str] = PRETRAIN_DS_KEYS) -> dict[str, Any]:
    """A copy of the DeepSpeed config ``ds`` (read from ``source``) with the keys every mcf engine owns filled:
    batch sizes, accumulation, clipping, ZeRO stage, precision (DeepSpeed's ``bf16``/``fp16`` sections), a
    client optimizer allowed, no console prints. A key ``ds`` sets to another value is an error naming the
    config key (``keys``) that sets it; so is an ``optimizer``, ``scheduler`` or apex ``amp`` section (mcf
    supplies the optimizer and the lr schedule). Used by pretraining and by ``mcf finetune``."""
    ds = json.loads(json.dumps(ds))  # a private copy

    def conflict(key: str, have: Any, want: Any, flag: str) -> ConfigError:
        return ConfigError(f"DeepSpeed config {source} sets {key}={have!r} but the run has {flag}={want!r}; "
                           "remove the key from the JSON (mcf fills it) or change the flag")

    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"DeepSpeed config {source} has an '{key}' section: mcf supplies the optimizer and the "
                              "lr schedule (optim.*); remove it")
    expected = {
        "train_micro_batch_size_per_gpu": (micro_batch, keys["batch"]),
        "gradient_accumulation_steps": (accum, keys["accum"]),
        "train_batch_size": (micro_batch * accum * world_size, f"{keys['batch']}*{keys['accum']}*world_size"),
        "gradient_clipping": (grad_clip, keys["grad_clip"]),
    }
    for key, (want, flag) in expected.items():
        if key in ds and ds[key] not in ("auto", None) and float(ds[key]) != float(want):
            raise conflict(key, ds[key], want, flag)
        ds[key] = want
    zo = ds.setdefault("zero_optimization", {})
    if "stage" in zo and int(zo["stage"]) != zero:
        raise conflict("zero_optimization.stage", zo["stage"], zero, keys["zero"])
    zo["stage"] = zero
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        want = precision == name
        if "enabled" in section and section["enabled"] not in ("auto",) and bool(section["enabled"]) != want:
            raise conflict(f"{name}.enabled", section["enabled"], precision, keys["precision"])
        section["enabled"] = want
    if "amp" in ds and ds["amp"].get("enabled"):
        raise ConfigError(f"DeepSpeed config {source} enables apex amp: use {keys['precision']} instead")
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def build_ds_config(cfg: Config, world_size: int, trainable_params: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a pre-training run: ``deepspeed.config`` (or ``ds_configs/zero{Z}_{P}.json``
    when it exists, else a minimal one) filled by :func:`fill_ds_config` from the mcf config, then the
    communication keys of :func:`communication_defaults` where the JSON leaves them out (``trainable_params``:
    the online model's, counted when not given), pre-training's communication dtype and the syncs it saves.
    A key the JSON sets to a different value than the flags is an error.
    """
    t, z, p = cfg.train, cfg.deepspeed.zero, cfg.train.precision
    if cfg.deepspeed.config:
        ds, source = load_ds_json(cfg.deepspeed.config), cfg.deepspeed.config
    elif default_ds_config_path(z, p).is_file():
        ds, source = load_ds_json(str(default_ds_config_path(z, p))), str(default_ds_config_path(z, p))
    else:
        ds, source = {}, "built-in defaults"
    ds = fill_ds_config(ds, micro_batch=t.batch_size, accum=t.accum_steps, world_size=world_size, zero=z, precision=p,
                        grad_clip=cfg.optim.grad_clip, source=source)
    zo = ds["zero_optimization"]
    if trainable_params is None:
        trainable_params = online_trainable_params(cfg)
    for key, value in communication_defaults(z, trainable_params, world_size).items():
        zo.setdefault(key, value)
    if zo.get("offload_optimizer", {}).get("device", "none") not in ("none", None):
        log.warning("optimizer offload makes DeepSpeed use DeepSpeedCPUAdam (JIT-compiled, ~2 min on first use)")
    elif z in (1, 2) and not cfg.optim.grad_clip and "grad_accum_dtype" not in ds.get("data_types", {}):
        # without clipping nothing reads the global gradient norm, which costs one all-reduce per param group
        # (DeepSpeed's BF16_Optimizer, chosen by data_types.grad_accum_dtype at ZeRO-1, needs it: left alone)
        zo.setdefault("compute_grad_norm", False)
    if p == "bf16":
        # DeepSpeed's gradient-overflow check costs a host sync per step at ZeRO-1/2 (an .item()) and skips a
        # non-finite step silently; the trainer's finite-loss check stops the run before such an update in the
        # step's one sync (bf16 has fp32's range: a non-finite gradient under a finite loss is not expected)
        ds["bf16"].setdefault("check_grad_overflow", False)
    # DeepSpeed 0.19.8 reads communication_data_type in the engine (ZeRO 0 and the BF16 optimizer's all-reduce),
    # DeepSpeedZeroOptimizer (ZeRO 1/2) and DeepSpeedZeroOptimizer_Stage3; unset, it is the training dtype (bf16/fp16)
    comm = ds.get("communication_data_type")
    if comm is not None and str(comm).lower() != cfg.deepspeed.reduce_dtype:
        raise ConfigError(f"DeepSpeed config {source} sets communication_data_type={comm!r} but the run has "
                          f"deepspeed.reduce_dtype={cfg.deepspeed.reduce_dtype!r}; remove the key from the JSON "
                          "(mcf fills it) or change the flag")
    ds["communication_data_type"] = cfg.deepspeed.reduce_dtype
    return ds


def cast_floating_buffers(module: nn.Module, dtype: torch.dtype) -> None:
    """Every floating-point buffer of ``module`` to ``dtype``, as a new tensor.

    Not ``buf.data = buf.data.to(dtype)``: a buffer that is a view (the sin-cos position tables are
    ``emb.unsqueeze(0)``) would keep its fp32 base, and torch.compile rejects a view whose base has
    another dtype ("torch.float32 != torch.bfloat16").
    """
    for mod in module.modules():
        for name, buf in mod._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                mod._buffers[name] = buf.to(dtype)


# -- the engine's input dtype --------------------------------------------------------------------
class CastInput(nn.Module):
    """Calls the engine with the images cast to the engine's dtype (the target and teacher keep theirs)."""

    def __init__(self, engine: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.engine, self.dtype = engine, dtype

    def forward(self, images: torch.Tensor, *args: Any) -> Any:
        return self.engine(images.to(self.dtype), *args)


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (``train.tf32``); other devices have no TF32."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
