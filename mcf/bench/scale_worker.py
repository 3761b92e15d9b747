"""One rank of ``mcf bench scale`` (run under torchrun by :mod:`mcf.bench.scale`).

Two phases in one process group: ``memory`` (bytes held and step time of the online model's engine
and the EMA, with small communication buckets) and ``comm`` (the collectives of the real trainer's
steps, :class:`mcf.train.trainer.Trainer` on synthetic batches with the run's default DeepSpeed
JSON, counted by :class:`mcf.bench.comm.CollectiveCounter`, installed before DeepSpeed starts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mcf.bench.comm import CollectiveCounter

COUNTER = CollectiveCounter().install()  # DeepSpeed keeps references to the functions it finds at init

from mcf.train.engine import device_index  # noqa: E402


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if st.nbytes() == 0:
        return None
    return st.data_ptr(), st.nbytes()


class StorageCounter:
    """Bytes of distinct tensor storages, by category; a storage already counted is skipped."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()
        self.bytes: dict[str, int] = {}

    def add(self, t: Any, category: str) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = _storage_key(t)
        if key is None or key in self.seen:
            return
        self.seen.add(key)
        self.bytes[category] = self.bytes.get(category, 0) + key[1]

    def walk(self, obj: Any, category: str, depth: int = 0, visited: set[int] | None = None) -> None:
        """Every tensor reachable from ``obj`` through attributes, lists, tuples and dicts (not
        through modules: their parameters are counted separately)."""
        visited = set() if visited is None else visited
        if depth > 5 or id(obj) in visited or isinstance(obj, torch.nn.Module):
            return
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            self.add(obj, category)
            if obj.grad is not None:
                self.add(obj.grad, "grads")
            return
        if isinstance(obj, dict):
            items = list(obj.values()) + [k for k in obj if isinstance(k, torch.Tensor)]
        elif isinstance(obj, (list, tuple, set)):
            items = list(obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
            if isinstance(obj, torch.optim.Optimizer):
                for state in obj.state.values():
                    self.walk(state, "optimizer_state", depth + 1, visited)
                self.walk(obj.param_groups, category, depth + 1, visited)
                return
            items = list(vars(obj).values())
        else:
            return
        for item in items:
            self.walk(item, category, depth + 1, visited)


def held_bytes(engine: Any) -> dict[str, int]:
    """Bytes this rank holds for the model: parameters (ZeRO-3: the partition), gradients,
    optimizer state, and the optimizer wrapper's other tensors (fp32 master partitions, gradient
    partitions, flat buffers)."""
    c = StorageCounter()
    for p in engine.module.parameters():
        c.add(getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p, "params")
        if p.grad is not None:
            c.add(p.grad, "grads")
    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):  # ZeRO-0: the torch optimizer itself
        c.walk(opt, "optimizer_other")
    else:  # a ZeRO wrapper: its inner torch optimizer (state), then each attribute by name
        visited: set[int] = set()
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            c.walk(inner, "optimizer_other", visited=visited)
        for name, value in vars(opt).items():
            c.walk(value, f"zero.{name}", visited=visited)
    return dict(c.bytes)


def combine(*snapshots: dict[str, int]) -> dict[str, int]:
    """Per category, the largest of the snapshots (gradients live after backward, optimizer state
    after the step); ``total_bytes`` is their sum: what the rank must hold across a step."""
    out: dict[str, int] = {}
    for snap in snapshots:
        for k, v in snap.items():
            out[k] = max(out.get(k, 0), v)
    out["total_bytes"] = sum(out.values())
    return out


class SyntheticLoader:
    """The trainer's loader interface over two fixed random batches on the device (no data pipeline)."""

    bad_samples = 0

    def __init__(self, img_size: int, batch_size: int, rank: int, device: torch.device, length: int = 1000):
        g = torch.Generator().manual_seed(rank)
        self.batches = [torch.randn(batch_size, 3, img_size, img_size, generator=g).to(device) for _ in range(2)]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return (self.batches[i % 2] for i in range(self.length))

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches_left(self) -> int:
        return self.length

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.epoch = int(d.get("epoch", 0))

    def close(self) -> None:
        pass


def ema_bytes(ema: Any) -> int:
    """Bytes of the EMA's own tensors on this rank: the fp32 shard, the forward weights, the gather buffers."""
    c = StorageCounter()
    rows = getattr(ema, "rows", None)
    for t in (ema.shard, ema.flat, getattr(rows, "send", None), getattr(rows, "buffer", None)):
        c.add(t, "ema")
    return c.bytes.get("ema", 0)


