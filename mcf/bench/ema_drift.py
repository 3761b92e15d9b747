"""How far the EMA target of ``train.ema_source=bf16_params`` drifts from the exact one (fp32 masters).

Run under torchrun (gloo on the CPU; one rank is enough: the drift does not depend on the sharding)::

    torchrun --nproc_per_node 1 -m mcf.bench.ema_drift --steps 300 --out drift.json

One DeepSpeed engine trains the online model (the ``demo`` preset's ``mcf_vit_tiny`` at 32 px, bf16,
ZeRO-1, AdamW at a constant learning rate, synthetic batches); two :class:`~mcf.train.ema.TargetEMA`
follow it, the exact one on ``model.target`` and the ``bf16_params`` one on a copy, both updated after
every step with the same momentum. At the reported steps: the relative difference of the two targets'
fp32 weights (max over elements of ``|b − a| / max|a|`` per parameter, and ``Σ|b − a| / Σ|a|`` over all),
and the contrastive loss of the same batch, masks and online model with either target.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from typing import Any

import torch


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """``max``: over parameters, ``max|b − a| / max|a|``; ``mean``: ``Σ|b − a| / Σ|a|`` over every element."""
    worst, diff, size = 0.0, 0.0, 0.0
    for n, x in a.items():
        d = (b[n] - x).abs()
        worst = max(worst, float(d.max() / x.abs().max().clamp_min(1e-30)))
        diff, size = diff + float(d.sum()), size + float(x.abs().sum())
    return {"max": worst, "mean": diff / size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--momentum", type=float, default=0.99, help="EMA momentum (mcf's default, the paper's)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, constant (the demo preset's peak)")
    ap.add_argument("--zero", type=int, default=1, choices=(0, 1, 2))
    ap.add_argument("--report", default="1,10,30,100,300", help="steps at which the two targets are compared")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
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
    cfg = build_config("demo", [f"deepspeed.zero={args.zero}", "train.precision=bf16",
                                f"train.batch_size={args.batch_size}"])
    torch.manual_seed(0)
    model = create_model_from_config(cfg)
    model.set_distributed(rank, world)
    model.perceptual.teacher.to(torch.bfloat16)
    opt = build_optimizer(param_groups(model.online, cfg.optim.weight_decay), cfg.optim, args.lr, torch.device("cpu"))
    engine, *_ = deepspeed.initialize(model=model.online, optimizer=opt, config=build_ds_config(cfg, world),
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
    batches = [torch.randn(args.batch_size, 3, img, img, generator=g) for _ in range(8)]
    probe = torch.randn(args.batch_size, 3, img, img, generator=g)
    report = {int(s) for s in args.report.split(",")}
    rows: list[dict[str, Any]] = []
    for step in range(1, args.steps + 1):
        out = model(batches[step % len(batches)], online=online)
        engine.backward(out.loss)
        engine.step()
        exact.update(args.momentum)
        approx.update(args.momentum)
        if step not in report and step != args.steps:
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
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "world": world, "rows": rows, "u_bf16": 2.0**-8}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
