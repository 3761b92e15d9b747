"""Checkpoints: DeepSpeed's engine state plus mcf's run state, complete only once marked.

Layout of ``OUTPUT/checkpoints/step_{step:08d}/``::

    mp_rank_00_model_states.pt, *zero_pp_rank_*_optim_states.pt   DeepSpeed (module, optimizer, ZeRO shards)
    mcf_state.pt        rank 0: step, epoch, EMA target weights (fp32), resolved config, metric accumulators
    rank_00000.pt …     one per rank: torch/accelerator/numpy/python RNG states, data-loader position
    COMPLETE            written by rank 0 last, once every rank reported its files: only marked directories are
                        resumed; it lists every file with its size (and SHA-256 with checkpoint.hash=true)

DeepSpeed's ``client_state`` is written by rank 0 only, hence the per-rank files. Every file is
written and read back through :mod:`mcf.train.integrity` and :mod:`mcf.serialization` (weights-only
unpickling: a tampered file cannot run code). ``--resume auto`` takes the newest marked directory
whose files match its marker, falling back to the previous one with a warning (a crash during a save
leaves the previous one in use); an explicit path must be intact. The newest ``checkpoint.keep_last``
marked directories up to the current step are kept, unmarked leftovers are deleted. A write error on
any rank (a full disk) fails the save on every rank, removes the partial folder and leaves the
earlier checkpoints as they were.

**Another number of ranks.** ZeRO-0 state is whole in ``mp_rank_00_model_states.pt`` and loads on
any number of ranks. ZeRO 1-3 partitions (the fp32 masters, Adam's moments and step) are re-split
through DeepSpeed's universal checkpoint: on the first resume with another world size, rank 0
converts the directory once with ``deepspeed.checkpoint.ds_to_universal`` into ``step_*/universal/``
(one folder per parameter holding ``fp32``, ``exp_avg``, ``exp_avg_sq`` and ``step``; written
beside, then renamed into place, so an interrupted conversion is redone) and every rank loads its
new partition from it with DeepSpeed's ``checkpoint.load_universal``. The per-rank files of the old
ranks are all read (see :mod:`mcf.train.elastic`).
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcf.dist import gather_errors
from mcf.errors import CheckpointError, StorageError, UnsafeCheckpointError
from mcf.serialization import safe_load, safe_torch_load
from mcf.train import integrity
from mcf.train.ds_internals import repair_universal_load
from mcf.train.integrity import COMPLETE

log = logging.getLogger(__name__)

FORMAT = "mcf-pretrain-v1"
MCF_STATE = "mcf_state.pt"
ONLINE_FP32 = "online_fp32.pt"  # ZeRO 0 in bf16/fp16 only: the fp32 masters (DeepSpeed keeps them as flat groups)
UNIVERSAL = "universal"  # DeepSpeed's universal copy of a ZeRO 1-3 step directory, made on a world-size change
STEP_RE = re.compile(r"^step_(\d{8,})$")
# fault injection for tests, inside the save of step N once every file is written, before the marker:
CRASH_ENV = "MCF_TEST_CRASH_IN_SAVE"  # every rank SIGKILLs itself
SIGNAL_ENV = "MCF_TEST_SIGNAL_IN_SAVE"  # "N" or "N:SIGNAME" (default SIGTERM): rank 0 signals its own process


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


def make_root(root: Path) -> None:
    """Create the checkpoints folder (rank 0, at start): a file in its place is a one-line error."""
    if root.exists() and not root.is_dir():
        raise StorageError(f"{root} is a file, not a folder: move it away (checkpoints are written there)")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(integrity.describe_write_error(root, e)) from None


def newest_intact(root: Path) -> Path | None:
    """The newest marked checkpoint under ``root`` that passes :func:`mcf.train.integrity.verify`.

    A damaged one is skipped with a warning (the previous one is tried); one that holds code is an
    error, since someone altered it. None when there is no marked checkpoint at all.

    Raises:
        UnsafeCheckpointError: a checkpoint holds a type outside the allowlist.
        CheckpointError: there are marked checkpoints, but none is intact.
    """
    found = list_checkpoints(root)
    problems = []
    for step_dir in reversed(found):
        try:
            integrity.verify(step_dir)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            log.warning("checkpoint %s is damaged, trying the previous one: %s", step_dir.name, e)
            problems.append(str(e))
            continue
        return step_dir
    if found:
        raise CheckpointError(f"no intact checkpoint in {root} ({len(found)} damaged; newest: {problems[0]}); "
                              "restore the files, or start over with --resume none --overwrite-run")
    return None


def resolve_checkpoint(path: str | os.PathLike, verify: bool = True) -> Path:
    """A complete step directory from a step directory, a ``checkpoints/`` folder or a run folder.

    A step directory must be intact (``verify``); from a folder, the newest intact one is taken.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not p.is_dir():
        raise CheckpointError(
            f"{p} is a file, not a checkpoint folder (a run folder, its checkpoints/ or a step_* folder)"
        )
    if _step_of(p) is not None:
        if not (p / COMPLETE).is_file():
            raise CheckpointError(f"checkpoint {p} is incomplete (no {COMPLETE} marker: the save was interrupted)")
        if verify:
            integrity.verify(p)
        return p
    for root in (p / "checkpoints", p):
        if not verify:
            found = list_checkpoints(root)
            if found:
                return found[-1]
            continue
        step_dir = newest_intact(root)
        if step_dir is not None:
            return step_dir
    raise CheckpointError(f"no complete checkpoint in {p}")


