"""The pre-training loop: the online model in a DeepSpeed engine, the EMA target and the frozen
teacher beside it, exact resume, and rank-0 outputs.

One optimizer step = ``accum_steps`` micro-batches. Per step mcf's host waits once, on a 3-float
all-reduce of (non-finite losses seen, stop requested, data error): a non-finite loss is caught before
the update is applied and every rank stops after the same step on SIGTERM/SIGUSR1 (DeepSpeed's own
syncs per precision and ZeRO stage: README). Loss values stay on the device and are reduced every
``log_every`` steps. A watchdog thread (:mod:`mcf.train.watchdog`) ends a rank whose step stalls.
"""

from __future__ import annotations

import logging
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from mcf import threads
from mcf.config import Config, dump_config
from mcf.configtree import to_dict
from mcf.data.formats.factory import precheck
from mcf.dist import rank0_decides
from mcf.errors import CheckpointError, ConfigError, DataError, StorageError, UnsafeCheckpointError, UserError
from mcf.models import create_model_from_config
from mcf.train import checkpoint as ckpt
from mcf.train import elastic
from mcf.train.ds_internals import fp32_masters
from mcf.train.ema import TargetEMA
from mcf.train.engine import (
    PRECISION_DTYPES,
    CastInput,
    build_ds_config,
    cast_floating_buffers,
    init_distributed,
    set_tf32,
    setup_env,
)
from mcf.train.integrity import describe_write_error
from mcf.train.metrics import RunLogger, flatten, save_reconstruction, ui_command
from mcf.train.optim import (
    build_optimizer,
    describe_schedule,
    lr_at,
    momentum_at,
    param_groups,
    peak_lr,
    set_lr,
    warmup_steps,
)
from mcf.train.perf import Throughput
from mcf.train.profile import StepProfiler
from mcf.train.rundir import check_not_in_data, check_start
from mcf.train.runlock import RunLock
from mcf.train.signals import REQUEUE_EXIT_CODE, StopRequest
from mcf.train.tracking import check_reachable, resolve_tracking
from mcf.train.watchdog import StepWatchdog

log = logging.getLogger(__name__)

TERMS = ("loss", "perceptual", "contrastive", "pixel")
RECON_IMAGES = 8
# config keys whose change on resume alters nothing of the training (where it logs, how it shows
# progress, where the folder is): not worth the "changed config keys" warning
HARMLESS_ON_RESUME = frozenset({"train.resume", "train.output_dir", "train.lock_stale_s", "logging.progress",
                                "logging.tracking_uri", "logging.experiment", "logging.system_metrics",
                                "logging.profile_step", "logging.log_every", "logging.recon_every"})


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the last complete checkpoint is intact."""


# a step's last micro-batch, first RECON_IMAGES of it: images (N, 3, H, W), predictions, masks (N, L)
Recon = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step hands to the periodic actions."""

    momentum: float  # the EMA momentum the step used (logged)
    stop: bool  # a stop signal reached some rank: checkpoint after this step and exit 3
    last: Recon  # for the reconstructions


def due_after(step: int, total: int, every: Mapping[str, int]) -> tuple[str, ...]:
    """The periodic actions after optimizer step ``step`` (1-based, as logged) of ``total``, in the order they run.

    ``every`` maps ``log``, ``reconstructions``, ``monitor``, ``checkpoint`` to their period in steps (0: never;
    ``log`` and ``checkpoint`` are >= 1 by the config's validation). The log also comes after the last step, so the
    run's final loss is always logged; the last step's checkpoint and reconstructions, if not due here, come from
    :func:`due_at_end`. The step count is global, so a resumed run keeps the schedule of the run it continues."""
    names = []
    if step % every["log"] == 0 or step == total:
        names.append("log")
    names += [name for name in ("reconstructions", "monitor", "checkpoint") if every[name] and step % every[name] == 0]
    return tuple(names)


def due_at_end(step: int, every: Mapping[str, int], last_saved: int, trained: bool) -> tuple[str, ...]:
    """What the end of the run adds after step ``step``: the final checkpoint unless step ``step`` is saved already
    (``last_saved``: the newest step this process saved or resumed from, -1 if none), and the reconstructions of
    the last micro-batch unless this process ``trained`` no step or :func:`due_after` drew them at this step."""
    names = []
    if last_saved != step:
        names.append("checkpoint")
    if trained and "reconstructions" not in due_after(step, step, every):
        names.append("reconstructions")
    return tuple(names)


def _default_loader_factory() -> Callable[..., Any]:
    try:
        from mcf.data import build_pretrain_loader
    except ImportError as e:
        raise ConfigError(f"the data pipeline is not available ({e})") from None
    return build_pretrain_loader


