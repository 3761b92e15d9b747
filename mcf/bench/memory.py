"""``mcf bench memory``: what activation checkpointing (``train.activation_checkpointing``) saves and
costs, and the per-GPU batch it allows.

Measured, on the CPU at a small size (``--model``, ``--img-size``): for each setting (none, encoder,
decoder, teacher, all) the training step's forward and backward (the optimizer step allocates no
activations) at two batch sizes, with :class:`LiveBytes` recording the peak of the bytes held by
tensors created during the step (activations, gradients, temporaries: what a CUDA allocator's
``max_memory_allocated`` adds to the weights, without its caching), the process's resident-set
high-water mark, and the step time (settings interleaved, median of ``repeats``). The slope between
the two batch sizes is the per-image activation memory; the rest is the step's fixed part (the
gradients, one-off buffers).

Counted, for the projection (``--project``, e.g. ViT-B/L/H at 224 with a ViT-B teacher): the same
tracker on the same program on the meta device (shapes and dtypes, no memory, no arithmetic),
with SDPA routed to the fused kernel the CPU runs (``_scaled_dot_product_flash_attention_for_cpu``,
which keeps, like CUDA's flash attention, the output and the log-sum-exp, not the attention
matrix); the CPU model is counted the same way too, so the two can be compared.

Derived (:func:`model_state_bytes`, :func:`max_batch`): the largest per-GPU batch on a ``gpu_gb``
card next to the batch-independent state: the online model's bf16 weights and gradients, fp32
masters and fp32 Adam moments as the ZeRO stage shards them over ``ranks``, the EMA target (fp32
shard and bf16 forward weights), the bf16 teacher, and a reserve (CUDA context, NCCL buffers,
DeepSpeed's buckets, fragmentation). At the batch sizes of the count the peak is the activations'
(at the start of the backward); at small ones it can be the gradients' (at its end), so the CPU
table also gives what the forward keeps for the backward per image (``saved_per_image_bytes``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
import time
import weakref
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mcf.bench.common import emit, run_info
from mcf.bench.config import MemoryBenchConfig
from mcf.measure import PeakMemory

log = logging.getLogger(__name__)



class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while the mode is active and still alive.

    Every op's outputs are looked at; a storage is counted from its first appearance as a new output
    (not one of the op's inputs' storages: views and in-place results are not new) until it is freed
    (a weakref finaliser on it). Storages made before the mode (weights, buffers) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # an output sharing an input's storage (a view, an in-place op) is nothing new, even when that
        # input was made before the mode (a weight and its transpose)
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in self._seen or key in inputs:
                continue
            self._seen[key] = st.nbytes()
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, key)
        return out


@contextlib.contextmanager
def cpu_flash_attention() -> Iterator[None]:
    """SDPA calls go to the CPU's fused kernel, whatever the device (its meta version counts as the CPU runs)."""
    sdpa = F.scaled_dot_product_attention

    def flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):  # noqa: ANN001 - as SDPA
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def build(name: str, img_size: int | None, teacher: str | None, precision: str, device: str) -> torch.nn.Module:
    from mcf.models import create_model

    torch.manual_seed(0)
    quiet = logging.getLogger("mcf.models.registry")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "random teacher": expected here
    try:
        with torch.device(device):
            model = create_model(
                name, teacher_checkpoint="random", teacher_name=teacher, img_size=img_size, teacher_img_size=img_size
            )
    finally:
        quiet.setLevel(level)
    # SDPA everywhere, whatever `auto` would take on this host: the count is of the fused kernel's saved tensors
    # (the output and the log-sum-exp, as flash attention on a GPU keeps), on the CPU as on the meta device; the
    # math path, `auto`'s choice at short sequences on some CPUs, would also keep each attention matrix
    model.set_attention_backend("sdpa")
    # as DeepSpeed's bf16 engine: low-precision weights and activations
    return model.to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32).train()


