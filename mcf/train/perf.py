"""The run's speed in model FLOPs and its memory: what every metrics record carries.

- ``flops_per_image``: model FLOPs of one training step per image (the online forward and backward,
  the EMA target's forward, the teacher's two passes and the backward through the rebuilt one),
  counted once at start on the meta device (``mcf.models.flops.step_flops``; activation
  checkpointing's recomputation is not counted: it is not model work).
- ``tflops``: achieved by the whole job, ``flops_per_image × images_per_s / 1e12``;
  ``tflops_per_device`` divides by the ranks.
- ``mfu``: ``tflops_per_device`` over the device's peak: the dense bf16 peak of a known GPU
  (:data:`GPU_BF16_PEAK_TFLOPS`), else a matmul measured at start by ``mcf bench step``'s method
  (``mcf.measure.matmul_peak``: a fixed size per dtype, warm-up, the best of rounds of median products; bf16 on
  a GPU, the training dtype on a CPU). A peak below the achieved rate is raised to it (logged once).
- ``flops_per_image`` and the peak (``peak_tflops``) are constants of the run: :meth:`Throughput.params`
  (MLflow params, logged once); the others come with every metrics record (:meth:`Throughput.fields`),
  and ``peak_tflops`` too once the peak was raised (it then differs from the param).
- ``peak_memory_gb``: rank 0's peak: the CUDA allocator's ``max_memory_allocated``, on a CPU the
  process's resident-set high-water mark.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import torch

from mcf.measure import PEAK_ROUNDS, PeakMemory, matmul_peak, peak_at_least, peak_size
from mcf.models import create_model_from_config
from mcf.models.flops import step_flops

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets; the first
# pattern found in the lower-cased ``torch.cuda.get_device_name`` wins, so variants come first.
GPU_BF16_PEAK_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"gh200", "GH200", 989.4),
    (r"h200 nvl", "H200 NVL", 835.5),
    (r"h200", "H200 SXM", 989.4),
    (r"h100 nvl", "H100 NVL", 835.5),
    (r"h100 pcie", "H100 PCIe", 756.5),
    (r"h100|h800", "H100 SXM", 989.4),
    (r"a100|a800", "A100", 312.0),
    (r"l40s", "L40S", 362.05),
    (r"l40\b", "L40", 181.05),
    (r"\bl4\b", "L4", 121.0),
    (r"\ba10\b", "A10", 125.0),
    (r"rtx 4090", "RTX 4090", 165.2),
    (r"gb200", "GB200", 2500.0),
    (r"b200", "B200", 2250.0),
    (r"mi300x", "MI300X", 1307.4),
)


def known_gpu_peak(name: str) -> tuple[str, float] | None:
    """(card, dense bf16 TFLOP/s) of a known GPU name (``torch.cuda.get_device_name``), else None."""
    low = name.lower()
    for pattern, card, tflops in GPU_BF16_PEAK_TFLOPS:
        if re.search(pattern, low):
            return card, tflops
    return None


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) of ``device``: the table for a known GPU, else measured."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = known_gpu_peak(name)
        if known:
            return known[1] * 1e12, f"datasheet dense bf16 peak of the {known[0]} ({name})"
        n = peak_size(device, torch.bfloat16)
        return matmul_peak(device, torch.bfloat16), f"measured bf16 {n}^3 matmul on {name} (not in the table)"
    n = peak_size(device, dtype)
    rounds = PEAK_ROUNDS["cpu"]
    return matmul_peak(device, dtype), (f"measured {str(dtype).replace('torch.', '')} {n}^3 matmul on the CPU "
                                        f"(best of {rounds} rounds' median products)")


def peak_memory_bytes(device: torch.device) -> int:
    """The peak so far: CUDA ``max_memory_allocated``; on a CPU the resident-set high-water mark."""
    return PeakMemory(device).peak_bytes()


def flops_per_image(cfg: Any, batch: int = 2) -> float:
    """Model FLOPs per image of one training step of the model ``cfg`` describes (see the module doc).

    Per-image mask ratios (``masking.ratio_range``) are counted at the smallest ratio, the largest
    visible set, which the padded encoder computes on."""
    meta = copy.deepcopy(cfg)
    meta.teacher.checkpoint = "random"  # nothing is loaded onto the meta device
    meta.model.init_from = None
    if meta.masking.ratio_range is not None:
        meta.masking.ratio, meta.masking.ratio_range = meta.masking.ratio_range[0], None
    quiet = logging.getLogger("mcf.models.registry")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the meta copy's "random teacher" warning is not about this run
    try:
        return step_flops(lambda: create_model_from_config(meta), batch) / batch
    finally:
        quiet.setLevel(level)


class Throughput:
    """FLOPs per image and the device's peak, found once; :meth:`fields` for each metrics record."""

    def __init__(self, cfg: Any, device: torch.device, dtype: torch.dtype, world_size: int):
        self.device, self.world_size = device, world_size
        try:
            self.flops_per_image: float | None = flops_per_image(cfg)
        except Exception as e:  # noqa: BLE001 - a model the meta device cannot run must not stop the training
            log.warning("model FLOPs not counted (%s: %s): the logs carry no TFLOP/s or MFU", type(e).__name__, e)
            self.flops_per_image = None
        self.peak_flops, self.peak_source = device_peak_flops(device, dtype)
        self.peak_raised = False
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the matmul probe's buffers are not the run's
        if self.flops_per_image is not None:
            log.info(
                "%.2f GFLOP per image per step (model FLOPs); MFU against %.1f TFLOP/s per device (%s)",
                self.flops_per_image / 1e9,
                self.peak_flops / 1e12,
                self.peak_source,
            )

    def params(self) -> dict[str, float | str]:
        """The run's constants, logged once (MLflow params), not with every record."""
        out: dict[str, float | str] = {"peak_tflops": self.peak_flops / 1e12, "peak_source": self.peak_source}
        if self.flops_per_image is not None:
            out["flops_per_image"] = self.flops_per_image
        return out

    def fields(self, images_per_s: float) -> dict[str, float]:
        out = {"peak_memory_gb": peak_memory_bytes(self.device) / 1e9}
        if self.flops_per_image is None:
            return out
        tflops = self.flops_per_image * images_per_s / 1e12
        per_device = tflops / self.world_size
        peak, raised = peak_at_least(self.peak_flops, per_device * 1e12)
        if raised:
            log.warning("achieved %.3f TFLOP/s per device is above the measured peak %.3f (%s): MFU is now "
                        "reported against the achieved rate", per_device, self.peak_flops / 1e12, self.peak_source)
            self.peak_flops, self.peak_source = peak, f"raised to an achieved rate (was: {self.peak_source})"
            self.peak_raised = True
        fields = {"tflops": tflops, "tflops_per_device": per_device, "mfu": per_device * 1e12 / self.peak_flops, **out}
        if self.peak_raised:  # no longer the peak logged as a param at start
            fields["peak_tflops"] = self.peak_flops / 1e12
        return fields
