"""How far the EMA target of ``train.ema_source=bf16_params`` drifts from the exact one (fp32 masters).

``mcf bench ema-drift`` starts the ranks under torchrun (gloo on the CPU; ``--nproc``, default one: the drift
does not depend on the sharding) and prints their result as JSON::

    mcf bench ema-drift --steps 300 --out drift.json

(``python -m mcf.bench.ema_drift ...`` is the same command.) Its keys: ``mcf config --list --command
bench-ema-drift`` (:class:`~mcf.bench.config.EmaDriftConfig`).

One DeepSpeed engine trains the online model (the ``demo`` preset's ``mcf_vit_tiny`` at 32 px, bf16,
ZeRO-1, AdamW at a constant learning rate, synthetic batches); two :class:`~mcf.train.ema.TargetEMA`
follow it, the exact one on ``model.target`` and the ``bf16_params`` one on a copy, both updated after
every step with the same momentum. At the reported steps: the relative difference of the two targets'
fp32 weights (max over elements of ``|b − a| / max|a|`` per parameter, and ``Σ|b − a| / Σ|a|`` over all),
and the contrastive loss of the same batch, masks and online model with either target.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch

from mcf.bench.config import EmaDriftConfig
from mcf.errors import UserError


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """``max``: over parameters, ``max|b − a| / max|a|``; ``mean``: ``Σ|b − a| / Σ|a|`` over every element."""
    worst, diff, size = 0.0, 0.0, 0.0
    for n, x in a.items():
        d = (b[n] - x).abs()
        worst = max(worst, float(d.max() / x.abs().max().clamp_min(1e-30)))
        diff, size = diff + float(d.sum()), size + float(x.abs().sum())
    return {"max": worst, "mean": diff / size}


def _args(cfg: EmaDriftConfig) -> dict[str, Any]:
    """The config as the result's ``args`` (the flags' values, as the JSON has always recorded them)."""
    return {"steps": cfg.steps, "batch_size": cfg.batch_size, "momentum": cfg.momentum, "lr": cfg.lr,
            "zero": cfg.zero, "report": ",".join(map(str, cfg.report)), "out": cfg.out}


def worker(cfg: EmaDriftConfig) -> dict[str, Any] | None:
    """One rank of the measurement (under torchrun); the result on rank 0, None on the others."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    from mcf.config import build_config
    from mcf.models import create_model_from_config
    from mcf.train.ema import TargetEMA
    from mcf.train.engine import CastInput, build_ds_config
    from mcf.train.optim import build_optimizer, param_groups

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skips a 30-70 s JIT build
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    run_cfg = build_config("demo", [f"deepspeed.zero={cfg.zero}", "train.precision=bf16",
                                    f"train.batch_size={cfg.batch_size}"])
    torch.manual_seed(0)
    model = create_model_from_config(run_cfg)
    model.set_distributed(rank, world)
    model.perceptual.teacher.to(torch.bfloat16)
    opt = build_optimizer(param_groups(model.online, run_cfg.optim.weight_decay), run_cfg.optim, cfg.lr,
                          torch.device("cpu"))
    engine, *_ = deepspeed.initialize(model=model.online, optimizer=opt, config=build_ds_config(run_cfg, world),
                                      dist_init_required=False)
    for b in engine.module.buffers():
        if b.is_floating_point():
            b.data = b.data.to(torch.bfloat16)
    target_b = copy.deepcopy(model.target)
    exact = TargetEMA(model.target, engine, torch.bfloat16)
    approx = TargetEMA(target_b, engine, torch.bfloat16, source="bf16_params")
    target_a = model.target
    online = CastInput(engine, torch.bfloat16)
    g = torch.Generator().manual_seed(rank)
    img = model.spec.img_size
    batches = [torch.randn(cfg.batch_size, 3, img, img, generator=g) for _ in range(8)]
    probe = torch.randn(cfg.batch_size, 3, img, img, generator=g)
    report = set(cfg.report)
    rows: list[dict[str, Any]] = []
    for step in range(1, cfg.steps + 1):
        out = model(batches[step % len(batches)], online=online)
        engine.backward(out.loss)
        engine.step()
        exact.update(cfg.momentum)
        approx.update(cfg.momentum)
        if step not in report and step != cfg.steps:
            continue
        losses = []
        with torch.no_grad():
            for target in (target_a, target_b):  # the same masks, noise and online model, either target
                model.target = target
                torch.manual_seed(1234)
                losses.append(float(model(probe, online=online).losses["contrastive"]))
        model.target = target_a
        a, b = exact.full_fp32(), approx.full_fp32()
        row = {"step": step, "weights": relative_difference(a, b), "contrastive_exact": losses[0],
               "contrastive_bf16_params": losses[1],
               "contrastive_relative": abs(losses[1] - losses[0]) / abs(losses[0])}
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return None
    return {"benchmark": "ema_drift", "args": _args(cfg), "world": world, "rows": rows, "u_bf16": 2.0**-8}