def _inputs(model: torch.nn.Module, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    device, dtype = next(model.online.parameters()).device, next(model.online.parameters()).dtype
    size = model.spec.img_size
    return torch.randn(batch, 3, size, size, device=device).to(dtype), torch.rand(
        2, batch, model.num_patches, device=device
    )


def step_bytes(model: torch.nn.Module, mode: str, batch: int) -> tuple[int, int]:
    """(bytes kept for the backward at the end of the forward, peak bytes over forward + backward) of
    the tensors created during one step (after a warm-up step)."""
    model.set_activation_checkpointing(mode)
    images, noise = _inputs(model, batch)
    tracker = LiveBytes()
    saved = 0
    for warm in (True, False):
        for p in model.online.parameters():
            p.grad = None
        gc.collect()
        with tracker if not warm else contextlib.nullcontext():
            loss = model(images, noise[0], noise[1]).loss
            saved = tracker.live
            loss.backward()
            del loss
    return saved, tracker.peak


def per_image(model: torch.nn.Module, mode: str, batches: tuple[int, int]) -> dict[str, Any]:
    """Per-image bytes: the slope of the step's peak between two batch sizes (and its intercept, the
    fixed part), and the slope of what the forward keeps for the backward."""
    (s_lo, lo), (s_hi, hi) = (step_bytes(model, mode, b) for b in batches)
    db = batches[1] - batches[0]
    slope = (hi - lo) / db
    return {
        "peak_step_bytes": {str(batches[0]): lo, str(batches[1]): hi},
        "per_image_bytes": slope,
        "fixed_bytes": lo - slope * batches[0],
        "saved_per_image_bytes": (s_hi - s_lo) / db,
    }


def cpu_table(cfg: MemoryBenchConfig) -> dict[str, Any]:
    """The measured table (see the module doc)."""
    model = build(cfg.model, cfg.img_size, None, cfg.precision, "cpu")
    rows: dict[str, Any] = {}
    for mode in cfg.modes:
        log.info("bench memory: %s on the CPU", mode)
        rss = PeakMemory(torch.device("cpu"))
        rss.reset()
        rows[mode] = per_image(model, mode, cfg.batch_sizes)
        rows[mode]["rss_high_water_bytes"] = rss.peak_bytes()
    batch = cfg.batch_sizes[1]
    images, noise = _inputs(model, batch)
    times: dict[str, list[float]] = {m: [] for m in cfg.modes}
    cpu_times: dict[str, list[float]] = {m: [] for m in cfg.modes}
    for _ in range(cfg.repeats):  # settings interleaved: load from other processes falls on all alike
        for mode in cfg.modes:
            model.set_activation_checkpointing(mode)
            for p in model.online.parameters():
                p.grad = None
            t0, c0 = time.perf_counter(), time.process_time()
            model(images, noise[0], noise[1]).loss.backward()
            times[mode].append(time.perf_counter() - t0)
            cpu_times[mode].append(time.process_time() - c0)
    for mode in cfg.modes:
        rows[mode]["ms_per_step"] = statistics.median(times[mode]) * 1e3
        rows[mode]["ms_per_step_all"] = [t * 1e3 for t in times[mode]]
        # this process's CPU time (all its threads): what the step computes, little moved by other processes' load
        rows[mode]["cpu_ms_per_step"] = statistics.median(cpu_times[mode]) * 1e3
    with cpu_flash_attention():  # the meta count of the same model, to compare with the measurement
        meta = build(cfg.model, cfg.img_size, None, cfg.precision, "meta")
        for mode in cfg.modes:
            rows[mode]["meta_per_image_bytes"] = per_image(meta, mode, cfg.batch_sizes)["per_image_bytes"]
    _relative(rows)
    return {
        "model": cfg.model,
        "img_size": model.spec.img_size,
        "teacher": model.teacher.name,
        "batch_for_time": batch,
        "modes": rows,
        "params": _params(model),
    }


def _relative(rows: dict[str, Any]) -> None:
    base = rows.get("none")
    for r in rows.values():
        if base:
            r["per_image_vs_none"] = r["per_image_bytes"] / base["per_image_bytes"]
            if "ms_per_step" in r:
                r["time_vs_none"] = r["ms_per_step"] / base["ms_per_step"]
                r["cpu_time_vs_none"] = r["cpu_ms_per_step"] / base["cpu_ms_per_step"]


def _params(model: torch.nn.Module) -> dict[str, int]:
    return {
        "online": sum(p.numel() for p in model.online.parameters()),
        "target": sum(p.numel() for p in model.target.parameters()),
        "teacher": sum(p.numel() for p in model.teacher.parameters()),
    }


def model_state_bytes(params: dict[str, int], ranks: int, zero: int) -> float:
    """Batch-independent bytes per GPU (derived): the online model's bf16 weights (sharded at ZeRO-3),
    bf16 gradients (sharded at ZeRO >= 2), fp32 masters and two fp32 Adam moments (sharded at
    ZeRO >= 1), the EMA target's fp32 EMA (sharded with the masters) and bf16 forward weights, the
    bf16 teacher. DeepSpeed's communication buckets are left to the reserve."""
    n, t = params["online"], params["target"]
    sharded = ranks if zero >= 1 else 1
    weights = 2 * n / (ranks if zero == 3 else 1)
    grads = 2 * n / (ranks if zero >= 2 else 1)
    return weights + grads + 12 * n / sharded + 4 * t / sharded + 2 * t + 2 * params["teacher"]


def max_batch(
    per_image_bytes: float, fixed_bytes: float, state_bytes: float, gpu_bytes: float, reserve_bytes: float
) -> int:
    """The largest batch with ``reserve + state + fixed + batch · per_image <= gpu``."""
    return max(0, int((gpu_bytes - reserve_bytes - state_bytes - fixed_bytes) // per_image_bytes))


def projection(cfg: MemoryBenchConfig) -> dict[str, Any]:
    """Per-image bytes counted on the meta device at each model's own size, and the batch that fits."""
    out: dict[str, Any] = {}
    gpu, reserve = cfg.gpu_gb * 1e9, cfg.reserve_gb * 1e9
    with cpu_flash_attention():
        for name in cfg.project:
            log.info("bench memory: counting %s on the meta device", name)
            model = build(name, None, cfg.project_teacher, cfg.precision, "meta")
            params = _params(model)
            state = model_state_bytes(params, cfg.ranks, cfg.zero)
            rows = {mode: per_image(model, mode, cfg.project_batch_sizes) for mode in cfg.modes}
            for r in rows.values():
                r["max_batch"] = max_batch(r["per_image_bytes"], r["fixed_bytes"], state, gpu, reserve)
            _relative(rows)
            out[name] = {
                "img_size": model.spec.img_size,
                "teacher": model.teacher.name,
                "params": params,
                "state_bytes": state,
                "modes": rows,
            }
    return out


def run(cfg: MemoryBenchConfig) -> dict[str, Any]:
    result: dict[str, Any] = {"benchmark": "memory", "precision": cfg.precision, "cpu": cpu_table(cfg)}
    if cfg.project:
        result["projection"] = projection(cfg)
        result["projection_assumptions"] = {
            "gpu_gb": cfg.gpu_gb,
            "ranks": cfg.ranks,
            "zero": cfg.zero,
            "reserve_gb": cfg.reserve_gb,
            "state": "bf16 weights (/ranks at ZeRO-3) + bf16 gradients (/ranks at ZeRO>=2) + fp32 master "
            "and 2 Adam moments "
            "(/ranks at ZeRO>=1) + EMA fp32 (/ranks at ZeRO>=1) and bf16 forward weights + bf16 teacher",
        }
    result["peak_source"] = (
        "bytes of tensors created during one forward+backward and alive at once (mcf.bench.memory.LiveBytes)"
    )
    result["config"] = {k: v for k, v in asdict(cfg).items() if k != "out"}
    result.update(run_info(torch.device("cpu")))
    return result


def main(cfg: MemoryBenchConfig) -> dict[str, Any]:
    result = run(cfg)
    emit(result, cfg.out)
    return result
