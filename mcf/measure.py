"""Measuring the device: which device, synchronised timing, the peak matmul rate, peak memory.

Shared by training (:mod:`mcf.train.perf`: MFU and peak memory in every metrics record) and the
benchmarks (:mod:`mcf.bench`); imports nothing from mcf, so both can stand on it.
"""

from __future__ import annotations

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


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int | None = None) -> float:
    """Measured FLOP/s of an ``n × n × n`` matrix product in ``dtype`` (median of ``repeats``).

    Random operands (never zeros: they can run faster than real data). Defaults: n=8192 and 20
    repeats on a GPU, n=2048 and 3 repeats on the CPU.
    """
    n = n or (8192 if device.type == "cuda" else 2048)
    repeats = repeats or (20 if device.type == "cuda" else 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: handle creation, kernel selection
    if device.type == "cuda":
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        times = time_repeats(lambda: torch.mm(a, b), device, repeats)
    return 2.0 * n**3 / statistics.median(times)


def measure_peaks(device: torch.device) -> dict[str, float]:
    """Peak matmul FLOP/s by dtype: bf16 on a GPU; fp32 and bf16 on the CPU.

    On a CPU without native bf16 (no AVX512-BF16/AMX) a bf16 product is emulated and can be 50×
    slower than fp32: both are probed at n=512 first and a dtype more than 4× slower than the other
    is not timed at full size (its n=512 rate is reported, under ``<dtype>_n``).
    """
    if device.type == "cuda":
        return {"bf16": matmul_peak(device, torch.bfloat16)}
    probe = {"fp32": matmul_peak(device, torch.float32, 512, 2), "bf16": matmul_peak(device, torch.bfloat16, 512, 1)}
    best = max(probe.values())
    peaks: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if probe[name] * 4 < best:
            peaks[name], peaks[f"{name}_n"] = probe[name], 512
        else:
            peaks[name], peaks[f"{name}_n"] = matmul_peak(device, dtype), 2048
    return peaks


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