def find_resume(resume: str, output_dir: str | os.PathLike, verify: bool = True) -> Path | None:
    """``auto``: the newest intact checkpoint of the run (None on a fresh run); ``none``: None;
    else the checkpoint named by the path (an error when it does not exist or is damaged).

    ``verify=False`` only looks at names and markers (cheap: every rank may call it before the
    process group exists); the trainer then verifies on rank 0 (:func:`mcf.dist.rank0_decides`).
    """
    if resume == "none":
        return None
    if resume == "auto":
        root = Path(output_dir) / "checkpoints"
        if root.exists() and not root.is_dir():
            raise CheckpointError(f"{root} is a file, not a folder: move it away (checkpoints are written there)")
        if not verify:
            found = list_checkpoints(root)
            return found[-1] if found else None
        return newest_intact(root)
    return resolve_checkpoint(resume, verify=verify)


# -- RNG ------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "accel": accel.get_rng_state() if accel.device_name() != "cpu" else None,
        "numpy": [
            np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
            float(np_state[4]),
        ],
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
def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _gather_files(files: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every rank's files → one dict on rank 0 (others get theirs back)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return files
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, files)
    merged: dict[str, dict[str, Any]] = {}
    for part in everyone:
        merged.update(part)
    return merged


def _fault_injection(step: int, rank: int) -> None:
    if os.environ.get(CRASH_ENV) == str(step):  # the job dies with every file written but the marker
        log.error("%s=%s: rank %d killed inside the save (test fault injection)", CRASH_ENV, step, rank)
        os.kill(os.getpid(), signal.SIGKILL)
    wanted, _, name = os.environ.get(SIGNAL_ENV, "").partition(":")
    if wanted == str(step) and rank == 0:
        sig = signal.Signals[name or "SIGTERM"]
        log.warning(
            "%s=%s: rank 0 sends itself %s inside the save (test fault injection)", SIGNAL_ENV, wanted, sig.name
        )
        os.kill(os.getpid(), sig)