def memory_phase(args: argparse.Namespace, device: torch.device, on_gpu: bool) -> dict[str, Any]:
    """Bytes held and step time of the online model's engine (+ the EMA) with small buckets; rank 0
    gets every rank's."""
    import deepspeed
    import torch.distributed as dist

    from mcf.models import create_model

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = create_model(args.model, teacher_checkpoint="random", img_size=args.img_size)
    model.set_distributed(rank, world)
    n_online = sum(p.numel() for p in model.online.parameters())
    # Communication buckets (elements) small against the model, so that they do not hide the sharding.
    bucket = max(50_000, min(1_000_000, n_online // 16))
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1.5e-4, "betas": [0.9, 0.95], "weight_decay": 0.05, "torch_adam": True},
        },
        "zero_optimization": {
            "stage": args.stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            "stage3_prefetch_bucket_size": bucket,
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": bucket,
            "overlap_comm": False,
            "contiguous_gradients": True,
        },
        "bf16": {"enabled": args.precision == "bf16"},
    }
    from mcf.train.ema import TargetEMA
    from mcf.train.engine import PRECISION_DTYPES, CastInput

    dtype = PRECISION_DTYPES[args.precision]
    model.to(device)
    if dtype != torch.float32:  # as the trainer: the frozen teacher runs in the engine's dtype
        model.perceptual.teacher.to(dtype)
    online = model.online
    engine, _, _, _ = deepspeed.initialize(
        model=online, model_parameters=[p for p in online.parameters() if p.requires_grad], config=ds_config
    )
    if dtype != torch.float32:  # ZeRO-3 leaves buffers in fp32; stages 0-2 cast them
        for b in engine.module.buffers():
            if b.is_floating_point():
                b.data = b.data.to(dtype)
    ema = TargetEMA(model.target, engine, dtype)  # as the trainer (train.target_precision=auto)
    cast = CastInput(engine, dtype)
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    size = model.spec.img_size
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randn(args.batch_size, 3, size, size, generator=g).to(device) for _ in range(2)]

    after_backward: dict[str, int] = {}
    after_step: dict[str, int] = {}

    def step(i: int, measure: bool = False) -> float:
        nonlocal after_backward, after_step
        out = model(batches[i % 2], online=cast)
        engine.backward(out.loss)
        if measure:
            after_backward = held_bytes(engine)
        engine.step()
        ema.update(0.99)
        if measure:
            after_step = held_bytes(engine)
        return float(out.loss.detach())

    step(0, measure=True)  # warm-up; the state is fully allocated after the first step
    times = []
    for i in range(args.steps):
        if on_gpu:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        loss = step(i + 1)
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    held = combine(after_backward, after_step, {"ema": ema_bytes(ema)})
    mine = {
        "rank": rank,
        "held": held,
        "after_backward": after_backward,
        "after_step": after_step,
        "total_bytes": held["total_bytes"],
        "ms_per_step": statistics.median(times) * 1e3,
        "last_loss": loss,
    }
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    return {
        "ranks": gathered,
        "ms_per_step": max(r["ms_per_step"] for r in gathered),
        "images_per_s": world * args.batch_size / (max(r["ms_per_step"] for r in gathered) / 1e3),
        "params": n_params,
        "param_bytes_unsharded": n_params * torch.empty((), dtype=dtype).element_size(),
        "ema_kind": ema.layout.kind,
        "bucket_elements": bucket,
    }


def minimum_comm(
    stage: int, params: int, param_bytes: int, reduce_bytes: int, keys_bytes: int, flags_bytes: int
) -> dict[str, Any]:
    """What a ZeRO stage cannot do without per step (bytes as :mod:`mcf.bench.comm` counts them):
    ZeRO-0 one all-reduce of the gradients; ZeRO-1/2 a reduce-scatter of the gradients and an
    all-gather of the updated parameters; ZeRO-3 an all-gather of the parameters for the forward,
    another for the backward and a reduce-scatter of the gradients; every stage the contrastive
    keys' all-gather and the step's flags all-reduce. One collective each."""
    grads, gather = params * reduce_bytes, params * param_bytes
    engine = {0: (1, grads), 1: (2, grads + gather), 2: (2, grads + gather), 3: (3, grads + 2 * gather)}[stage]
    return {
        "collectives": engine[0] + 2,
        "bytes": engine[1] + keys_bytes + flags_bytes,
        "engine_bytes": engine[1],
        "keys_bytes": keys_bytes,
        "flags_bytes": flags_bytes,
    }


