"""Measuring the device: which device, synchronised timing, the peak matmul rate, peak memory.

Shared by training (:mod:`mcf.train.perf`: MFU and peak memory in every metrics record) and the
benchmarks (:mod:`mcf.bench`), and the CPU's class (:func:`cpu_isa`) by the attention table of
:mod:`mcf.kernels.dispatch`; imports nothing from mcf, so all can stand on it.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def time_repeats(run: Callable[[], None], device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run``, synchronising only around each call."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


# ``ONEDNN_MAX_CPU_ISA`` values (oneDNN's names) that leave out the native bf16 dot products.
_ONEDNN_NO_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@functools.cache
def cpu_isa() -> str:
    """The CPU's class for the kernels mcf runs: ``amx_bf16`` | ``avx512_bf16`` (native bf16 dot
    products) | ``avx512`` | ``avx2`` | ``default``, capped by what torch was told to use
    (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``: ``=AVX2`` and ``=default`` emulate an older host)."""
    flags = _cpu_flags()
    if "amx_bf16" in flags and "avx512_bf16" in flags:
        isa = "amx_bf16"
    elif "avx512_bf16" in flags:
        isa = "avx512_bf16"
    elif "avx512f" in flags:
        isa = "avx512"
    elif "avx2" in flags:
        isa = "avx2"
    else:
        isa = "default"
    order = ("default", "avx2", "avx512", "avx512_bf16", "amx_bf16")
    aten = torch.backends.cpu.get_cpu_capability().lower()  # "default" | "avx2" | "avx512" | ...
    cap = aten if aten in ("default", "avx2") else "amx_bf16"  # ATen's own vectorised kernels (SDPA's among them)
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()  # oneDNN's: the matrix products
    if onednn in _ONEDNN_NO_BF16:
        cap = min(cap, "avx512" if onednn.startswith("AVX512") else "avx2", key=order.index)
    return min(isa, cap, key=order.index)


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` multiplies bf16 natively (every CUDA device mcf supports; a CPU with AVX512-BF16/AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_isa() in ("avx512_bf16", "amx_bf16")


# Matrix side of the peak's n×n×n product, fixed per device type and dtype so that the figure does
# not move with a size chosen at run time; bf16 on a CPU without native bf16 (emulated, ~30× slower
# than fp32) is timed at 512 and labelled as such (``bf16_n``).
PEAK_N = {("cuda", "bf16"): 8192, ("cuda", "fp32"): 8192, ("cpu", "bf16"): 2048, ("cpu", "fp32"): 2048}
PEAK_N_EMULATED = 512
PEAK_WARMUP = {"cuda": 3, "cpu": 2}
PEAK_REPEATS = {"cuda": 20, "cpu": 3}  # products per round; a round's rate is their median
PEAK_ROUNDS = {"cuda": 1, "cpu": 3}  # the peak is the best round's rate
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def peak_size(device: torch.device, dtype: torch.dtype) -> int:
    """The fixed matrix side of :func:`matmul_peak` for ``device`` and ``dtype``."""
    if device.type == "cpu" and dtype == torch.bfloat16 and not native_bf16(device):
        return PEAK_N_EMULATED
    return PEAK_N.get((device.type, _DTYPE_NAMES.get(dtype, "fp32")), 2048)


def _product_times(a: torch.Tensor, b: torch.Tensor, device: torch.device, repeats: int) -> list[float]:
    if device.type != "cuda":
        return time_repeats(lambda: torch.mm(a, b), device, repeats)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def matmul_peaks(device: torch.device, dtypes: tuple[torch.dtype, ...], n: int | None = None,
                 repeats: int | None = None, rounds: int | None = None) -> dict[torch.dtype, float]:
    """Measured FLOP/s of an ``n × n × n`` matrix product in each of ``dtypes``: after warm-up
    products (handle creation, kernel selection, caches, CPU frequency ramp), ``rounds`` rounds of
    ``repeats`` products, the dtypes taking turns round by round; a round's rate is its median
    product, the peak the best round's.

    A shared host only ever slows a product down, and its slow spells outlast a round: on the 2-core
    CI host one median of 7 consecutive products fell to half the usual rate in 2 of 24 measurements.
    Rounds spread over the whole measurement (the other dtype's rounds between them) give the peak
    several chances to miss such a spell; the median inside a round drops single slow products.

    Random operands (never zeros: they can run faster than real data). Defaults (the one method of
    ``mcf bench step`` and the trainer's MFU): n from :data:`PEAK_N` (:func:`peak_size`), repeats
    from :data:`PEAK_REPEATS`, rounds from :data:`PEAK_ROUNDS`.
    """
    repeats = repeats or PEAK_REPEATS.get(device.type, 3)
    rounds = rounds or PEAK_ROUNDS.get(device.type, 3)
    operands = {}
    for dtype in dtypes:
        side = n or peak_size(device, dtype)
        a = torch.randn(side, side, device=device, dtype=dtype)
        b = torch.randn(side, side, device=device, dtype=dtype)
        for _ in range(PEAK_WARMUP.get(device.type, 2)):
            torch.mm(a, b)
        operands[dtype] = (a, b, 2.0 * side**3)
    rates: dict[torch.dtype, list[float]] = {dtype: [] for dtype in dtypes}
    for _ in range(rounds):
        for dtype, (a, b, flops) in operands.items():
            rates[dtype].append(flops / statistics.median(_product_times(a, b, device, repeats)))
    return {dtype: max(r) for dtype, r in rates.items()}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int | None = None,
                rounds: int | None = None) -> float:
    """:func:`matmul_peaks` of one dtype."""
    return matmul_peaks(device, (dtype,), n, repeats, rounds)[dtype]


def measure_peaks(device: torch.device) -> dict[str, float]:
    """Peak matmul FLOP/s by dtype (:func:`matmul_peaks`): bf16 on a GPU; fp32 and bf16 on the CPU,
    each at its fixed size (``<dtype>_n``; bf16 at 512 where the CPU has no native bf16)."""
    dtypes = (torch.bfloat16,) if device.type == "cuda" else (torch.float32, torch.bfloat16)
    measured = matmul_peaks(device, dtypes)
    peaks: dict[str, float] = {}
    for dtype in dtypes:
        name = _DTYPE_NAMES[dtype]
        peaks[name], peaks[f"{name}_n"] = measured[dtype], peak_size(device, dtype)
    return peaks


def best_peaks(*measurements: dict[str, float]) -> dict[str, float]:
    """Per dtype, the best of several :func:`measure_peaks` results (taken at different times of one run)."""
    out = dict(measurements[0])
    for m in measurements[1:]:
        for k, v in m.items():
            out[k] = v if k.endswith("_n") else max(out.get(k, 0.0), v)
    return out


def peak_at_least(peak: float, achieved: float) -> tuple[float, bool]:
    """``(max(peak, achieved), raised)``: a measured peak below an achieved rate is wrong (the host
    was busier while the peak was measured); the achieved rate is then the best known peak."""
    return (achieved, True) if achieved > peak else (peak, False)


def fast_dtype(peaks: dict[str, float]) -> str:
    """The dtype with the higher measured matmul rate (``bf16`` on GPUs and AVX512-BF16/AMX CPUs)."""
    return "bf16" if peaks.get("bf16", 0.0) >= peaks.get("fp32", 0.0) else "fp32"


def peak_flops(peaks: dict[str, float]) -> float:
    """The device's measured peak: the faster of the measured dtypes."""
    return max(v for k, v in peaks.items() if not k.endswith("_n"))


class PeakMemory:
    """Peak memory of a region: the CUDA allocator's high-water mark on a GPU, the process's
    resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.source = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_rss_high_water_mark"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.source = "cpu_rss_high_water_mark_since_process_start"

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