def _raise_failed(errors: list[tuple[int, str]], path: Path, root: Path) -> None:
    rank, first = errors[0]
    others = f" (and {len(errors) - 1} more rank(s))" if len(errors) > 1 else ""
    previous = list_checkpoints(root)
    kept = (
        f"the last complete checkpoint, {previous[-1].name}, is intact"
        if previous
        else "there is no earlier checkpoint"
    )
    raise StorageError(f"checkpoint {path.name} was not written: rank {rank}: {first}{others}; {kept}; "
                       "free space (or fix the folder) and resume with --resume auto")


def save_checkpoint(
    engine: Any, root: Path, step: int, mcf_state: dict[str, Any], rank_state: dict[str, Any], rank: int,
    keep_last: int, online_fp32: dict[str, torch.Tensor] | None = None, hash_files: bool = False,
) -> Path:
    """Write ``root/step_{step}`` on every rank (a collective); returns its path once marked complete.

    Raises:
        StorageError: a rank could not write its files (full disk, permissions): raised on every
            rank; the partial folder is removed and earlier checkpoints are untouched.
    """
    tag = step_dir_name(step)
    path = root / tag
    if rank == 0 and (path.exists() or path.is_symlink()):  # leftovers of an interrupted save of the same step
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    _barrier()
    writer = integrity.writer_of(engine)
    writer.begin(hash_files)
    engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        writer.error = writer.error or integrity.describe_write_error(path, e)
    writer.write(rank_state, path / rank_file(rank))
    if rank == 0:
        writer.write({"format": FORMAT, **mcf_state}, path / MCF_STATE)
        if online_fp32 is not None:
            writer.write(online_fp32, path / ONLINE_FP32)
    _fault_injection(step, rank)
    files, error = writer.report(path)
    failed = gather_errors(error)  # every rank learns whether any rank failed, so all stop together
    if failed:
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        _barrier()
        _raise_failed(failed, path, root)
    files = _gather_files(files)
    error = None
    if rank == 0:
        try:
            integrity.write_marker(path, step, files)
            prune(root, keep_last, upto=step)
        except StorageError as e:
            shutil.rmtree(path, ignore_errors=True)
            error = str(e)
    failed = gather_errors(error)
    if failed:
        _raise_failed(failed, path, root)
    return path


def prune(root: Path, keep_last: int, upto: int | None = None) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and unmarked leftovers.

    With ``upto``, checkpoints of later steps are left alone and not counted: they belong to a
    trajectory this run went back from (a damaged newest checkpoint, an explicit older resume) and
    would otherwise push the run's own new checkpoints out.
    """
    complete = [d for d in list_checkpoints(root) if upto is None or _step_of(d) <= upto]  # type: ignore[operator]
    for d in complete[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
    for d in list_checkpoints(root, complete_only=False):
        if not (d / COMPLETE).is_file():
            shutil.rmtree(d, ignore_errors=True)


def read_state(path: Path) -> dict[str, Any]:
    """``mcf_state.pt`` of a step directory (step, world size, config, EMA target), checked for its format
    and for what a resume or an export needs."""
    state = safe_load(path / MCF_STATE)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mcf pre-training checkpoint")
    if (
        not isinstance(state.get("config"), dict)
        or not isinstance(state.get("target"), dict)
        or not isinstance(state.get("step"), int)
    ):
        raise CheckpointError(f"{path / MCF_STATE} is damaged (no step, config or target weights)")
    missing = [k for k in ("train", "model") if not isinstance(state["config"].get(k), dict)]
    train = state["config"].get("train") or {}
    if missing or not all(isinstance(train.get(k), int) for k in ("batch_size", "accum_steps")) \
            or not isinstance(state.get("world_size"), int):
        raise CheckpointError(f"{path / MCF_STATE} is damaged (its config lacks {', '.join(missing) or 'train sizes'}, "
                              "or no world size)")
    return state


def check_same_model(path: Path, state: dict[str, Any], model: dict[str, Any]) -> None:
    """A checkpoint resumes only into the model that wrote it (``model.name``, ``model.img_size``); one line
    naming both otherwise, before any weight is loaded."""
    saved = state["config"]["model"]
    sizes = saved.get("img_size"), model.get("img_size")  # None: the model's default (compared when both are set)
    if saved.get("name") != model.get("name") or None not in sizes and sizes[0] != sizes[1]:
        def show(m: dict[str, Any]) -> str:
            return m.get("name") if m.get("img_size") is None else f"{m.get('name')} at {m.get('img_size')} px"

        raise CheckpointError(f"{path} holds a {show(saved)} model, this run builds {show(model)}: resume with "
                              f"--model {saved.get('name')} (and its model.img_size), or start a new run in another "
                              "--output-dir (model.init_from can start one from exported weights)")


def _check_same_layout(path: Path, config: dict[str, Any], engine: Any) -> None:
    """DeepSpeed's shards only load into the ZeRO stage and precision that wrote them."""
    saved_zero = (config.get("deepspeed") or {}).get("zero")
    saved_precision = (config.get("train") or {}).get("precision")
    zero = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else saved_zero
    precision = ("bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32") \
        if hasattr(engine, "bfloat16_enabled") else saved_precision
    if (saved_zero, saved_precision) != (zero, precision):
        raise CheckpointError(
            f"{path} was written with ZeRO {saved_zero} in {saved_precision}, this run uses ZeRO {zero} in "
            f"{precision}: resume with --zero {saved_zero} --precision {saved_precision} (or export it with "
            "`mcf export-fp32` and start a new run from those weights)"
        )