def comm_phase(args: argparse.Namespace, device: torch.device, workdir: Path, memory: dict[str, Any] | None) -> None:
    """The real trainer for ``comm_steps`` steps, every collective counted; steps 2.. are averaged
    (step 1 adds one-off set-up collectives, the final save comes after the last). Rank 0 writes
    ``args.out`` (with the memory phase's result)."""
    import torch.distributed as dist

    import mcf.train.trainer as trainer_mod
    from mcf.config import build_config
    from mcf.train.engine import PRECISION_DTYPES

    comm_steps = max(args.steps, 2) + 1
    overrides = [
        f"model.name={args.model}",
        f"train.batch_size={args.batch_size}",
        f"train.max_steps={comm_steps}",
        f"train.precision={args.precision}",
        f"deepspeed.zero={args.stage}",
        "train.resume=none",
        "train.overwrite_run=true",  # a fresh run in the scratch folder each time
        f"train.output_dir={workdir}",
        "logging.log_every=1000000",
        "logging.progress=false",
        "logging.tracking_uri=none",
        "logging.recon_every=0",
        "checkpoint.every=1000000",
        "monitor.every=0",
        "data.num_workers=0",
        *args.set,
    ]
    if args.img_size:
        overrides.append(f"model.img_size={args.img_size}")
    cfg = build_config("demo", overrides)

    def loader_factory(
        _data: Any, *, img_size: int, batch_size: int, rank: int, world_size: int, seed: int, device: torch.device
    ):
        return SyntheticLoader(img_size, batch_size, rank, device)

    trainer = trainer_mod.Trainer(cfg, loader_factory=loader_factory)
    active = {"loop": False}
    COUNTER.tag_fn = lambda: trainer.step if active["loop"] else None
    if hasattr(
        trainer_mod, "fp32_masters"
    ):  # the EMA's reads of the masters (before the sharded EMA: a collective each)
        trainer_mod.fp32_masters = COUNTER.labelled(trainer_mod.fp32_masters, "ema")
    setup, loop = trainer._setup, trainer._loop

    def counted_setup() -> None:
        setup()
        model = trainer.model
        model.contrastive.gather = COUNTER.labelled(model.contrastive.gather, "keys")
        if hasattr(trainer, "ema"):
            trainer.ema.update = COUNTER.labelled(trainer.ema.update, "ema")
        # the engine's backward (its gradient hooks, then its epilogue) issues the gradient reduction;
        # its step, at ZeRO-1/2, the all-gather of the updated parameters
        trainer.engine.backward = COUNTER.labelled(trainer.engine.backward, "grads")
        trainer.engine.step = COUNTER.labelled(trainer.engine.step, "params")

    def counted_loop() -> int:
        active["loop"] = True
        try:
            rc = loop()
        finally:
            active["loop"] = False
        report(trainer)
        return rc

    def report(trainer: Any) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        steady = COUNTER.per_step(list(range(1, comm_steps)))
        first = COUNTER.per_step([0])
        # step 2, in call order (the last field: issued during the backward)
        one = [[c.label or "other", c.op, c.dtype, c.bytes, c.in_backward] for c in COUNTER.select([1])]
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, {"rank": rank, "per_step": steady, "first_step": first, "step_2_calls": one})
        if rank != 0:
            return
        engine = trainer.engine
        params = sum(
            p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters() if p.requires_grad
        )
        param_bytes = torch.empty((), dtype=PRECISION_DTYPES[args.precision]).element_size()
        reduce_dtype = getattr(engine, "communication_data_type", None) or PRECISION_DTYPES[args.precision]
        reduce_bytes = torch.empty((), dtype=reduce_dtype).element_size()
        keys_bytes = world * args.batch_size * trainer.model.spec.proj_dim * 4  # fp32 normalised keys, gathered
        minimum = minimum_comm(args.stage, params, param_bytes, reduce_bytes, keys_bytes, 3 * 4)
        # Beyond the minimum: where the fp32 masters are partitioned, the EMA target's forward weights must reach
        # every rank each step in some form (P_target x the forward dtype's bytes), whoever computes them.
        fwd = getattr(getattr(trainer, "ema", None), "forward_dtype", torch.float32)
        sharded = trainer.ema.source == "fp32_masters" and (
            args.stage == 3 or (args.stage in (1, 2) and args.precision != "fp32")
        )  # bf16_params: the EMA needs no bytes of its own
        target_bytes = (
            sum(p.numel() for p in trainer.model.target.parameters()) * torch.empty((), dtype=fwd).element_size()
        )
        minimum["target_weights_bytes"] = target_bytes if sharded else 0
        worst = max(gathered, key=lambda r: (r["per_step"]["collectives"], r["per_step"]["bytes"]))["per_step"]
        # the gradient reduction, and the share of its bytes issued while the backward still ran (overlap_comm)
        red = worst["by_label"].get("grads", {"count": 0.0, "bytes": 0.0})
        during = worst["in_backward_by_label"].get("grads", {"count": 0.0, "bytes": 0.0})
        grads = {
            "count": red["count"],
            "bytes": red["bytes"],
            "in_backward_count": during["count"],
            "in_backward_bytes": during["bytes"],
            "overlap_share": during["bytes"] / red["bytes"] if red["bytes"] else 0.0,
        }
        comm = {
            "steps_counted": comm_steps - 1,
            "ranks": gathered,
            "per_step": worst,
            "minimum": minimum,
            "collectives_over_minimum": worst["collectives"] / minimum["collectives"],
            "bytes_over_minimum": worst["bytes"] / minimum["bytes"],
            "bytes_over_minimum_with_target": worst["bytes"] / (minimum["bytes"] + minimum["target_weights_bytes"]),
            "ema": worst["by_label"].get("ema", {"count": 0.0, "bytes": 0.0}),
            "grads": grads,
            "step_2_calls": gathered[0]["step_2_calls"],
            "reduce_bucket_elements": getattr(engine.optimizer, "reduce_bucket_size", None),
            "reduce_dtype": str(reduce_dtype).replace("torch.", ""),
            "trainable_params": params,
            "ds_config": "the trainer's default for the stage and precision (ds_configs/)",
            "overrides": list(args.set),
            # what mcf.bench.projection scales from
            "world": world,
            "batch_size": args.batch_size,
            "precision": args.precision,
            "facts": {"trainable": params, "proj_dim": trainer.model.spec.proj_dim},
            "ema_gather_elements": trainer.ema.rows.buffer.numel() if trainer.ema.sharded else 0,
            "ema_source": trainer.ema.source,
            "param_bytes": param_bytes,
            "reduce_bytes": reduce_bytes,
            "forward_bytes": torch.empty((), dtype=fwd).element_size(),
        }
        result = {
            "stage": args.stage,
            **(memory or {}),
            "comm": comm,
            "precision": args.precision,
            "device": str(device.type),
            "backend": dist.get_backend(),
            "deepspeed": __import__("deepspeed").__version__,
        }
        with open(args.out, "w") as f:
            json.dump(result, f)

    trainer._setup, trainer._loop = counted_setup, counted_loop
    try:
        rc = trainer.fit()
    finally:
        COUNTER.tag_fn = None  # the module-level counter must not keep the trainer (engine, groups) alive past here
    if rc != 0:
        raise SystemExit(f"trainer exited with {rc}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--model", default="mcf_vit_tiny")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--phases", default="memory,comm", help="memory, comm or both")
    ap.add_argument(
        "--set", action="append", default=[], help="config override of the comm phase's trainer (repeatable)"
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    phases = set(args.phases.split(","))
    from mcf.bench.scale_widths import register_block_model

    register_block_model(args.model)  # a model of mcf.bench.scale_widths: a quarter or a half of another's blocks

    world = int(os.environ.get("WORLD_SIZE", 1))
    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import torch.distributed as dist

    if not on_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skips a 30-70 s JIT build
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", device_index(local, torch.cuda.device_count())) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    memory = memory_phase(args, device, on_gpu) if "memory" in phases else None
    if "comm" in phases:  # the trainer's run folder (checkpoints): beside --out, the same on every rank
        comm_phase(
            args, device, Path(args.out).parent / f"trainer_zero{args.stage}", memory
        )  # ends with the group destroyed
        return 0
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "stage": args.stage,
                    **(memory or {}),
                    "precision": args.precision,
                    "device": str(device.type),
                    "backend": dist.get_backend(),
                    "deepspeed": deepspeed.__version__,
                },
                f,
            )
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # The results are written and the process group destroyed: leave without the interpreter's finalisation, where
    # gloo's worker threads could still meet tensors of DeepSpeed's objects being torn down ("terminate called
    # without an active exception", SIGABRT on one rank, seen twice in CI after complete runs; pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
