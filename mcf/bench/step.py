"""``mcf bench step`` / ``mcf bench e2e``: the paper's training step against mcf's, in one process.

The variants run the same model (same name, sizes, seed), batch and device, one after the other:

- ``paper`` — the step as released: eager math attention (encoder, decoder, EMA target and the
  timm teacher), fp16 autocast + GradScaler on a GPU (fp32 on the CPU), the teacher called twice
  (original, rebuilt), a per-parameter Python momentum update inside the step before the forward,
  ``torch.optim.AdamW`` with its default implementation, ``loss.item()`` and a device synchronise
  every step, a plain DataLoader feed (in-memory tensors; JPEG files through PIL in ``e2e``).
- ``mcf`` — our path, in the trainer's precisions: bf16 autocast for the online model (each weight
  cast once per step: autocast caches the casts of trainable leaves), the frozen teacher's and the
  EMA target's forward weights stored in bf16 (the trainer's ``teacher.to(dtype)`` and
  ``train.target_precision=auto``; the EMA itself in fp32, copied into them after each update),
  attention by dispatch (``auto``: the measured fastest path per device, dtype and shape,
  ``mcf.kernels.dispatch``), ``torch.optim.AdamW(fused=True)``, the EMA as ``_foreach`` ops after
  the optimizer step, no host synchronisation inside the timed steps,
  batches pre-staged on the device (``e2e``: mcf's loader — DALI when
  it works here, else its PyTorch loader). The teacher also runs twice, the original under
  ``no_grad``: batching both passes would add a backward pass over the original's half.

- ``mcf_compiled`` (with ``--compile``) — ``mcf`` with the model ``torch.compile``-d, timed in the
  same run beside eager ``mcf``; the compilation happens in its warm-up steps.

The trainer wraps ``model.online`` in a DeepSpeed engine; this benchmark times the model's step
without the engine so that the two variants differ only in the listed points.

Timing: ``warmup`` steps, then ``repeats`` timed windows of ``steps`` steps each, synchronising the
device only around each window; the reported step time is the median window over ``steps``. By
default (``order=interleaved``) all variants are built first and their windows alternate, so that
load from other processes on a shared machine falls on both alike; peak memory is each variant's
peak during its warm-up minus what was resident before it was built (the other variant).
FLOPs are counted (``torch.utils.flop_counter``) during the paper variant's first warm-up step —
forward and backward of the whole step, the teacher's two passes and the target's included — and
MFU is ``images/s × FLOPs/image`` over the device's matmul peak measured in the same run (bf16 on
a GPU; on a CPU the faster of fp32 and bf16 — without AVX512-BF16 the bf16 product is emulated and
far slower, and mcf's variant then runs in fp32 too), by ``mcf.measure.matmul_peaks`` (fixed
sizes, warm-up, the best of rounds of median products: the trainer's method), measured at the start
and again at the end of the run, the better of the two per dtype (both are in
``peak_flops_measured``). A dtype's peak below the rate of a variant computing in that dtype is
raised to that rate (``peak_raised_to_achieved``: dtype → variant), so no MFU exceeds 1. Each eager
variant's dtype conversions in one step are counted (``dtype_casts_per_step``,
``mcf.models.flops.CastCounter``) and the CPU time of each window is reported beside its wall
time (``cpu_s_per_step``: on a shared host the steadier figure).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import torch

from mcf.bench.common import emit, run_info
from mcf.bench.config import VARIANTS, StepBenchConfig
from mcf.measure import (
    PeakMemory,
    best_peaks,
    device_name,
    fast_dtype,
    measure_peaks,
    peak_at_least,
    peak_flops,
    resolve_device,
    sync,
    time_repeats,
)
from mcf.models.flops import CastCounter, count_flops, step_flops, use_math_attention

log = logging.getLogger(__name__)



# -- the two steps -----------------------------------------------------------------------------------
def build_model(cfg: StepBenchConfig, device: torch.device, variant: str) -> torch.nn.Module:
    from mcf.models import create_model

    torch.manual_seed(0)
    model = create_model(cfg.model, teacher_checkpoint="random", img_size=cfg.img_size,
                         teacher_img_size=cfg.teacher_img_size or cfg.img_size)
    if variant == "paper":
        use_math_attention(model)
    return model.to(device).train()


def _adamw_kwargs() -> dict[str, Any]:
    return {"lr": 1.5e-4, "betas": (0.9, 0.95), "weight_decay": 0.05}


def paper_step_fn(model: torch.nn.Module, device: torch.device, momentum: float) -> Callable[[torch.Tensor], None]:
    """The released step (see the module docstring)."""
    opt = torch.optim.AdamW(model.online.parameters(), **_adamw_kwargs())
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    online = dict(model.online.named_parameters())
    pairs = [(online[name], t) for name, t in model.ema_pairs()]
    losses: list[float] = []

    def step(images: torch.Tensor) -> None:
        with torch.no_grad():  # the release's _update_momentum_encoder: one Python op per parameter
            for po, pt in pairs:
                pt.data = pt.data * momentum + po.data * (1.0 - momentum)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            out = model(images)
        loss_value = out.loss.item()
        opt.zero_grad()
        if scaler is not None:
            scaler.scale(out.loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            out.loss.backward()
            opt.step()
        sync(device)
        losses.append(loss_value)

    step.losses = losses  # type: ignore[attr-defined]
    return step


def mcf_step_fn(model: torch.nn.Module, device: torch.device, momentum: float, compile: bool = False, bf16: bool = True
                ) -> Callable[[torch.Tensor], None]:
    """Our step (see the module docstring); the loss stays on the device until the end. ``bf16``:
    autocast to bf16 (off on a CPU whose bf16 matmul was measured slower than fp32), the teacher's
    and the target's forward weights stored in bf16 (the target's fp32 EMA kept beside them)."""
    opt = torch.optim.AdamW(model.online.parameters(), fused=True, **_adamw_kwargs())
    targets = [t for _, t in model.ema_pairs()]
    ema = targets  # fp32: the target's own parameters are the EMA
    if bf16:
        ema = [t.detach().clone() for t in targets]  # the fp32 EMA; the target computes in bf16
        model.teacher.to(torch.bfloat16)  # frozen: no master copy needed (as the trainer)
        model.target.to(torch.bfloat16)
        targets = [t for _, t in model.ema_pairs()]
    online = dict(model.online.named_parameters())
    sources = [online[name] for name, _ in model.ema_pairs()]
    fwd = torch.compile(model) if compile else model
    loss_sum = torch.zeros((), device=device)

    @torch.no_grad()
    def update_target() -> None:  # t ← m·t + (1 − m)·θ in fp32, then into the bf16 forward weights
        torch._foreach_mul_(ema, momentum)
        torch._foreach_add_(ema, sources, alpha=1.0 - momentum)
        if ema is not targets:
            torch._foreach_copy_(targets, ema)

    def step(images: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = fwd(images)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_target()
        loss_sum.add_(out.loss.detach())

    step.loss_sum = loss_sum  # type: ignore[attr-defined]
    return step


# -- feeds ---------------------------------------------------------------------------------------------
def _feed(cfg: StepBenchConfig, variant: str, device: torch.device, img_size: int, folder: str | None, samples: int
          ) -> tuple[Iterator[torch.Tensor], dict[str, Any]]:
    from mcf.bench import feeds

    if not cfg.e2e:
        if variant == "paper":
            return feeds.tensor_batches(feeds.tensor_loader(cfg.batch_size, img_size), device), {
                "feed": "DataLoader over in-memory tensors"
            }
        return feeds.staged_batches(cfg.batch_size, img_size, device), {"feed": "pre-staged device tensors"}
    if variant == "paper":
        ld = feeds.paper_loader(folder, img_size, cfg.batch_size, cfg.workers, device, length=samples)
        return feeds.paper_batches(ld, device), {
            "feed": f"PIL DataLoader ({cfg.workers} workers)", "loader": "torch-pil"
        }
    ld, kind = feeds.mcf_loader(folder, img_size, cfg.batch_size, cfg.workers, device, cfg.loader)
    info: dict[str, Any] = {"feed": f"mcf.data {kind} loader ({cfg.workers} workers)", "loader": kind}
    if kind != "dali":
        from mcf.data import dali_available

        info["dali_available"] = bool(dali_available(device))
        info["note"] = (
            "DALI unavailable here: mcf's PyTorch loader ran"
            if not info["dali_available"]
            else f"loader={cfg.loader} chosen"
        )
    return feeds.mcf_batches(ld), info


def _profile_top(
    step: Callable[[torch.Tensor], None], batch: torch.Tensor, device: torch.device, top: int = 12
) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step(batch)
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return [{"op": e.key, "self_ms": round(getattr(e, key) / 1e3, 3), "calls": e.count} for e in events]


class _Variant:
    """One variant, built and warmed up: its model, step, feed and the peak memory of its warm-up."""

    def __init__(
        self, cfg: StepBenchConfig, variant: str, device: torch.device, peaks: dict[str, float], folder: str | None,
        count_flops_now: bool,
    ):
        self.cfg, self.name, self.device = cfg, variant, device
        mem = PeakMemory(device)
        base = _resident_bytes(device)  # what is already held (the other variant, when interleaved)
        mem.reset()
        self.model = build_model(cfg, device, variant)
        img_size = self.model.spec.img_size
        samples = (cfg.warmup + cfg.repeats * cfg.steps + 2) * cfg.batch_size
        self.feed, self.info = _feed(cfg, variant, device, img_size, folder, samples)
        self.bf16 = fast_dtype(peaks) == "bf16"
        if variant == "paper":
            self.step = paper_step_fn(self.model, device, cfg.momentum)
        else:
            self.step = mcf_step_fn(self.model, device, cfg.momentum, variant == "mcf_compiled", self.bf16)
        self.flops_per_image = None
        self.casts: dict[str, Any] | None = None
        first = 0
        if variant != "mcf_compiled":  # the first warm-up step, its dtype conversions (and FLOPs) counted
            with CastCounter() as casts:
                if count_flops_now:
                    self.flops_per_image = count_flops(lambda: self.step(next(self.feed))) / cfg.batch_size
                else:
                    self.step(next(self.feed))
            self.casts, first = casts.summary(), 1
        for _ in range(first, cfg.warmup):
            self.step(next(self.feed))
        sync(device)
        if device.type == "cuda":  # the allocator's exact high-water mark, less what was held before
            self.peak_bytes = max(0, mem.peak_bytes() - base)
            self.peak_source = mem.source + (" minus the bytes resident before this variant was built" if base else "")
        else:
            # RSS growth is no measure on the CPU: the allocator reuses pages the other variant freed,
            # so the growth can be 0. Report the whole process's high-water mark over this variant.
            self.peak_bytes = mem.peak_bytes()
            self.peak_source = mem.source + " (whole process, over this variant's build and warm-up)"
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def window(self) -> None:
        """One timed window of ``cfg.steps`` steps, synchronised at both ends (wall and process CPU time)."""
        cpu = time.process_time()
        self.times += time_repeats(lambda: [self.step(next(self.feed)) for _ in range(self.cfg.steps)], self.device, 1)
        self.cpu_times.append(time.process_time() - cpu)

    def result(self) -> dict[str, Any]:
        """The variant's figures; its MFU is set by :func:`run` once the run's peaks are final."""
        cfg, variant, device = self.cfg, self.name, self.device
        ms = statistics.median(self.times) / cfg.steps * 1e3
        result: dict[str, Any] = {
            "images_per_s": cfg.batch_size / (ms / 1e3),
            "ms_per_step": ms,
            "ms_per_step_windows": [t / cfg.steps * 1e3 for t in self.times],
            # process CPU time (all threads) per step: less moved by other processes than wall time
            "cpu_s_per_step": statistics.median(self.cpu_times) / cfg.steps,
            "images_per_cpu_s": cfg.batch_size * cfg.steps / statistics.median(self.cpu_times),
            "threads": torch.get_num_threads(),
            "dtype_casts_per_step": self.casts,
            "peak_memory_bytes": self.peak_bytes,
            "peak_memory_source": self.peak_source,
            "flops_per_image": None,
            "mfu": None,
            "compute_dtype": ("fp16" if device.type == "cuda" else "fp32") if variant == "paper"
            else ("bf16" if self.bf16 else "fp32"),
            "precision": (
                ("fp16 autocast + GradScaler" if device.type == "cuda" else "fp32")
                if variant == "paper"
                else ("bf16 autocast" if self.bf16 else "fp32 (bf16 matmul measured slower than fp32 on this device)")
            ),
            "attention": "math (eager)" if variant == "paper" else "auto (measured dispatch: mcf.kernels.dispatch)",
            "attention_choices": None if variant == "paper" else _attention_choices(device),
            "optimizer": "torch.optim.AdamW (default impl)" if variant == "paper" else "torch.optim.AdamW(fused=True)",
            "compiled": variant == "mcf_compiled",
            **self.info,
        }
        if variant == "paper":
            result["last_loss"] = self.step.losses[-1]  # type: ignore[attr-defined]
        else:
            result["mean_loss"] = float(self.step.loss_sum.item()) / (  # type: ignore[attr-defined]
                cfg.warmup + len(self.times) * cfg.steps
            )
        if cfg.profile:
            result["profile_top_ops"] = _profile_top(self.step, next(self.feed), device)
        return result

    def close(self) -> None:
        for attr in ("step", "model", "feed"):
            setattr(self, attr, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _resident_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _attention_choices(device: torch.device) -> dict[str, str]:
    """What ``auto`` chose so far in this process on ``device``: ``"<dtype> S<len> D<dim>[ masked]"`` → path."""
    from mcf.kernels.dispatch import _choice

    return {
        f"{str(dt)[6:]} S{s} D{d}{' masked' if m else ''}": c
        for (typ, _, dt, s, d, m), c in _choice.items()
        if typ == device.type
    }


def _set_mfu(result: dict[str, Any], flops_per_image: float, peaks: dict[str, float]) -> None:
    result["flops_per_image"] = flops_per_image
    achieved = result["images_per_s"] * flops_per_image
    result["achieved_flops"] = achieved
    reference, raised = peak_at_least(peak_flops(peaks), achieved)
    result["peak_raised_to_achieved"] = raised  # the measured peak was below this rate: it was wrong
    result["mfu"] = achieved / reference
    for k, v in peaks.items():
        if not k.endswith("_n"):
            result[f"mfu_vs_{k}_peak"] = achieved / v


def _final_peaks(peaks: dict[str, float], results: dict[str, Any], flops: float | None
                 ) -> tuple[dict[str, float], dict[str, str]]:
    """``peaks`` with each dtype's peak raised to the rate of a variant that computed in that dtype
    and went faster (its products cannot outrun the dtype's peak: the measurement was slowed), and
    ``{dtype: variant}`` for each one raised."""
    peaks, raised = dict(peaks), {}
    for v, r in results.items():
        own = r.get("compute_dtype")
        if flops is None or own not in peaks:
            continue
        achieved = r["images_per_s"] * flops
        peaks[own], up = peak_at_least(peaks[own], achieved)
        if up:
            raised[own] = v
    return peaks, raised


def _count_model_flops(cfg: StepBenchConfig) -> float:
    """FLOPs per image of one step on the math path (used when the paper variant is not run)."""
    from mcf.models import create_model

    def build() -> torch.nn.Module:
        return create_model(cfg.model, teacher_checkpoint="random", img_size=cfg.img_size,
                            teacher_img_size=cfg.teacher_img_size or cfg.img_size)

    return step_flops(build, cfg.batch_size) / cfg.batch_size


def run(cfg: StepBenchConfig) -> dict[str, Any]:
    """Run the benchmark and return its JSON-ready result (see the module docstring)."""
    from mcf.models import get_spec

    device = resolve_device(cfg.device)
    peaks = measure_peaks(device)
    tmp = None
    folder = cfg.data
    if cfg.e2e and folder is None:
        from mcf.bench.feeds import make_jpeg_folder

        tmp = tempfile.TemporaryDirectory(prefix="mcf-bench-jpeg-")
        n = (cfg.warmup + cfg.repeats * cfg.steps + 2) * cfg.batch_size
        folder = str(make_jpeg_folder(tmp.name, n))
    try:
        flops = None if "paper" in cfg.variants else _count_model_flops(cfg)
        wanted = set(cfg.variants) | ({"mcf_compiled"} if cfg.compile else set())
        names = [v for v in VARIANTS if v in wanted]
        results: dict[str, Any] = {}
        if cfg.order == "interleaved":
            # Both built, then timed windows alternate: a shared machine's load falls on both alike.
            built = {}
            for v in names:
                log.info("bench %s: building and warming up the %s variant", "e2e" if cfg.e2e else "step", v)
                built[v] = _Variant(cfg, v, device, peaks, folder, count_flops_now=v == "paper")
                flops = built[v].flops_per_image if v == "paper" else flops
            for _ in range(cfg.repeats):
                for v in names:
                    built[v].window()
            for v in names:
                results[v] = built[v].result()
                built[v].close()
        else:
            for v in names:
                log.info("bench %s: %s variant", "e2e" if cfg.e2e else "step", v)
                var = _Variant(cfg, v, device, peaks, folder, count_flops_now=v == "paper")
                flops = var.flops_per_image if v == "paper" else flops
                for _ in range(cfg.repeats):
                    var.window()
                results[v] = var.result()
                var.close()
                del var
    finally:
        if tmp is not None:
            tmp.cleanup()
    peaks_start, peaks_end = peaks, measure_peaks(device)  # again at the end: a slow spell at the start
    peaks, raised = _final_peaks(best_peaks(peaks_start, peaks_end), results, flops)
    if flops is not None:
        for r in results.values():
            _set_mfu(r, flops, peaks)  # one model-FLOP count (the paper variant's) and one peak for all

    def speed(a: str, b: str) -> float | None:
        return results[a]["images_per_s"] / results[b]["images_per_s"] if a in results and b in results else None

    summary = ", ".join(f"{v} {r['images_per_s']:.1f}" for v, r in results.items())
    compiled = speed("mcf_compiled", "mcf")
    log.info("images/s: %s%s", summary, f" (compiled: {compiled:.2f}x eager)" if compiled else "")
    out: dict[str, Any] = {
        "benchmark": "e2e" if cfg.e2e else "step",
        "paper": results.get("paper"),
        "mcf": results.get("mcf"),
        "mcf_compiled": results.get("mcf_compiled"),
        "ratio": speed("mcf", "paper"),
        "ratio_compiled": speed("mcf_compiled", "paper"),
        "compile_speedup": speed("mcf_compiled", "mcf"),
        "device": device_name(device),
        "model": cfg.model,
        "img_size": get_spec(cfg.model, img_size=cfg.img_size).img_size,
        "batch_size": cfg.batch_size,
        "precision": {v: r["precision"] for v, r in results.items()},
        "peak_flops": peaks,
        "peak_flops_measured": {"start": peaks_start, "end": peaks_end},
        "peak_raised_to_achieved": raised,
        "peak_flops_reference": peak_flops(peaks),
        "mfu_reference": "the faster of the fp32/bf16 matmul peaks measured in this run (mfu_vs_<dtype>: against each)",
        "config": {k: v for k, v in asdict(cfg).items() if k != "out"},
        "data": folder if cfg.e2e and cfg.data else ("synthetic JPEGs (256², q90)" if cfg.e2e else None),
        **run_info(device),
    }
    return out


def main(cfg: StepBenchConfig) -> dict[str, Any]:
    result = run(cfg)
    emit(result, cfg.out)
    return result
