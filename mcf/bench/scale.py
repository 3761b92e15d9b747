"""``mcf bench scale``: bytes of model + optimizer state each rank holds under ZeRO 0/1/2/3, and
step time, with ``nproc`` ranks (gloo on the CPU, NCCL when there is a GPU per rank).

Each stage runs in its own ``torchrun`` (DeepSpeed cannot be initialised twice in one process);
the ranks run :mod:`mcf.bench.scale_worker`, which wraps ``model.online`` in a DeepSpeed engine and,
after a backward and after an optimizer step, sums the bytes of every distinct tensor storage that
the engine holds for the model: the module's parameters (their ZeRO-3 partitions), their
gradients, and every tensor reachable from the engine's optimizer (Adam moments, fp32 master
partitions, gradient partitions, flat buffers). Each storage is counted once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mcf.bench.common import REPO_ROOT, emit
from mcf.errors import UserError

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ScaleBenchConfig:
    model: str = "mcf_vit_tiny"
    img_size: int | None = None
    batch_size: int = 4
    """Per rank."""
    steps: int = 3
    """Timed steps (after one warm-up step)."""
    stages: tuple[int, ...] = (0, 1, 2, 3)
    precision: str = "fp32"
    nproc: int = 2
    timeout_s: int = 900
    out: str | None = None

    def __post_init__(self) -> None:
        if set(self.stages) - {0, 1, 2, 3}:
            raise ValueError("stages must be among 0,1,2,3")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError("precision must be fp32 or bf16")
        if self.nproc < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("nproc, steps and batch_size must be >= 1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(cfg: ScaleBenchConfig, stage: int, workdir: Path) -> dict[str, Any]:
    out = workdir / f"stage{stage}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "mcf.bench.scale_worker", "--stage", str(stage), "--model", cfg.model,
           "--batch-size", str(cfg.batch_size), "--steps", str(cfg.steps), "--precision", cfg.precision, "--out", str(out)]
    if cfg.img_size:
        cmd += ["--img-size", str(cfg.img_size)]
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    log.info("bench scale: ZeRO-%d, %d ranks", stage, cfg.nproc)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=cfg.timeout_s)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise UserError(f"bench scale: ZeRO-{stage} run failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


def run(cfg: ScaleBenchConfig) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mcf-bench-scale-") as tmp:
        for stage in cfg.stages:
            stages[str(stage)] = run_stage(cfg, stage, Path(tmp))
    first = next(iter(stages.values()))
    summary: dict[str, Any] = {}
    if "0" in stages:
        base = max(r["total_bytes"] for r in stages["0"]["ranks"])
        for s, res in stages.items():
            worst = max(r["total_bytes"] for r in res["ranks"])
            summary[s] = {"max_rank_bytes": worst, "over_zero0": worst / base, "over_zero0_per_rank": worst / (base / cfg.nproc),
                          "ms_per_step": res["ms_per_step"]}
    import torch

    from mcf.bench.common import run_info

    return {
        "benchmark": "scale",
        "stages": stages,
        "summary": summary,
        "target": "ZeRO-3 max per-rank bytes <= 1.1 x (ZeRO-0 bytes / ranks)",
        "target_met": (summary["3"]["over_zero0_per_rank"] <= 1.1) if "3" in summary else None,
        "device": first["device"],
        "backend": first["backend"],
        "model": cfg.model,
        "batch_size": cfg.batch_size,
        "precision": cfg.precision,
        "nproc": cfg.nproc,
        "params": first["params"],
        "config": {k: v for k, v in asdict(cfg).items() if k != "out"},
        **run_info(torch.device("cpu")),
    }


def main(cfg: ScaleBenchConfig) -> dict[str, Any]:
    result = run(cfg)
    emit(result, cfg.out)
    return result