def main(cfg: EmaDriftConfig) -> dict[str, Any]:
    """Run :func:`worker` on ``cfg.nproc`` ranks under torchrun (each row printed on stderr as it is measured);
    the result JSON printed (and written to ``cfg.out``)."""
    import subprocess
    import tempfile
    from pathlib import Path

    from mcf.bench.common import emit
    from mcf.bench.scale import failure_text, torchrun_command, worker_env
    from mcf.configtree import to_dict

    with tempfile.TemporaryDirectory(prefix="mcf-bench-ema-drift-") as tmp:
        config, result, logs = Path(tmp) / "config.json", Path(tmp) / "result.json", Path(tmp) / "logs"
        config.write_text(json.dumps(to_dict(cfg)))
        # the ranks' stdout (a JSON line per reported step) on the console too (--tee 1), onto this process's file
        # descriptor 2 (stderr): stdout carries the result only
        cmd = [*torchrun_command(cfg.nproc, logs), "--tee", "1", "-m", "mcf.bench.ema_drift", "--worker", str(config),
               "--result", str(result)]
        try:
            proc = subprocess.run(cmd, env=worker_env(), stdout=2, stderr=subprocess.PIPE,
                                  text=True, timeout=cfg.timeout_s)
        except subprocess.TimeoutExpired:
            raise UserError(f"bench ema-drift: the ranks took more than timeout_s={cfg.timeout_s} s") from None
        if proc.returncode != 0 or not result.exists():
            raise UserError(f"bench ema-drift: the run failed (exit {proc.returncode}):\n{failure_text(proc, logs)}")
        out = json.loads(result.read_text())
    emit(out, cfg.out)
    return out


def _worker_main(argv: list[str]) -> int:
    """``--worker CONFIG --result OUT``: a rank run by :func:`main`'s torchrun (CONFIG: the resolved config, JSON)."""
    import argparse

    from mcf.configtree import resolve

    ap = argparse.ArgumentParser(prog="python -m mcf.bench.ema_drift --worker")
    ap.add_argument("--worker", required=True)
    ap.add_argument("--result", required=True)
    args = ap.parse_args(argv)
    with open(args.worker) as f:
        cfg = resolve(EmaDriftConfig, json.load(f))
    result = worker(cfg)
    if result is not None:
        with open(args.result, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    import sys

    if "--worker" in sys.argv[1:]:
        raise SystemExit(_worker_main(sys.argv[1:]))
    if "TORCHELASTIC_RUN_ID" in os.environ:  # the former `torchrun -m mcf.bench.ema_drift`: every rank would launch
        print("mcf bench: error: run `mcf bench ema-drift --nproc N` (or `python -m mcf.bench.ema_drift`) without "
              "torchrun: it starts the ranks itself", file=sys.stderr)
        raise SystemExit(2)
    # the former entry point: the same process becomes `python -m mcf.bench ema-drift` (an exec, not an import:
    # the command line sits above this module)
    os.execv(sys.executable, [sys.executable, "-m", "mcf.bench", "ema-drift", *sys.argv[1:]])
