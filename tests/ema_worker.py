"""One rank of tests/test_ema.py (run under torchrun): for each ZeRO stage × precision × target
precision, the EMA of :class:`mcf.train.ema.TargetEMA` against the formula on the gathered fp32
masters, its forward weights, its collectives, the target's compute dtype, save → load.

DeepSpeed engines of several stages are built one after the other in this one process group (a
fresh model each); the reference masters come from ``mcf.train.ds_internals.fp32_masters`` (DeepSpeed's
``safe_get_full_fp32_param`` and friends), independent of the EMA's own layout code.
Prints one JSON line per case on rank 0.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from mcf.bench.comm import CollectiveCounter  # noqa: E402

COUNTER = CollectiveCounter().install()  # before DeepSpeed starts

import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402
import torch.distributed as dist  # noqa: E402

STEPS = 2
MOMENTUM = 0.9  # far from 1, so that an EMA of the wrong values differs visibly


def run_case(
    zero: int, precision: str, target_precision: str, extra: dict, freeze: str | None, source: str = "fp32_masters"
) -> dict:
    from mcf.config import build_config
    from mcf.models import create_model_from_config
    from mcf.train.ds_internals import flat_row_lengths, fp32_masters
    from mcf.train.ema import TargetEMA
    from mcf.train.engine import (
        PRECISION_DTYPES,
        CastInput,
        build_ds_config,
        default_ds_config_path,
        load_ds_json,
    )
    from mcf.train.optim import build_optimizer, param_groups

    overrides = [
        f"deepspeed.zero={zero}",
        f"train.precision={precision}",
        "train.batch_size=4",
        f"train.target_precision={target_precision}",
    ]
    if extra:  # a DeepSpeed JSON of the user's: the stage's default one with these keys
        path = default_ds_config_path(zero, precision)
        ds_json = {**(load_ds_json(str(path)) if path.is_file() else {}), **extra}
        json_path = Path(tempfile.mkdtemp(prefix="ema-worker-")) / "ds.json"
        json_path.write_text(json.dumps(ds_json))
        overrides.append(f"deepspeed.config={json_path}")
    cfg = build_config("demo", overrides)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = create_model_from_config(cfg)
    model.set_distributed(rank, world)
    fixed = {}
    if freeze:  # a frozen online parameter has no master: the EMA averages its fixed fp32 value
        p = dict(model.online.named_parameters())[freeze]
        p.requires_grad_(False)
        fixed[freeze] = p.detach().clone()
    dtype = PRECISION_DTYPES[precision]
    if dtype != torch.float32:
        model.perceptual.teacher.to(dtype)
    ds = build_ds_config(cfg, world)
    opt = build_optimizer(param_groups(model.online, 0.05), cfg.optim, 1e-2, torch.device("cpu"))
    engine, *_ = deepspeed.initialize(model=model.online, optimizer=opt, config=ds, dist_init_required=False)
    if dtype != torch.float32:
        for b in engine.module.buffers():
            if b.is_floating_point():
                b.data = b.data.to(dtype)
    names = [n for n, _ in model.ema_pairs()]
    ref = {n: p.detach().clone() for n, p in model.ema_pairs()}  # fp32 copies, the EMA's start
    forward_dtype = dtype if target_precision == "auto" else torch.float32
    ema = TargetEMA(model.target, engine, forward_dtype, fixed=fixed, source=source)
    predicted = None
    groups = getattr(engine.optimizer, "bit16_groups", getattr(engine.optimizer, "bf16_groups", None))
    if ema.layout.kind == "flat":  # the planner of the bytes report, from the optimizer's groups alone
        by_id = {id(p): n for n, p in engine.module.named_parameters()}
        sizes = {n: p.numel() for n, p in model.target.named_parameters()}
        predicted = flat_row_lengths(
            [[(by_id[id(p)], p.numel()) for p in g] for g in groups],
            {n: k for n, k in sizes.items() if n not in fixed},
            {n: sizes[n] for n in fixed},
            world,
        )
    acts: list[torch.dtype] = []
    model.target.encoder.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: acts.append(o.dtype))
    online = CastInput(engine, dtype)
    g = torch.Generator().manual_seed(rank)
    img = model.spec.img_size
    per_update, exact, weights_exact = [], True, True
    # source=bf16_params: |EMA - exact EMA| <= (1 - m^n)·u_bf16·M + 4n·eps_fp32·M per element, M the running
    # max of |θ| and |t| (each update adds (1-m)·bf16(θ), bf16(θ) within u_bf16 = 2^-8 of θ, relatively; both
    # EMAs round twice per update in fp32)
    magnitude = {n: r.abs() for n, r in ref.items()}
    over_bound, differs = 0.0, False
    secondary = 0
    for _ in range(STEPS):
        images = torch.randn(4, 3, img, img, generator=g)
        out = model(images, online=online)
        engine.backward(out.loss)
        # ZeRO++ hpZ: parameters with a secondary (intra-group) partition, made in the forward, dropped by the step
        held = [getattr(p, "ds_secondary_tensor", None) is not None for p in engine.module.parameters()]
        secondary = max(secondary, sum(held))
        engine.step()
        masters = {**fp32_masters(engine, [n for n in names if n not in fixed], precision, zero), **fixed}
        for n in names:  # the formula, per parameter, with the ops the released update used
            torch._foreach_mul_([ref[n]], MOMENTUM)
            torch._foreach_add_([ref[n]], [masters[n].to(ref[n].dtype)], alpha=1 - MOMENTUM)
        COUNTER.calls.clear()
        ema.update(MOMENTUM)
        ema.wait()
        per_update.append([(c.op, c.dtype, c.bytes) for c in COUNTER.calls])
        full = ema.full_fp32()
        exact &= all(torch.equal(full[n], ref[n]) for n in names)
        step = len(per_update)
        for n in names:
            magnitude[n] = torch.maximum(magnitude[n], torch.maximum(masters[n].abs(), ref[n].abs()))
            u_bf16, eps32 = torch.finfo(torch.bfloat16).eps / 2, torch.finfo(torch.float32).eps
            bound = ((1 - MOMENTUM**step) * u_bf16 + 4 * step * eps32) * magnitude[n]
            over_bound = max(over_bound, float(((full[n] - ref[n]).abs() / bound.clamp_min(1e-30)).max()))
            differs |= not torch.equal(full[n], ref[n])
        weights = dict(model.target.named_parameters())
        weights_exact &= all(
            weights[n].dtype == forward_dtype and torch.equal(weights[n], full[n].to(forward_dtype)) for n in names
        )
    # save -> perturb -> load gives back the same EMA and forward weights
    sd = ema.state_dict()
    before = ema.shard.clone(), ema.flat.clone()
    ema.shard.add_(1.0)
    ema.flat.zero_()
    ema.load_state_dict(sd)
    restored = torch.equal(ema.shard, before[0]) and torch.equal(ema.flat, before[1])
    # the saved EMA is the EMA's own fp32 values (for the default source `exact` ties them to the formula)
    sd_ok = all(sd[n].dtype == torch.float32 and torch.equal(sd[n], full[n].cpu()) for n in names)
    return {
        "zero": zero,
        "precision": precision,
        "target_precision": target_precision,
        "extra": extra,
        "freeze": freeze,
        "world": world,
        "row_lengths": ema.layout.row_lengths if ema.sharded else [],
        "predicted_row_lengths": predicted,
        "gathered_numel": ema.rows.buffer.numel() if ema.sharded else 0,
        "optimizer": type(engine.optimizer).__name__,
        "kind": ema.layout.kind,
        "exact": bool(exact),
        "weights_exact": bool(weights_exact),
        "restored": bool(restored),
        "state_dict_exact": bool(sd_ok),
        "source": source,
        "error_over_bound": over_bound,  # max over elements and steps of |EMA - exact| / the bound above
        "differs_from_exact": bool(differs),
        "activation_dtypes": sorted({str(a).replace("torch.", "") for a in acts}),
        "update_collectives": per_update,
        "shard_numel": ema.layout.shard_numel,
        "total_numel": sum(r.numel() for r in ref.values()),
        "masters_not_bf16": sum(int((m != m.bfloat16().float()).any()) for m in masters.values()),
        "secondary_partitions": secondary,
    }


def main() -> int:
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cases = [json.loads(c) for c in sys.argv[1:]]
    for case in cases:
        if case.get("expect_error"):  # refused while the EMA is built, on every rank alike (before any collective)
            from mcf.errors import ConfigError

            try:
                run_case(case["zero"], case["precision"], "auto", {}, None, case["ema_source"])
                result = {"error": None}
            except ConfigError as e:
                result = {"error": str(e)}
            if dist.get_rank() == 0:
                print("RESULT " + json.dumps(result), flush=True)
            dist.barrier()
            continue
        result = run_case(
            case["zero"],
            case["precision"],
            case.get("target_precision", "auto"),
            case.get("extra", {}),
            case.get("freeze"),
            case.get("ema_source", "fp32_masters"),
        )
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps(result), flush=True)
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
