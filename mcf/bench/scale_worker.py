"""One rank of ``mcf bench scale`` (run under torchrun by :mod:`mcf.bench.scale`)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from mcf.train.engine import device_index


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--model", default="mcf_vit_tiny")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", 1))
    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import torch.distributed as dist

    if not on_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skips a 30-70 s JIT build
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", device_index(local, torch.cuda.device_count())) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)

    from mcf.models import create_model

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
        "optimizer": {"type": "AdamW", "params": {"lr": 1.5e-4, "betas": [0.9, 0.95], "weight_decay": 0.05, "torch_adam": True}},
        "zero_optimization": {"stage": args.stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                              "stage3_prefetch_bucket_size": bucket, "stage3_param_persistence_threshold": 0,
                              "stage3_max_live_parameters": bucket, "overlap_comm": False, "contiguous_gradients": True},
        "bf16": {"enabled": args.precision == "bf16"},
    }
    from mcf.train.engine import PRECISION_DTYPES, CastInput

    dtype = PRECISION_DTYPES[args.precision]
    model.to(device)
    if dtype != torch.float32:  # as the trainer: the frozen teacher runs in the engine's dtype, the EMA target stays fp32
        model.perceptual.teacher.to(dtype)
    online = model.online
    engine, _, _, _ = deepspeed.initialize(model=online, model_parameters=[p for p in online.parameters() if p.requires_grad],
                                           config=ds_config)
    if dtype != torch.float32:  # ZeRO-3 leaves buffers in fp32; stages 0-2 cast them
        for b in engine.module.buffers():
            if b.is_floating_point():
                b.data = b.data.to(dtype)
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
    held = combine(after_backward, after_step)
    mine = {"rank": rank, "held": held, "after_backward": after_backward, "after_step": after_step, "total_bytes": held["total_bytes"],
            "ms_per_step": statistics.median(times) * 1e3, "last_loss": loss}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        result = {
            "stage": args.stage,
            "ranks": gathered,
            "ms_per_step": max(r["ms_per_step"] for r in gathered),
            "images_per_s": world * args.batch_size / (max(r["ms_per_step"] for r in gathered) / 1e3),
            "params": n_params,
            "param_bytes_unsharded": n_params * torch.empty((), dtype=dtype).element_size(),
            "precision": args.precision,
            "device": str(device.type),
            "backend": dist.get_backend(),
            "deepspeed": deepspeed.__version__,
            "bucket_elements": bucket,
        }
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
