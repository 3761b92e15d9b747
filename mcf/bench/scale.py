"""``mcf bench scale``: per ZeRO stage 0/1/2/3 with ``nproc`` ranks (gloo on the CPU, NCCL when there
is a GPU per rank), what each rank holds and what it communicates per step.

Each stage runs in its own ``torchrun`` (DeepSpeed cannot be initialised twice in one process);
the ranks run :mod:`mcf.bench.scale_worker`, in two phases:

- ``memory``: ``model.online`` in a DeepSpeed engine with small buckets, the EMA target beside it;
  after a backward and after an optimizer step, the bytes of every distinct tensor storage the
  engine holds for the model (parameters or their ZeRO-3 partitions, gradients, everything
  reachable from the optimizer: Adam moments, fp32 masters, gradient partitions, flat buffers)
  and the EMA's own tensors, each storage counted once; and the step time.
- ``comm``: the real trainer (``mcf pretrain``'s ``Trainer``, the stage's default DeepSpeed JSON,
  synthetic batches) with every ``torch.distributed`` collective counted (:mod:`mcf.bench.comm`),
  per step, by operation and dtype and by caller (the EMA, the contrastive keys, the rest), beside
  the minimum the stage needs (``scale_worker.minimum_comm``) and the ratio.
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mcf.bench.common import REPO_ROOT, emit
from mcf.bench.config import ScaleBenchConfig
from mcf.bench.projection import project, table
from mcf.errors import UserError

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, log_dir: Path) -> list[str]:
    """``torchrun`` on this host with ``nproc`` ranks, up to the script: a free port, and each rank's own output in
    files under ``log_dir`` (``--redirects 3``), for the error when a rank fails (torchrun's summary omits it)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port()), "--log-dir", str(log_dir), "--redirects", "3"]


def worker_env() -> dict[str, str]:
    """The ranks' environment: this checkout importable, JIT-built DeepSpeed ops cached in it."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def option_overrides(option: str, stage: int, precision: str, workdir: Path) -> list[str]:
    """The trainer's config overrides of an option (:attr:`ScaleBenchConfig.options`)."""
    option, _, ema = option.partition("+")
    path, dtype = option.split("-")
    out = [f"deepspeed.reduce_dtype={dtype}"] + (["train.ema_source=bf16_params"] if ema else [])
    if stage in (1, 2):  # the path set explicitly (mcf's default picks it by rank count)
        from mcf.train.engine import default_ds_config_path, load_ds_json

        default = default_ds_config_path(stage, precision)
        ds = load_ds_json(str(default)) if default.is_file() else {}
        ds.setdefault("zero_optimization", {})["use_multi_rank_bucket_allreduce"] = path == "allreduce"
        json_path = workdir / f"ds_zero{stage}_{option}.json"
        json_path.write_text(json.dumps(ds))
        out.append(f"deepspeed.config={json_path}")
    return out


def run_stage(cfg: ScaleBenchConfig, stage: int, workdir: Path, option: str = "reduce-fp32",
              phases: tuple[str, ...] | None = None) -> dict[str, Any]:
    out = workdir / f"stage{stage}_{option}.json"
    phases = phases or cfg.phases
    overrides = (*cfg.overrides, *option_overrides(option, stage, cfg.precision, workdir))
    cmd = [
        *torchrun_command(cfg.nproc, workdir / f"logs_stage{stage}_{option}"),
        "-m",
        "mcf.bench.scale_worker",
        "--stage",
        str(stage),
        "--model",
        cfg.model,
        "--batch-size",
        str(cfg.batch_size),
        "--steps",
        str(cfg.steps),
        "--precision",
        cfg.precision,
        "--out",
        str(out),
        "--phases",
        ",".join(phases),
        *(a for o in overrides for a in ("--set", o)),
    ]
    if cfg.img_size:
        cmd += ["--img-size", str(cfg.img_size)]
    env = worker_env()
    log.info("bench scale: ZeRO-%d, %d ranks", stage, cfg.nproc)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=cfg.timeout_s)
    if proc.returncode != 0 or not out.exists():
        raise UserError(f"bench scale: ZeRO-{stage} run failed (exit {proc.returncode}):\n"
                        f"{failure_text(proc, workdir / f'logs_stage{stage}_{option}')}")
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - t0
    if "comm" in result:
        result["comm"]["option"] = option
    return result


def failure_text(proc: subprocess.CompletedProcess, log_dir: Path, lines: int = 12) -> str:
    """The last ``lines`` of each rank's own stderr (torchrun ``--redirects 3`` writes them under ``log_dir``), then
    the launcher's: its summary names the rank and signal, the rank's lines say why."""
    parts = []
    for err in sorted(log_dir.glob("*/attempt_*/*/stderr.log")):
        text = err.read_text(errors="replace").strip()
        if text:
            parts.append(f"[rank {err.parent.name}] " + "\n".join(text.splitlines()[-lines:]))
    launcher = (proc.stdout or "") + (proc.stderr or "")  # either may have gone to the console (None)
    parts.append("[torchrun] " + "\n".join(launcher.strip().splitlines()[-lines:]))
    return "\n".join(parts)