class Trainer:
    """``Trainer(cfg).fit()`` → exit status: 0 when done, :data:`REQUEUE_EXIT_CODE` when stopped by a signal.

    ``loader_factory`` (default ``mcf.data.build_pretrain_loader``) builds the per-rank loader with
    the keywords ``img_size, batch_size, rank, world_size, seed, device``.
    ``monitor_factory`` ``(cfg, device) -> monitor`` builds the representation monitor that
    ``monitor.every > 0`` asks for (``mcf pretrain`` passes :func:`mcf.downstream.monitor.build_monitor`:
    the trainer does not import the evaluation package above it).
    """

    def __init__(
        self,
        cfg: Config,
        loader_factory: Callable[..., Any] | None = None,
        monitor_factory: Callable[..., Any] | None = None,
    ):
        self.cfg = cfg
        self.loader_factory = loader_factory
        self.monitor_factory = monitor_factory

    # -- setup ------------------------------------------------------------------------------------
    def _setup(self) -> None:
        """Everything before the first step, in this order: the start-up checks (cheap, before any heavy work),
        the model, the process group and the resume decision, the loader, the DeepSpeed engine and the EMA,
        the training state (fresh or resumed), the run's outputs."""
        startup_error = self._start_up()
        model = self._build_model(startup_error)
        self._join_ranks(startup_error)
        self._place_model(model)
        self._build_loader()
        self._build_engine()
        self._start_state()
        self._start_outputs()

    def _start_up(self) -> UserError | None:
        """Rank 0's preflight, the resume plan and the DeepSpeed config; → rank 0's start-up error (raised here
        with one rank, otherwise once every rank has joined the process group)."""
        cfg = self.cfg
        # gloo's all_gather_into_tensor (the contrastive keys) warns on every call
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
        env_rank, world_size, _ = setup_env()
        self.out = Path(cfg.train.output_dir)
        # rank 0 locks the output folder before anything reads or writes it, and probes MLflow; alone it
        # fails at once, otherwise every rank learns the verdict right after the process group starts
        startup_error = self._preflight() if env_rank == 0 else None
        if startup_error is not None and world_size == 1:
            raise startup_error
        # a first look (names and markers: a wrong path fails early, and the batch plan and DeepSpeed config
        # are known before any heavy work); rank 0 checks the files once the process group is up
        self.resume_dir = ckpt.find_resume(cfg.train.resume, self.out, verify=False)
        # the batch policy on another number of ranks, before any heavy work
        self.ds_config = self._plan_resume(world_size)
        if cfg.monitor.every > 0 and self.monitor_factory is None:
            raise ConfigError(f"monitor.every={cfg.monitor.every} needs a monitor: pass Trainer(monitor_factory=...) "
                              "(mcf pretrain passes mcf.downstream.monitor.build_monitor), or set monitor.every=0")
        self.make_loader = self.loader_factory or _default_loader_factory()
        return startup_error

    def _build_model(self, startup_error: UserError | None) -> Any:
        """The data's first check, the seeds, and the model on the CPU (None on a rank 0 whose start-up failed)."""
        cfg = self.cfg
        precheck(cfg.data.path, cfg.data.lmdb_keys)  # missing or damaged data fails before the model is built
        seed = cfg.train.seed
        torch.manual_seed(seed)  # identical initial weights on every rank
        np.random.seed(seed)
        random.seed(seed)
        # a missing teacher fails here, before DeepSpeed
        return create_model_from_config(cfg) if startup_error is None else None

    def _join_ranks(self, startup_error: UserError | None) -> None:
        """The process group; rank 0 decides the checkpoint to resume (or raises its start-up error on every rank)
        and writes config.yaml."""
        cfg = self.cfg
        self.rank, self.world_size, self.device = init_distributed(cfg.train.precision, cfg.deepspeed.timeout_s)
        set_tf32(self.device, cfg.train.tf32)
        verified = rank0_decides(lambda: self._decide_resume(startup_error))
        if verified != self.resume_dir or (verified is not None and self.resume_state is None):
            self.resume_dir = verified  # rank 0 fell back past a damaged checkpoint: plan from the one it chose
            self.ds_config = self._plan_resume(self.world_size)
        if self.rank == 0:
            try:
                (self.out / "config.yaml").write_text(dump_config(cfg))
            except OSError as e:
                raise StorageError(describe_write_error(self.out / "config.yaml", e)) from None

    def _place_model(self, model: Any) -> None:
        model.set_distributed(self.rank, self.world_size)
        model.set_activation_checkpointing(self.cfg.train.activation_checkpointing)
        self.model = model.to(self.device).train()
        self.dtype = PRECISION_DTYPES[self.cfg.train.precision]
        if self.dtype != torch.float32:  # frozen: no master copy needed; the EMA target stays fp32
            model.perceptual.teacher.to(self.dtype)

    def _build_loader(self) -> None:
        """This rank's loader and the run's length, global batch and lr schedule."""
        cfg, t = self.cfg, self.cfg.train
        self.loader = self.make_loader(cfg.data, img_size=self.model.spec.img_size, batch_size=t.batch_size,
                                       rank=self.rank, world_size=self.world_size, seed=t.seed, device=self.device)
        self.steps_per_epoch = len(self.loader) // t.accum_steps
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(self.loader)} batches per rank per epoch are fewer than "
                            f"train.accum_steps={t.accum_steps}")
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.global_batch = t.batch_size * t.accum_steps * self.world_size
        self.peak_lr = peak_lr(cfg.optim, self.global_batch)
        self.warmup = warmup_steps(cfg.optim, self.steps_per_epoch)

    def _build_engine(self) -> None:
        """The online model in the DeepSpeed engine with its optimizer; the fp32 EMA target beside it."""
        import deepspeed

        cfg, t, model = self.cfg, self.cfg.train, self.model
        # fixed online parameters (the sin-cos position embeddings) have no fp32 master in the optimizer:
        # keep their fp32 values from before DeepSpeed casts or partitions them
        self.frozen_fp32 = {n: p.detach().clone() for n, p in model.online.named_parameters() if not p.requires_grad}
        self.optimizer = build_optimizer(param_groups(model.online, cfg.optim.weight_decay), cfg.optim, self.peak_lr,
                                         self.device)
        self.engine, _, _, _ = deepspeed.initialize(model=model.online, optimizer=self.optimizer, config=self.ds_config,
                                                    dist_init_required=False)
        if self.dtype != torch.float32:  # ZeRO-3 leaves buffers (BatchNorm statistics) in fp32; stages 0-2 cast them
            cast_floating_buffers(self.engine.module, self.dtype)
        if t.compile:
            self.engine.compile()
        self.online = CastInput(self.engine, self.dtype)
        # the EMA stays fp32, kept where the fp32 masters are; the target computes in its forward dtype
        self.ema = TargetEMA(model.target, self.engine, self.dtype if t.target_precision == "auto" else torch.float32,
                             fixed=self.frozen_fp32, source=t.ema_source)

    def _start_state(self) -> None:
        """The per-rank generators, step and loss sums: fresh, or restored from the checkpoint to resume."""
        seed = self.cfg.train.seed
        # masks come from a generator of their own (per rank), so no other RNG consumer (data-loader
        # workers, libraries) can shift them between an interrupted and an uninterrupted run
        self.mask_gen = torch.Generator(device=self.device)
        self.mask_gen.manual_seed(seed * 1_000_003 + 7919 * (self.rank + 1))
        torch.manual_seed(seed + 104_729 * (self.rank + 1))
        self.step, self.epoch = 0, 0
        self.acc = torch.zeros(len(TERMS) + 1, device=self.device)  # sums of TERMS, micro-batch count
        self.steps_since_log = 0
        if self.resume_dir is not None:
            self._restore(self.resume_dir)
        elif self.rank == 0:
            ckpt.prune(self.out / "checkpoints", self.cfg.checkpoint.keep_last)

    def _start_outputs(self) -> None:
        """The run logger (metrics.jsonl, MLflow), the monitor, the throughput meter, and rank 0's opening line."""
        cfg = self.cfg
        self.logger = RunLogger(cfg, self.out, self.rank, self.step if self.resume_dir is not None else None)
        # on every rank: under ZeRO-3 its forward passes are collectives that all ranks must join
        self.monitor = self.monitor_factory(cfg, self.device) if cfg.monitor.every > 0 else None
        # rank 0 logs: model FLOPs per image (counted once) and the device's peak, for TFLOP/s and MFU
        self.throughput = Throughput(cfg, self.device, self.dtype, self.world_size) if self.rank == 0 else None
        if self.throughput is not None:
            self.logger.log_params({f"perf.{k}": v for k, v in self.throughput.params().items()})
        if self.rank == 0:
            log.info("%d rank(s) on %s, %s, ZeRO %d; %d steps (%d per epoch); %s; %s", self.world_size, self.device,
                     cfg.train.precision, cfg.deepspeed.zero, self.total_steps, self.steps_per_epoch,
                     describe_schedule(cfg, self.global_batch, self.steps_per_epoch, self.total_steps),
                     threads.describe())

    def _preflight(self) -> UserError | None:
        """Rank 0: lock the output folder (held until :meth:`fit` returns) and check MLflow answers."""
        try:
            check_not_in_data(self.out, self.cfg.data.path)
            self.lock = RunLock(self.out, self.cfg.train.lock_stale_s).acquire()
            check_start(self.out, self.cfg.train.resume, self.cfg.train.overwrite_run)
            ckpt.make_root(self.out / "checkpoints")
            uri = resolve_tracking(self.cfg.logging.tracking_uri, self.out, self.cfg.logging.experiment).uri
            if uri is not None:
                check_reachable(uri)
        except UserError as e:
            return e
        return None

    def _decide_resume(self, startup_error: UserError | None) -> Path | None:
        """Rank 0: the checkpoint to resume, verified against its marker (see :func:`ckpt.find_resume`)."""
        if startup_error is not None:
            raise startup_error
        return ckpt.find_resume(self.cfg.train.resume, self.out)

    def _plan_resume(self, world_size: int) -> dict[str, Any]:
        """Read the checkpoint to resume (``self.resume_dir``), apply ``train.elastic`` when it was written by
        another number of ranks (``train.accum_steps``, ``self.resized``), and return the DeepSpeed config
        (flag/JSON conflicts fail here too), set to load a universal checkpoint when partitions must be re-split."""
        cfg = self.cfg
        try:
            self.resume_state = ckpt.read_state(self.resume_dir) if self.resume_dir is not None else None
        except UnsafeCheckpointError:
            raise
        except CheckpointError:  # damaged: rank 0's check of the files decides (it may fall back to an older one)
            self.resume_state = None
        self.resized = False
        if self.resume_state is not None:
            ckpt.check_same_model(self.resume_dir, self.resume_state, to_dict(cfg)["model"])
            saved = elastic.RunShape.of_checkpoint(self.resume_state)
            cfg.train.accum_steps = elastic.plan_accum_steps(cfg.train.elastic, saved, cfg.train.batch_size,
                                                             cfg.train.accum_steps, world_size)
            self.resized = saved.world_size != world_size
        ds_config = build_ds_config(cfg, world_size)
        # ZeRO 1-3 partitions are re-split from the universal copy
        if self.resized and ckpt.is_partitioned(self.resume_dir):
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        return ds_config

    def _restore(self, path: Path) -> None:
        state = self.resume_state
        rstates = ckpt.load_checkpoint(self.engine, path, self.rank, self.world_size, state)
        self.ema.load_state_dict(state["target"])  # this rank's part of the whole fp32 EMA
        self.step = int(state["step"])
        if not self.resized:
            rstate = rstates[0]
            ckpt.set_rng_state(rstate["rng"])
            self.mask_gen.set_state(rstate["mask_gen"])
        else:  # another number of ranks: the data position is global, the rest is re-derived per new rank
            rstate = elastic.resplit_rank_state(rstates, self.rank)
            elastic.reseed(self.cfg.train.seed, self.rank, self.step, self.mask_gen)
            if self.rank == 0:
                log.info("resumed on %d rank(s) from a checkpoint of %d: the rest of epoch %d is re-split over the new "
                         "ranks",
                         self.world_size, len(rstates), rstate["loader"]["epoch"])
        self.loader.load_state_dict(rstate["loader"])
        self.epoch = self.loader.epoch
        # the checkpoint closed an epoch (or left only a tail shorter than a global batch)
        if self.loader.batches_left() == 0:
            self.epoch += 1
        self.acc = rstate["acc"].to(self.device)
        self.steps_since_log = int(rstate["steps_since_log"])
        self.resume_state = None  # the EMA weights it holds are in the target now
        if self.rank == 0:
            old, new = flatten(state["config"]), flatten(to_dict(self.cfg))
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in HARMLESS_ON_RESUME)
            if changed:
                log.warning("resuming with changed config keys: %s", ", ".join(changed))
            log.info("resumed from %s (step %d, epoch %d)", path, self.step, self.epoch)
            ckpt.prune(path.parent, self.cfg.checkpoint.keep_last, upto=self.step)

    # -- state ------------------------------------------------------------------------------------
    def _save(self) -> Path:
        mcf_state = {"step": self.step, "world_size": self.world_size, "config": to_dict(self.cfg),
                     "target": self.ema.state_dict()}  # the whole fp32 EMA (a collective when it is sharded)
        rank_state = {"loader": self.loader.state_dict(),
                      "rng": ckpt.rng_state(), "mask_gen": self.mask_gen.get_state(), "acc": self.acc.cpu(),
                      "steps_since_log": self.steps_since_log}
        online_fp32 = None
        if self.cfg.train.precision != "fp32" and self.cfg.deepspeed.zero == 0 and self.rank == 0:
            names = [n for n, p in self.engine.module.named_parameters() if p.requires_grad]
            masters = fp32_masters(self.engine, names, self.cfg.train.precision, 0)
            online_fp32 = {k: v.detach().float().cpu() for k, v in masters.items()}
        path = ckpt.save_checkpoint(self.engine, self.out / "checkpoints", self.step, mcf_state, rank_state, self.rank,
                                    self.cfg.checkpoint.keep_last, online_fp32, hash_files=self.cfg.checkpoint.hash)
        self.last_saved = self.step
        if self.rank == 0:
            log.info("checkpoint %s", path)
        return path

    def _batches(self) -> Iterator[torch.Tensor]:
        while True:
            self.loader.set_epoch(self.epoch)
            yield from self.loader
            self.epoch += 1

    # -- loop -------------------------------------------------------------------------------------
    def fit(self) -> int:
        self.logger = self.loader = None
        self.lock: RunLock | None = None
        status = "FAILED"
        try:
            self._setup()
            rc = self._loop()
            status = "FINISHED" if rc == 0 else "KILLED"
            return rc
        finally:
            try:
                if getattr(self, "loader", None) is not None:
                    self.loader.close()  # the workers now, on every path: nothing else stops them (they ignore SIGTERM)
                if self.logger is not None:
                    self.logger.close(status)
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()
            finally:
                if self.lock is not None:
                    self.lock.release()

    def _loop(self) -> int:
        """The training run, one optimizer step per iteration; → exit status (see :meth:`fit`)."""
        self._begin_loop()
        last: Recon | None = None  # the last trained micro-batch, for the end-of-run reconstructions
        try:
            while self.step < self.total_steps:
                self.profiler.begin(self.step + 1)
                self.watchdog.step(self.step + 1)
                outcome = self._train_step()
                self.step += 1
                self.profiler.end(self.step)
                self.steps_since_log += 1
                self.bar.update(1)
                last = outcome.last
                if self._periodic(outcome):
                    return REQUEUE_EXIT_CODE
            if self._end_of_run(last):
                return REQUEUE_EXIT_CODE
        finally:
            self._end_loop()
        if self.rank == 0:
            self._summary()
        return 0

    def _begin_loop(self) -> None:
        """The loop's companions (stop handlers, watchdog, progress bar, profiler, batch stream) and its counters."""
        from tqdm import tqdm

        t, lg = self.cfg.train, self.cfg.logging
        self.stop = StopRequest().install()
        self.watchdog = StepWatchdog(self.rank, t.step_timeout_s, t.step_timeout_slow_s, t.stop_grace_s,
                                     self.stop).start()
        self.batches = self._batches()
        self.last_saved = self.step if self.resume_dir is not None else -1
        # a bar on a terminal; under slurm or `2>file` a bar is a frame per update, so plain lines instead
        self.plain_lines = self.rank == 0 and (not lg.progress or not sys.stderr.isatty())
        self.bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0 or self.plain_lines,
                        dynamic_ncols=True, desc="pretrain")
        self.t_log = self.t_start = time.perf_counter()  # t_log: start of the current log window
        self.first_step = self.step
        self.data_wait_s = 0.0  # host time in next(batches) since the last log
        self.side_work: dict[str, float] = {}  # checkpoint/reconstructions/monitor: seconds since the last log
        self.side_total_s = 0.0
        self.last_record: dict[str, Any] | None = None
        self.profiler = StepProfiler(lg.profile_step, self.out, self.rank, self.device)
        self.every = {"log": lg.log_every, "reconstructions": lg.recon_every, "monitor": self.cfg.monitor.every,
                      "checkpoint": self.cfg.checkpoint.every}

    def _end_loop(self) -> None:
        """On every way out of the loop: the bar, the watchdog thread, the signal handlers, the batch stream."""
        self.bar.close()
        self.watchdog.close()
        self.stop.restore()
        self.batches.close()  # drops the loader's iterators now (a fresh DataLoader per epoch stops its workers then)

    # -- one optimizer step -----------------------------------------------------------------------
    def _train_step(self) -> StepOutcome:
        """Optimizer step ``self.step + 1``: ``accum_steps`` micro-batches, the step's one sync (which raises on bad
        data or a non-finite loss before anything is applied), the optimizer step at the scheduled lr, the EMA."""
        accum = self.cfg.train.accum_steps
        nonfinite = torch.zeros((), device=self.device)  # micro-batches of this step with a non-finite loss
        data_error: DataError | None = None
        for micro in range(accum):
            images, data_error = self._next_batch(data_error)
            out = self._forward_backward(images)
            nonfinite += self._accumulate(out)
            if micro < accum - 1:
                self.engine.step()  # not a boundary: DeepSpeed only accumulates
        last = (images[:RECON_IMAGES], out.pred[:RECON_IMAGES].detach(), out.mask[:RECON_IMAGES])
        stop = self._step_sync(nonfinite, data_error)
        self._optimizer_step()
        momentum = self._ema_update()
        return StepOutcome(momentum=momentum, stop=stop, last=last)

    def _next_batch(self, data_error: DataError | None) -> tuple[torch.Tensor, DataError | None]:
        """The next micro-batch, (B, 3, H, W) fp32, normalised, and this step's data error so far. After a
        :class:`DataError` on this rank the step goes on with blank batches: the other ranks are already inside
        this step's collectives, and every rank stops together at the step's sync, before the update."""
        if data_error is None:
            self.watchdog.phase("data")
            try:
                t_data = time.perf_counter()
                with record_function("mcf.data"):
                    images = next(self.batches)
                self.data_wait_s += time.perf_counter() - t_data
                return images, None
            except DataError as e:  # too many bad samples on this rank
                data_error = e
        size = self.cfg.data.img_size or self.model.spec.img_size
        return torch.zeros(self.cfg.train.batch_size, 3, size, size, device=self.device), data_error

    def _forward_backward(self, images: torch.Tensor) -> Any:
        """One micro-batch: its masks (from the run's own generator), the forward through online, target and
        teacher, and the online model's backward. Returns the model's output (loss terms, predictions, mask)."""
        noise = torch.rand(2, images.shape[0], self.model.num_patches, generator=self.mask_gen,
                           device=self.device)  # (2, B, L): online / target masks
        self.watchdog.phase("forward/backward")
        out = self.model(images, noise[0], noise[1], online=self.online)
        with record_function("mcf.backward"):
            self.engine.backward(out.loss)
        return out

    def _accumulate(self, out: Any) -> torch.Tensor:
        """Adds a micro-batch's loss terms to ``self.acc`` on the device; → 1.0 if its loss is not finite, else 0.0."""
        loss = out.loss.detach().float()
        bad = (~torch.isfinite(loss)).float()
        self.acc[:len(TERMS)] += torch.stack([loss, *(out.losses[k].float() for k in TERMS[1:])])
        self.acc[-1] += 1
        return bad

    def _step_sync(self, nonfinite: torch.Tensor, data_error: DataError | None) -> bool:
        """The one host sync per step: (non-finite losses, stop requested, ranks with a data error), summed over
        ranks. Raises on a data error on any rank or a non-finite loss (not under fp16, whose loss scaler skips the
        step); → whether a stop was requested on any rank."""
        # filled on the device, since a tensor built from a host list would cost a second sync on a GPU
        self.watchdog.phase("sync (the step's all-reduce: waits for every rank)")
        with record_function("mcf.sync"):
            flags = torch.zeros(3, device=self.device)
            flags[0] = nonfinite
            flags[1] = float(self.stop.requested)
            flags[2] = float(data_error is not None)
            if self.world_size > 1:
                torch.distributed.all_reduce(flags)
            n_bad, stop_now, data_ranks = flags.tolist()
        if data_ranks:
            if data_error is not None:
                raise data_error
            raise DataError(f"{int(data_ranks)} other rank(s) stopped on bad data at step {self.step + 1} (their log "
                            "says which files); this rank's data was fine. Nothing of this step was applied")
        if n_bad and self.cfg.train.precision != "fp16":
            saved = self.last_saved
            where = f"; the last good checkpoint is {ckpt.step_dir_name(saved)}" if saved >= 0 else ""
            raise TrainingError(f"non-finite loss at step {self.step} ({int(n_bad)} micro-batch(es) over all ranks): "
                                f"stopped before applying the update{where}; lower optim.lr/blr or use "
                                "train.precision=fp32")
        return bool(stop_now)

    def _optimizer_step(self) -> None:
        """The learning rate of step ``self.step`` (0-based), then DeepSpeed's optimizer step."""
        optim = self.cfg.optim
        set_lr(self.optimizer, lr_at(self.step, peak=self.peak_lr, min_lr=optim.min_lr, warmup=self.warmup,
                                     total=self.total_steps))
        self.watchdog.phase("optimizer step")
        with record_function("mcf.optimizer"):
            self.engine.step()  # fp16: DeepSpeed skips an overflowing step and counts it

    def _ema_update(self) -> float:
        """The target's EMA step after the optimizer step; → the momentum it used (logged)."""
        momentum = momentum_at(self.step, self.cfg.momentum, self.total_steps)
        with record_function("mcf.ema"):  # no communication; starts the target weights' all-gather if sharded
            self.ema.update(momentum)
        return momentum

    # -- periodic actions -------------------------------------------------------------------------
    def _periodic(self, outcome: StepOutcome) -> bool:
        """The actions :func:`due_after` names for the step just taken, in order, with the stop request's
        checkpoint before the periodic one; → True when the run stops here (checkpointed, exit 3)."""
        self.watchdog.phase("logging")
        due = due_after(self.step, self.total_steps, self.every)
        if "log" in due:
            self._log(outcome.momentum)
        if "reconstructions" in due:
            self._side_work("reconstructions", "reconstruction", self._reconstruction, outcome.last)
        if "monitor" in due:
            self._side_work("monitor", "monitor evaluation", self._monitor)
        if outcome.stop:
            self._stop_checkpoint()
            return True
        if "checkpoint" in due:
            self._side_work("checkpoint", "checkpoint", self._save)
        return False

    def _stop_checkpoint(self) -> None:
        """Every rank reached the step boundary after a stop signal: checkpoint now, for the requeued run."""
        self.watchdog.stopping()
        with self.watchdog.slow("checkpoint (stop requested)"):
            self._save()
        if self.rank == 0:
            log.warning("stopped by signal at step %d; exiting with %d for requeue", self.step, REQUEUE_EXIT_CODE)

    def _end_of_run(self, last: Recon | None) -> bool:
        """The final checkpoint and reconstructions (:func:`due_at_end`), still under the stop handlers: a signal
        during them lets the save finish and turns the exit status into 3 (every rank agrees on it). → True then."""
        with self.watchdog.slow("final checkpoint"):
            due = due_at_end(self.step, self.every, self.last_saved, trained=last is not None)
            if "checkpoint" in due:
                self._timed("checkpoint", self._save)
            if "reconstructions" in due:
                self._timed("reconstructions", self._reconstruction, last)
        self.logger.set_tag("final_checkpoint", str(self._final_dir().resolve()))
        if not self._stop_requested_anywhere():
            return False
        if self.rank == 0:
            log.warning("stopped by signal during the final checkpoint (step %d, complete); exiting with %d",
                        self.step, REQUEUE_EXIT_CODE)
        return True

    def _final_dir(self) -> Path:
        return self.out / "checkpoints" / ckpt.step_dir_name(self.step)

    def _side_work(self, what: str, phase: str, fn: Callable[..., Any], *args: Any) -> None:
        """Periodic side work under the watchdog's slow deadline (phase ``phase``), timed by :meth:`_timed`."""
        with self.watchdog.slow(phase):
            self._timed(what, fn, *args)

    def _timed(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run periodic side work (checkpoint, reconstructions, monitor), its time kept out of images/s and named in the
        next log line."""
        t0 = time.perf_counter()
        fn(*args)
        dt = time.perf_counter() - t0
        self.side_work[what] = self.side_work.get(what, 0.0) + dt
        self.side_total_s += dt

    def _summary(self) -> None:
        """Rank 0's closing lines: the final loss, wall time, mean speed, and where everything is."""
        wall = time.perf_counter() - self.t_start
        steps = self.step - self.first_step
        train_s = max(wall - self.side_total_s, 1e-9)
        lines = [f"done: {self.step} steps ({steps} in this run) in {_hms(wall)}; mean "
                 f"{steps * self.global_batch / train_s:.1f} images/s over the training steps "
                 f"({self.side_total_s:.1f} s of checkpoints, reconstructions and monitor not counted)"]
        if self.last_record is not None:
            r = self.last_record
            terms = ", ".join(f"{k} {r[k]:.4f}" for k in TERMS[1:])
            lines.append(f"  final loss    {r['loss']:.4f} ({terms}) at step {r['step']}")
        lines.append(f"  metrics       {self.out / 'metrics.jsonl'}")
        recon = sorted((self.out / "reconstructions").glob("step_*.png"))
        if recon:
            lines.append(f"  pictures      {recon[-1].parent}/ ({len(recon)}: original | masked | rebuilt; "
                         f"newest {recon[-1].name})")
        lines.append(f"  checkpoint    {self._final_dir()} (export: mcf export {self.out} encoder.safetensors)")
        sink, tracking = self.logger.mlflow, self.logger.tracking
        if sink is not None and tracking is not None and tracking.uri is not None:
            lines.append(f"  MLflow        run {sink.run_id} in experiment '{tracking.experiment}': "
                         f"{ui_command(tracking.uri)}")
        log.info("%s", "\n".join(lines))

    def _stop_requested_anywhere(self) -> bool:
        flag = torch.tensor([float(self.stop.requested)], device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(flag)
        return bool(flag.item())

    def _log(self, momentum: float) -> None:
        """Reduce the window's sums over ranks and log one record (metrics.jsonl, MLflow, the bar or a plain line);
        images/s counts the window's time less its side work. Starts the next window."""
        vals = torch.cat([self.acc, torch.tensor([float(self.loader.bad_samples)], device=self.device)])
        if self.world_size > 1:
            torch.distributed.all_reduce(vals)
        vals = vals.tolist()
        now = time.perf_counter()
        side_s = sum(self.side_work.values())
        train_s = max(now - self.t_log - side_s, 1e-9)  # the window's time in training steps, side work taken out
        count = max(vals[len(TERMS)], 1.0)
        record: dict[str, Any] = {"step": self.step, "epoch": self.epoch}
        record.update({k: vals[i] / count for i, k in enumerate(TERMS)})
        record.update(lr=self.optimizer.param_groups[0]["lr"], momentum=momentum,
                      images_per_s=self.steps_since_log * self.global_batch / train_s, bad_samples=int(vals[-1]),
                      data_wait=min(self.data_wait_s / train_s, 1.0))
        if self.side_work:
            record["side_work_s"] = side_s
        if self.cfg.train.precision == "fp16":
            record["skipped_steps"] = int(self.engine.skipped_steps)
        if self.throughput is not None:
            record.update(self.throughput.fields(record["images_per_s"]))
            mfu = {"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}", **mfu,
                                 refresh=False)
        self.logger.log(record)
        if self.rank == 0:
            self.last_record = record
            if self.plain_lines:
                eta = (self.total_steps - self.step) * train_s / max(self.steps_since_log, 1)
                log.info("%s", _log_line(record, self.total_steps, eta, self.side_work))
        self.acc.zero_()
        self.steps_since_log = 0
        self.data_wait_s = 0.0
        self.side_work = {}
        self.t_log = now

    def _reconstruction(self, last: Recon | None) -> None:
        if self.rank != 0 or last is None:
            return
        path = save_reconstruction(self.out / "reconstructions" / f"step_{self.step:08d}.png", *last,
                                   self.model.spec.patch_size,
                                   scale=max(1, 128 // last[0].shape[-1]))
        self.logger.log_artifact(path, "reconstructions")

    def _monitor(self) -> None:
        """Every rank runs the same probe forward passes (ZeRO-3 gathers parameters in them); rank 0 logs."""
        import deepspeed

        if self.monitor is None:
            return
        params = list(self.engine.module.parameters()) if self.cfg.deepspeed.zero == 3 else []
        # a collective under ZeRO-3
        with deepspeed.zero.GatheredParameters(params, enabled=bool(params)), torch.no_grad():
            metrics = self.monitor.evaluate(self.model)  # eval mode inside, train mode restored
        if self.rank == 0:
            self.logger.log({"step": self.step, **{f"monitor/{k}": float(v) for k, v in metrics.items()}})


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _log_line(r: dict[str, Any], total: int, eta_s: float, side_work: dict[str, float]) -> str:
    """One plain line per log interval (what the progress bar shows, for a log file)::

        step 20/100 (epoch 1) loss 34.1021 (perceptual 33.6, contrastive 0.0345, pixel 0.47) lr 1.5e-04 | 185.3 img/s,
        data wait 3%, MFU 1.2%, mem 1.31 GB | ETA 0:00:31 | not counted: checkpoint 2.1 s
    """
    terms = ", ".join(f"{k} {r[k]:.4g}" for k in TERMS[1:])
    speed = [f"{r['images_per_s']:.1f} img/s", f"data wait {r['data_wait']:.0%}"]
    if "mfu" in r:
        speed.append(f"MFU {r['mfu']:.1%}")
    if "peak_memory_gb" in r:
        speed.append(f"mem {r['peak_memory_gb']:.2f} GB")
    line = (f"step {r['step']}/{total} (epoch {r['epoch']}) loss {r['loss']:.4f} ({terms}) lr {r['lr']:.2e} | "
            f"{', '.join(speed)} | ETA {_hms(eta_s)}")
    if r.get("bad_samples"):
        line += f" | {r['bad_samples']} bad samples"
    if side_work:
        line += " | not counted: " + ", ".join(f"{k} {v:.1f} s" for k, v in side_work.items())
    return line