def is_partitioned(path: Path) -> bool:
    """Whether DeepSpeed's optimizer state in ``path`` is split over ranks (ZeRO 1-3)."""
    return any(path.glob("*optim_states.pt"))


def load_checkpoint(engine: Any, path: Path, rank: int, world_size: int, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Restore the engine (module, optimizer, ZeRO shards) from ``path``, written with ``state`` (:func:`read_state`).

    On the checkpoint's own number of ranks: returns ``[this rank's state]``. On another number:
    ZeRO 1-3 state is loaded from the universal copy (:func:`universal_copy`; the engine must have
    been built with ``checkpoint.load_universal``), and the states of all old ranks are returned.
    Every file is read with :func:`mcf.serialization.safe_load` (DeepSpeed's reads too).
    """
    saved_world = int(state.get("world_size", world_size))
    ranks = [rank] if saved_world == world_size else list(range(saved_world))
    files = [path / rank_file(r) for r in ranks]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
    if saved_world == world_size:
        _check_same_layout(path, state["config"], engine)
    universal = saved_world != world_size and is_partitioned(path)
    load_dir = universal_copy(path, rank) if universal else path
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer inside DeepSpeed's wrapper
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    integrity.writer_of(engine)  # DeepSpeed's own reads go through safe_load from here on
    try:
        with safe_torch_load():
            load_path, _ = engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
    except RuntimeError as e:  # torch's load_state_dict: "size mismatch for ...", "Missing key(s) ..."
        first = str(e).strip().splitlines()
        detail = next(
            (x.strip() for x in first if "size mismatch" in x or "Missing key" in x), first[0] if first else ""
        )
        raise CheckpointError(f"{path} does not fit this run's model ({detail[:300]}): resume it with the model and "
                              "model.img_size that wrote it") from None
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {load_dir}")
    if universal:
        repair_universal_load(base, hyper)
    return [safe_load(f) for f in files]


CONVERT_WAIT_S = 6 * 3600.0  # how long the other ranks wait for rank 0's conversion (ViT-H from 256 ranks: well under)
CONVERT_POLL_S = (0.05, 5.0)  # first and longest pause between two looks at the result (doubling)
CONVERT_LOG_S = 60.0  # a progress line this often while waiting
CONVERT_LOCK_STALE_S = 120.0  # a conversion whose heartbeat (mcf.train.runlock) is older than this was interrupted


def universal_copy(path: Path, rank: int, wait_s: float = CONVERT_WAIT_S) -> Path:
    """``path/universal``: DeepSpeed's universal checkpoint of the ZeRO 1-3 step directory ``path``,
    converted by rank 0 on first use, reused when complete.

    The conversion reads every shard (tens of minutes for ViT-L/H written by many ranks); the other
    ranks wait for it without a collective, which the process group's timeout would abort: they poll
    the rendezvous store (no shared file system needed) with a deadline of ``wait_s`` seconds and log
    every minute what they wait for. Rank 0 converts under a lock in the scratch folder
    (:class:`~mcf.train.runlock.RunLock`, heartbeat): a conversion still alive elsewhere (a previous
    attempt of the job that has not exited) is waited for, never deleted; an interrupted one (stale
    lock) is started over.
    """
    out = path / UNIVERSAL
    key = f"mcf/universal/{_from_rank0(secrets.token_hex(8) if rank == 0 else '')}"  # fast: every rank is here
    if rank == 0:
        try:
            error = "" if out.is_dir() else _convert_universal(path, out, wait_s)
        except BaseException as e:  # the others must not wait for a result that will never come
            _store_set(key, f"rank 0 stopped: {type(e).__name__}: {e}")
            raise
        _store_set(key, error or "ok")
    else:
        error = _store_wait(
            key,
            wait_s,
            f"rank 0's conversion of {path} to DeepSpeed's universal checkpoint (for a new number of ranks)",
        )
        error = "" if error == "ok" else error
    if error:
        raise CheckpointError(
            f"cannot convert {path} for another number of ranks ({error}); resume it on the number of ranks "
            "that wrote it"
        )
    return out


def _convert_universal(path: Path, out: Path, wait_s: float) -> str:
    """Rank 0: convert ``path`` into ``out`` (or wait for the live conversion that holds the lock); the error, or ''."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    from mcf.errors import RunLockedError
    from mcf.train.runlock import LOCK_NAME, RunLock

    # The converter writes a "latest_universal" file beside its output folder: convert inside a scratch
    # folder, then move the result into place (an interrupted conversion leaves only scratch).
    scratch = path / f".{UNIVERSAL}.tmp"
    try:
        lock = RunLock(scratch, CONVERT_LOCK_STALE_S).acquire()
    except RunLockedError as e:
        log.warning("another process is converting %s (%s): waiting for it instead of starting over", path, e)
        deadline = time.monotonic() + wait_s
        while not out.is_dir():
            if time.monotonic() > deadline:
                return f"the conversion by another process did not finish within {wait_s:.0f} s"
            if not (scratch / LOCK_NAME).exists():  # it ended without a result: convert here
                return _convert_universal(path, out, wait_s)
            time.sleep(CONVERT_POLL_S[1])
        return ""
    try:
        for leftover in scratch.iterdir():  # an interrupted attempt's partial output (its lock was stale)
            if not leftover.name.startswith(LOCK_NAME):
                shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
        args = argparse.Namespace(input_folder=str(path), output_folder=str(scratch / UNIVERSAL), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        log.info("converting %s to DeepSpeed's universal checkpoint for a new number of ranks (the other ranks wait "
                 "for it without a collective)", path)
        t0 = time.monotonic()
        chatter = io.StringIO()  # the converter prints its arguments and progress bars
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), safe_torch_load():
            ds_to_universal.main(args)  # reads every shard with full unpickling (weights-only off)
        os.replace(scratch / UNIVERSAL, out)
        log.info("converted %s in %.0f s", path, time.monotonic() - t0)
        error = ""
    except Exception as e:  # noqa: BLE001 - any converter failure means this checkpoint cannot be re-split
        error = f"{type(e).__name__}: {e}"
    finally:
        lock.release()
    shutil.rmtree(scratch, ignore_errors=True)
    return error


def _store():
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return dist.distributed_c10d._get_default_store()


def _store_set(key: str, value: str) -> None:
    store = _store()
    if store is not None:
        store.set(key, value)


def _store_wait(key: str, wait_s: float, what: str) -> str:
    """The value rank 0 sets under ``key`` in the rendezvous store, polled (a store read, not a collective)
    until ``wait_s`` seconds have passed; a progress line every :data:`CONVERT_LOG_S` seconds."""
    store = _store()
    if store is None:
        return "ok"
    t0 = time.monotonic()
    last_log, pause = t0, CONVERT_POLL_S[0]
    log.info("waiting for %s (up to %.0f s)", what, wait_s)
    while not store.check([key]):
        now = time.monotonic()
        if now - t0 > wait_s:
            return f"waited {wait_s:.0f} s for {what} in vain"
        if now - last_log >= CONVERT_LOG_S:
            log.info("still waiting for %s: %.0f s so far (deadline %.0f s)", what, now - t0, wait_s)
            last_log = now
        time.sleep(pause)
        pause = min(CONVERT_POLL_S[1], pause * 2)
    return store.get(key).decode()


def _from_rank0(value: str) -> str:
    """Rank 0's ``value`` on every rank (a collective when there are several ranks)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- consolidation --------------------------------------------------------------------------------
def _online_fp32(step_dir: Path) -> dict[str, torch.Tensor]:
    """The online model's fp32 weights from a DeepSpeed tag directory, any ZeRO stage/precision."""
    if (step_dir / ONLINE_FP32).is_file():
        files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
        module = safe_load(files[0])["module"] if files else {}
        masters = safe_load(step_dir / ONLINE_FP32)
        return {
            k: masters[k] if k in masters else (v.float() if v.is_floating_point() else v) for k, v in module.items()
        }
    has_zero_shards = any(step_dir.glob("*zero_pp_rank_*optim_states.pt"))
    if has_zero_shards:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with safe_torch_load():  # zero_to_fp32 reads with full unpickling (weights-only off)
                sd = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
            return {k: v.float() for k, v in sd.items()}
        except ValueError as e:  # ZeRO-0 bf16 (BF16_Optimizer) shards are not ZeRO partitions
            if "zero" not in str(e).lower():
                raise
    files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{step_dir} holds no DeepSpeed model states")
    sd = safe_load(files[0])["module"]
    if any(v.dtype != torch.float32 for v in sd.values() if v.is_floating_point()):
        log.warning(
            "%s: no fp32 masters found; the module's %s weights are upcast", step_dir, next(iter(sd.values())).dtype
        )
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def load_consolidated(path: str | os.PathLike) -> dict[str, Any]:
    """One fp32 dict from a run folder, a ``step_*`` directory (any ZeRO stage) or an exported file.

    Returns ``{"online": MCFOnline state dict (encoder.*, projector.*, predictor.*, decoder.*),
    "target": EMA target state dict, "config": resolved config dict, "step": int}``, all fp32.
    """
    p = Path(path)
    if p.is_file():
        d = safe_load(p)
        if not isinstance(d, dict) or not {"online", "target", "config", "step"} <= set(d):
            raise CheckpointError(f"{p} is not an `mcf export-fp32` file (keys online, target, config, step)")
        return d
    step_dir = resolve_checkpoint(p)
    state = read_state(step_dir)
    return {"online": _online_fp32(step_dir), "target": {k: v.float() for k, v in state["target"].items()},
            "config": state["config"], "step": int(state["step"])}


def export_fp32(src: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    out = Path(out)
    if out.is_dir():
        raise StorageError(f"{out} is a directory: name the file to write (e.g. {out / 'mcf_fp32.pt'})")
    d = load_consolidated(src)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(integrity.describe_write_error(out, e)) from None
    writer = integrity.CheckpointWriter(None)
    writer.write(d, out)
    if writer.error:
        raise StorageError(writer.error)
    return d
