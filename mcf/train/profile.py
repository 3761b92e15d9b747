"""One trainer step under ``torch.profiler`` (``logging.profile_step``): where does the step's time go?

The model and the trainer mark their phases with ``torch.profiler.record_function`` ranges of stable
names (:data:`RANGES`; a few µs each when no profiler runs). :class:`StepProfiler` profiles one
optimizer step on rank 0 and writes ``OUTPUT/profile_step_N.json``: the step's wall time and, per
range, its host time and share of the wall time and, on a GPU, its device time (the kernels
launched inside it) and share of all kernel time in the step. ``mcf.sync`` is the host waiting on
the step's one all-reduce; on a GPU its host time is the time the host sat idle ahead of the device.
The backward of the online model (through the teacher and decoder) is in ``mcf.backward``, not in
``mcf.teacher``, which holds the teacher's forward passes only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

RANGES = ("mcf.data", "mcf.online", "mcf.target", "mcf.teacher", "mcf.backward", "mcf.optimizer", "mcf.ema", "mcf.sync")
TOP_OPS = 15


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_us(event: Any, attr: str) -> float:
    """Device µs of a profiler event (``device_*`` in torch ≥ 2.4, ``cuda_*`` before)."""
    return float(getattr(event, f"device_{attr}", getattr(event, f"cuda_{attr}", 0.0)) or 0.0)


def summarize(prof: Any, wall_s: float, step: int, device: torch.device) -> dict[str, Any]:
    """The JSON-ready summary of one profiled step (see the module docstring)."""
    averages = prof.key_averages()
    by_name = {e.key: e for e in averages}
    device_total_us = sum(_device_us(e, "self_time_total") for e in averages)
    ranges = {}
    for name in RANGES:
        e = by_name.get(name)
        cpu_us = float(e.cpu_time_total) if e is not None else 0.0
        dev_us = _device_us(e, "time_total") if e is not None else 0.0
        ranges[name] = {
            "count": int(e.count) if e is not None else 0,
            "host_ms": cpu_us / 1e3,
            "host_share": cpu_us / 1e6 / wall_s,
            "device_ms": dev_us / 1e3,
            "device_share": dev_us / device_total_us if device_total_us else None,
        }
    ops = [e for e in averages if not e.key.startswith("mcf.") and not e.key.startswith("ProfilerStep")]
    key = (lambda e: _device_us(e, "self_time_total")) if device_total_us else (lambda e: float(e.self_cpu_time_total))
    top = [
        {
            "op": e.key,
            "count": int(e.count),
            "self_host_ms": float(e.self_cpu_time_total) / 1e3,
            "self_device_ms": _device_us(e, "self_time_total") / 1e3,
        }
        for e in sorted(ops, key=key, reverse=True)[:TOP_OPS]
    ]
    return {
        "step": step, "device": str(device), "wall_ms": wall_s * 1e3, "device_ms": device_total_us / 1e3,
        "ranges": ranges, "top_ops": top,
    }


class StepProfiler:
    """Profiles optimizer step ``step`` (1-based, as logged) on rank 0; a no-op otherwise.

    The trainer calls :meth:`begin` before the step's first micro-batch and :meth:`end` after its EMA
    update. A profiler that cannot start or finish (e.g. no CUPTI) logs why and leaves the run alone.
    """

    def __init__(self, step: int, out: Path, rank: int, device: torch.device):
        self.step, self.out, self.device = step, out, device
        self.enabled = step > 0 and rank == 0
        self.prof: Any = None
        self.t0 = 0.0

    def begin(self, step: int) -> None:
        if not self.enabled or step != self.step:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        else:
            # kineto of a CUDA build asks for GPUs even for a CPU-only profile and prints
            # "ERROR ... gpuGetDeviceCount failed" without one: nothing is wrong, so its log is off (6 = none)
            os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        try:
            _synchronize(self.device)  # the window starts with an idle device
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
        except Exception as e:  # noqa: BLE001 - a profiler failure must not stop training
            log.warning("logging.profile_step=%d: the profiler did not start (%s); no profile written", self.step, e)
            self.prof = None
        self.t0 = time.perf_counter()

    def end(self, step: int) -> Path | None:
        if self.prof is None or step != self.step:
            return None
        prof, self.prof = self.prof, None
        try:
            _synchronize(self.device)
            wall = time.perf_counter() - self.t0
            prof.__exit__(None, None, None)
            summary = summarize(prof, wall, step, self.device)
        except Exception as e:  # noqa: BLE001
            log.warning("logging.profile_step=%d: the profile could not be read (%s); none written", self.step, e)
            return None
        path = self.out / f"profile_step_{step}.json"
        path.write_text(json.dumps(summary, indent=1) + "\n")
        shares = ", ".join(f"{k[4:]} {v['host_share']:.0%}" for k, v in summary["ranges"].items())
        log.info("profile of step %d (%.1f ms wall) → %s; host shares: %s", step, summary["wall_ms"], path, shares)
        return path