def run(cfg: ScaleBenchConfig) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mcf-bench-scale-") as tmp:
        for stage in cfg.stages:
            options = [o for o in cfg.options if stage in (1, 2) or not o.startswith("allreduce") and "+ema" not in o]
            for i, option in enumerate(options):  # the first runs every phase, the others the comm phase
                key = str(stage) if i == 0 else f"{stage}:{option}"
                stages[key] = run_stage(cfg, stage, Path(tmp), option, None if i == 0 else ("comm",))
    first = next(iter(stages.values()))
    summary: dict[str, Any] = {}
    if "0" in stages and "memory" in cfg.phases:
        base = max(r["total_bytes"] for r in stages["0"]["ranks"])
        for s, res in stages.items():
            worst = max(r["total_bytes"] for r in res["ranks"])
            summary[s] = {
                "max_rank_bytes": worst,
                "over_zero0": worst / base,
                "over_zero0_per_rank": worst / (base / cfg.nproc),
                "ms_per_step": res["ms_per_step"],
            }
    import torch

    from mcf.bench.common import run_info

    comm = {s: comm_summary(int(s.split(":")[0]), res["comm"]) for s, res in stages.items() if "comm" in res}
    projection = projection_rows(cfg, stages) if cfg.project else []
    if projection:
        log.info("projection (%s):\n%s", cfg.network, table(projection))
    if comm:
        log.info("collectives per step (%s, %d ranks, %s):\n%s", cfg.model, cfg.nproc, cfg.precision, comm_table(comm))
    return {
        "benchmark": "scale",
        "stages": stages,
        "summary": summary,
        "target": "ZeRO-3 max per-rank bytes <= 1.1 x (ZeRO-0 bytes / ranks)",
        "target_met": (summary["3"]["over_zero0_per_rank"] <= 1.1) if "3" in summary else None,
        "comm": comm,
        "comm_goals": COMM_GOALS,
        "comm_table": comm_table(comm) if comm else None,
        "projection": projection,
        "projection_table": table(projection) if projection else None,
        "recommended": recommend(projection) if projection else None,
        "device": first["device"],
        "backend": first["backend"],
        "model": cfg.model,
        "batch_size": cfg.batch_size,
        "precision": cfg.precision,
        "nproc": cfg.nproc,
        "params": first.get("params", first.get("comm", {}).get("trainable_params")),
        "config": {k: v for k, v in asdict(cfg).items() if k != "out"},
        **run_info(torch.device("cpu")),
    }


COMM_GOALS = (
    "ZeRO-1/2: <= 6 collectives per step besides the gradient reduction's buckets (keys, flags, overflow, one "
    "parameter all-gather per optimizer group, the EMA); ZeRO-3: the EMA adds <= 1; bytes <= 1.25 x the minimum"
)


def comm_summary(stage: int, c: dict[str, Any]) -> dict[str, Any]:
    """One stage's collectives per step against the minimum and the goals (:data:`COMM_GOALS`)."""
    per, ema = c["per_step"], c["ema"]
    grads = c.get("grads", {"count": 0.0})["count"]
    goal_count = ema["count"] <= 1 if stage == 3 else per["collectives"] - grads <= 6 if stage in (1, 2) else True
    return {
        "collectives": per["collectives"],
        "gradient_collectives": grads,
        "grads_overlap_share": c.get("grads", {}).get("overlap_share"),
        "bytes": per["bytes"],
        "ema_collectives": ema["count"],
        "ema_bytes": ema["bytes"],
        "minimum_collectives": c["minimum"]["collectives"],
        "minimum_bytes": c["minimum"]["bytes"],
        "bytes_over_minimum": c["bytes_over_minimum"],
        "target_weights_bytes": c["minimum"].get("target_weights_bytes", 0),
        "bytes_over_minimum_with_target": c.get("bytes_over_minimum_with_target"),
        "by_op": per["by_op"],
        "reduce_dtype": c["reduce_dtype"],
        "steady": per["steady"],
        "collectives_goal_met": goal_count,
        "bytes_goal_met": c["bytes_over_minimum"] <= 1.25,
    }


def comm_table(comm: dict[str, dict[str, Any]]) -> str:
    """Markdown: per stage, collectives and MB per step, of which the EMA, the minimum and the ratio, by op/dtype."""
    rows = [
        "| ZeRO | collectives / step | of which the EMA | MB / step | minimum (collectives, MB) | bytes / minimum "
        "| bytes / (minimum + target weights) | by op/dtype (count, MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s, c in comm.items():
        ops = "; ".join(f"{k} {v['count']:g} x, {v['bytes'] / 1e6:.3f}" for k, v in c["by_op"].items())
        rows.append(
            f"| {s} | {c['collectives']:g} | {c['ema_collectives']:g} ({c['ema_bytes'] / 1e6:.3f} MB) | "
            f"{c['bytes'] / 1e6:.3f} | "
            f"{c['minimum_collectives']}, {c['minimum_bytes'] / 1e6:.3f} | {c['bytes_over_minimum']:.2f} | "
            f"{c['bytes_over_minimum_with_target'] or 0:.2f} | {ops} |"
        )
    return "\n".join(rows)


def main(cfg: ScaleBenchConfig) -> dict[str, Any]:
    result = run(cfg)
    emit(result, cfg.out)
    return result


def projection_rows(cfg: ScaleBenchConfig, stages: dict[str, Any]) -> list[dict[str, Any]]:
    """Every counted (stage, option) projected to every model of ``cfg.project`` at every GPU count."""
    rows = []
    for model in cfg.project:
        for gpus in cfg.gpus:
            for key, res in stages.items():
                if "comm" in res:
                    rows.append(project(res["comm"], int(key.split(":")[0]), model, gpus, cfg.network, cfg.compute))
    return rows


def recommend(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model and GPU count, the projected configuration with the highest efficiency (ties: the lower
    ZeRO stage, which holds more but communicates less)."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        key = f"{r['model']}@{r['gpus']}"
        if key not in best or (r["efficiency"], -r["zero"]) > (best[key]["efficiency"], -best[key]["zero"]):
            best[key] = r
    return {k: {f: v[f] for f in ("zero", "option", "efficiency", "step_ms", "bytes_over_minimum")}
            for k, v in best.items()}
