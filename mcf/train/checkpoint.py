"""Checkpoints: DeepSpeed's engine state plus mcf's run state, complete only once marked.

Layout of ``OUTPUT/checkpoints/step_{step:08d}/``::

    mp_rank_00_model_states.pt, *zero_pp_rank_*_optim_states.pt   DeepSpeed (module, optimizer, ZeRO shards)
    mcf_state.pt        rank 0: step, epoch, EMA target weights (fp32), resolved config, metric accumulators
    rank_00000.pt …     one per rank: torch/accelerator/numpy/python RNG states, data-loader position
    COMPLETE            written by rank 0 last, after a barrier: only marked directories are resumed

DeepSpeed's ``client_state`` is written by rank 0 only, hence the per-rank files. ``--resume auto``
takes the newest marked directory, so a crash during a save leaves the previous one in use; the
newest ``checkpoint.keep_last`` marked directories are kept, unmarked leftovers are deleted.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcf.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "mcf-pretrain-v1"
COMPLETE = "COMPLETE"
MCF_STATE = "mcf_state.pt"
ONLINE_FP32 = "online_fp32.pt"  # ZeRO 0 in bf16/fp16 only: the fp32 masters (DeepSpeed keeps them as flat groups)
STEP_RE = re.compile(r"^step_(\d{8,})$")
CRASH_ENV = "MCF_TEST_CRASH_IN_SAVE"  # fault injection for tests: every rank SIGKILLs itself inside the save of step N


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _step_of(path: Path) -> int | None:
    m = STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: Path, complete_only: bool = True) -> list[Path]:
    """Step directories under ``root`` sorted by step (only the ``COMPLETE`` ones by default)."""
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and _step_of(d) is not None]
    if complete_only:
        dirs = [d for d in dirs if (d / COMPLETE).is_file()]
    return sorted(dirs, key=lambda d: _step_of(d))  # type: ignore[arg-type,return-value]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A complete step directory from a step directory, a ``checkpoints/`` folder or a run folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if _step_of(p) is not None:
        if not (p / COMPLETE).is_file():
            raise CheckpointError(f"checkpoint {p} is incomplete (no {COMPLETE} marker: the save was interrupted)")
        return p
    for root in (p / "checkpoints", p):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise CheckpointError(f"no complete checkpoint in {p}")


def find_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """``auto``: the newest complete checkpoint of the run (None on a fresh run); ``none``: None;
    else the checkpoint named by the path (an error when it does not exist)."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(Path(output_dir) / "checkpoints")
        return found[-1] if found else None
    return resolve_checkpoint(resume)


# -- RNG ------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "accel": accel.get_rng_state() if accel.device_name() != "cpu" else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    torch.set_rng_state(state["torch"])
    if state.get("accel") is not None:
        get_accelerator().set_rng_state(state["accel"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# -- save / load ----------------------------------------------------------------------------------
def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(engine: Any, root: Path, step: int, mcf_state: dict[str, Any], rank_state: dict[str, Any], rank: int, keep_last: int,
                    online_fp32: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``root/step_{step}`` on every rank (a collective); returns its path once marked complete."""
    tag = step_dir_name(step)
    path = root / tag
    if rank == 0 and path.exists():  # leftovers of an interrupted save of the same step
        shutil.rmtree(path)
    _barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
    path.mkdir(parents=True, exist_ok=True)
    _atomic_save(rank_state, path / rank_file(rank))
    if rank == 0:
        _atomic_save({"format": FORMAT, **mcf_state}, path / MCF_STATE)
        if online_fp32 is not None:
            _atomic_save(online_fp32, path / ONLINE_FP32)
    if os.environ.get(CRASH_ENV) == str(step):  # the job dies with every file written but the marker
        log.error("%s=%s: rank %d killed inside the save (test fault injection)", CRASH_ENV, step, rank)
        os.kill(os.getpid(), signal.SIGKILL)
    _barrier()
    if rank == 0:
        with open(path / COMPLETE, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        prune(root, keep_last)
    _barrier()
    return path


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and unmarked leftovers."""
    complete = list_checkpoints(root)
    for d in complete[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
    for d in list_checkpoints(root, complete_only=False):
        if not (d / COMPLETE).is_file():
            shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(engine: Any, path: Path, rank: int, world_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore the engine (module, optimizer, ZeRO shards) from ``path``; returns (mcf_state, rank_state)."""
    state = torch.load(path / MCF_STATE, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mcf pre-training checkpoint")
    if int(state.get("world_size", world_size)) != world_size:
        raise CheckpointError(f"{path} was written by {state['world_size']} ranks, this run has {world_size}: "
                              "resume with the same number of ranks (or export it with `mcf export-fp32` and start a new run)")
    rf = path / rank_file(rank)
    if not rf.is_file():
        raise CheckpointError(f"{rf} is missing")
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    return state, torch.load(rf, map_location="cpu", weights_only=True)


# -- consolidation --------------------------------------------------------------------------------
def _online_fp32(step_dir: Path) -> dict[str, torch.Tensor]:
    """The online model's fp32 weights from a DeepSpeed tag directory, any ZeRO stage/precision."""
    if (step_dir / ONLINE_FP32).is_file():
        files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
        module = torch.load(files[0], map_location="cpu", weights_only=False)["module"] if files else {}
        masters = torch.load(step_dir / ONLINE_FP32, map_location="cpu", weights_only=True)
        return {k: masters[k] if k in masters else (v.float() if v.is_floating_point() else v) for k, v in module.items()}
    has_zero_shards = any(step_dir.glob("*zero_pp_rank_*optim_states.pt"))
    if has_zero_shards:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
            return {k: v.float() for k, v in sd.items()}
        except ValueError as e:  # ZeRO-0 bf16 (BF16_Optimizer) shards are not ZeRO partitions
            if "zero" not in str(e).lower():
                raise
    files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{step_dir} holds no DeepSpeed model states")
    sd = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    if any(v.dtype != torch.float32 for v in sd.values() if v.is_floating_point()):
        log.warning("%s: no fp32 masters found; the module's %s weights are upcast", step_dir, next(iter(sd.values())).dtype)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def load_consolidated(path: str | os.PathLike) -> dict[str, Any]:
    """One fp32 dict from a run folder, a ``step_*`` directory (any ZeRO stage) or an exported file.

    Returns ``{"online": MCFOnline state dict (encoder.*, projector.*, predictor.*, decoder.*),
    "target": EMA target state dict, "config": resolved config dict, "step": int}``, all fp32.
    """
    p = Path(path)
    if p.is_file():
        try:
            d = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a checkpoint error
            raise CheckpointError(f"cannot read {p}: {e}") from None
        if not isinstance(d, dict) or not {"online", "target", "config", "step"} <= set(d):
            raise CheckpointError(f"{p} is not an `mcf export-fp32` file (keys online, target, config, step)")
        return d
    step_dir = resolve_checkpoint(p)
    state = torch.load(step_dir / MCF_STATE, map_location="cpu", weights_only=True)
    return {"online": _online_fp32(step_dir), "target": {k: v.float() for k, v in state["target"].items()},
            "config": state["config"], "step": int(state["step"])}


def export_fp32(src: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    d = load_consolidated(src)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(d, Path(out))
    return d
