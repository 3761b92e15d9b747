"""Everything mcf knows about DeepSpeed's private state, in one place, with the version it was read from.

mcf reads DeepSpeed's optimizer internals where no public API gives the answer: where each rank's
fp32 master weights live (the EMA target averages them in place, :mod:`mcf.train.ema`; a ZeRO-0
bf16/fp16 checkpoint saves them, :mod:`mcf.train.trainer`), and it undoes two slips of the ZeRO-3
universal-checkpoint load (:mod:`mcf.train.checkpoint`). These probes rest on the exact release they
were written against (:data:`DEEPSPEED_VERSION`, setup.py's pin); each calls
:func:`check_deepspeed_version` first, which refuses any other installed release with one line
instead of letting a changed attribute give wrong weights.

Where the fp32 masters live in DeepSpeed 0.19.8 (read from its source):

- ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and ``BF16_Optimizer``: per parameter group the
  low-precision parameters are views into one flat tensor (``bit16_groups_flat`` /
  ``bf16_groups_flat``) padded to a multiple of the world size W; rank r's fp32 masters
  (``single_partition_of_fp32_groups[g]`` / ``fp32_groups_flat_partition[g]``) are the flat
  elements ``[r·S, (r + 1)·S)``, ``S = flat.numel() / W``. A parameter may straddle two ranks.
- ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter is cut into W pieces of
  ``ps = ceil(numel / W)`` elements (the last padded), rank r holds piece r (``param.ds_tensor``);
  per sub-group the pieces are concatenated in ``fp16_groups[g]`` order
  (``fp16_partitioned_groups_flat[g]``) and the fp32 masters (``fp32_partitioned_groups_flat[g]``)
  share that layout.
- ZeRO-0: fp32 trains the module's own weights; bf16/fp16 use ``FP16_UnfusedOptimizer`` (one fp32
  copy per parameter, ``fp32_groups``) or, with a fused Adam, ``FP16_Optimizer`` (flat fp32 copies
  per group, ``fp32_groups_flat``, laid out like ``fp16_groups_flat``), whole on every rank.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mcf.errors import ConfigError

DEEPSPEED_VERSION = "0.19.8"  # the release whose private attributes below were read (setup.py pins it)


@functools.cache
def installed_deepspeed_version() -> str | None:
    """The installed DeepSpeed's version (package metadata: DeepSpeed itself is not imported), or None."""
    try:
        return importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_deepspeed_version(installed: str | None = None) -> None:
    """Raise :class:`~mcf.errors.ConfigError` unless DeepSpeed :data:`DEEPSPEED_VERSION` is installed
    (a local build tag, ``0.19.8+abc``, is the same release).

    Args:
        installed: the version to check; default the installed one.
    """
    installed = installed if installed is not None else installed_deepspeed_version()
    if installed is None or installed.split("+")[0] != DEEPSPEED_VERSION:
        raise ConfigError(
            f"mcf reads DeepSpeed {DEEPSPEED_VERSION}'s private optimizer state (mcf.train.ds_internals), but "
            f"{'no DeepSpeed' if installed is None else f'DeepSpeed {installed}'} is installed: "
            f"pip install deepspeed=={DEEPSPEED_VERSION}"
        )


# -- the EMA's layout of the fp32 masters (mcf.train.ema) -----------------------------------------
@dataclass(frozen=True)
class _Run:
    """``length`` EMA elements: ``masters[master][start:]`` ↔ ``shard[shard:]``."""

    master: int
    start: int
    shard: int
    length: int


@dataclass(frozen=True)
class _Piece:
    """Rows ``[row, row + rows)``, columns ``[col, col + cols)`` of the gathered ``[W, R]`` buffer →
    ``target_flat[dst : dst + rows·cols]`` (ZeRO-3: all W rows of one parameter's pieces at once)."""

    row: int
    rows: int
    col: int
    cols: int
    dst: int


@dataclass(frozen=True)
class _Segment:
    """This rank's EMA elements ``[offset, offset + length)`` of parameter ``name`` (flattened) at ``shard``."""

    name: str
    offset: int
    shard: int
    length: int


@dataclass
class _Layout:
    kind: str  # "replicated" | "flat" (ZeRO-1/2, BF16_Optimizer) | "zero3"
    masters: Callable[[], list[torch.Tensor]]  # this rank's 1-D fp32 master tensors, looked up at every step
    runs: list[_Run]
    shard_numel: int
    row_lengths: list[int]  # each rank's shard length (the rows' used part)
    pieces: list[_Piece]
    target_numel: int
    offsets: dict[str, int]  # parameter name → offset of its first element in the target's flat weights
    segments: list[_Segment]


def _merge(runs: list[_Run]) -> list[_Run]:
    """Adjacent runs (contiguous in both the master and the shard) become one: fewer tensors per foreach."""
    out: list[_Run] = []
    for r in runs:
        if (
            out
            and out[-1].master == r.master
            and out[-1].start + out[-1].length == r.start
            and out[-1].shard + out[-1].length == r.shard
        ):
            last = out.pop()
            r = _Run(last.master, last.start, last.shard, last.length + r.length)
        out.append(r)
    return out


def _offset_in(t: torch.Tensor, flat: torch.Tensor) -> int:
    """Element offset of ``t``'s data inside ``flat`` (it must be a view of it)."""
    off, rem = divmod(t.data_ptr() - flat.data_ptr(), flat.element_size())
    if rem or off < 0 or off + t.numel() > flat.numel():
        raise RuntimeError("a parameter is not a view of its optimizer's flat buffer: unsupported DeepSpeed layout")
    return off


class _Builder:
    """Lays out the EMA shard, the gathered rows and the target's flat weights for one rank."""

    def __init__(self, shapes: dict[str, torch.Size], world: int, rank: int):
        self.shapes, self.world, self.rank = shapes, world, rank
        self.runs: list[_Run] = []
        self.pieces: list[_Piece] = []
        self.segments: list[_Segment] = []
        self.offsets: dict[str, int] = {}
        self.row_len = [0] * world  # elements each rank has put in its row so far
        self.target_numel = 0

    def flat_space(
        self, master: int, params: list[tuple[str, int]], partition: int, owners: range | None = None
    ) -> None:
        """A flat space split in ``partition``-element ranges over ranks (``owners``: one rank owns it
        all); ``params``: (name, element offset in the space); rank r's masters are ``masters[master]``."""
        intervals: list[list[Any]] = []  # [start, end, [(name, offset)]] of runs of adjacent tracked parameters
        for name, off in sorted(params, key=lambda x: x[1]):
            n = self.shapes[name].numel()
            if intervals and intervals[-1][1] == off:
                intervals[-1][1] += n
                intervals[-1][2].append((name, off))
            else:
                intervals.append([off, off + n, [(name, off)]])
        for start, end, members in intervals:
            base = self.target_numel
            for name, off in members:
                self.offsets[name] = base + off - start
            self.target_numel += end - start
            for q in range(self.world) if owners is None else owners:
                lo, hi = (
                    (start, end) if owners is not None else (max(start, q * partition), min(end, (q + 1) * partition))
                )
                if lo >= hi:
                    continue
                col = self.row_len[q]
                self.pieces.append(_Piece(q, 1, col, hi - lo, base + lo - start))
                self.row_len[q] += hi - lo
                if q != self.rank:
                    continue
                mine = 0 if owners is not None else q * partition  # the space offset of this rank's master tensor
                self.runs.append(_Run(master, lo - mine, col, hi - lo))
                for name, off in members:
                    a, b = max(lo, off), min(hi, off + self.shapes[name].numel())
                    if a < b:
                        self.segments.append(_Segment(name, a - off, col + a - lo, b - a))

    def zero3_piece(self, master: int, name: str, start: int, piece: int) -> None:
        """A ZeRO-3 parameter: rank r holds its elements ``[r·piece, (r + 1)·piece)``, at
        ``masters[master][start:]`` on this rank."""
        numel = self.shapes[name].numel()
        col = self.row_len[0]  # the same column on every rank
        for q in range(self.world):
            self.row_len[q] += piece
        self.offsets[name] = self.target_numel
        self.pieces.append(_Piece(0, self.world, col, piece, self.target_numel))
        self.target_numel += self.world * piece
        valid = max(0, min(piece, numel - self.rank * piece))  # the last ranks' pieces end in padding
        if valid:
            self.runs.append(_Run(master, start, col, valid))
            self.segments.append(_Segment(name, self.rank * piece, col, valid))

    def fixed(self, master: int, params: list[tuple[str, int]]) -> None:
        """Frozen parameters (``params``: name, offset in ``masters[master]``), whose values every rank has:
        the largest first, each to the rank whose row is then shortest (the lowest such rank), as one
        owned flat space: the gathered rows stay as even as the masters' layout allows."""
        for name, off in sorted(params, key=lambda x: (-self.shapes[x[0]].numel(), x[1])):
            q = min(range(self.world), key=lambda r: (self.row_len[r], r))
            self.flat_space(master, [(name, off)], 0, owners=range(q, q + 1))

    def layout(self, kind: str, masters: Callable[[], list[torch.Tensor]]) -> _Layout:
        missing = [n for n in self.shapes if n not in self.offsets]
        if missing:
            raise RuntimeError(f"EMA parameters the optimizer does not hold: {missing[:5]}")
        shard = self.row_len[self.rank]
        return _Layout(
            kind,
            masters,
            _merge(self.runs),
            shard,
            list(self.row_len),
            self.pieces,
            self.target_numel,
            self.offsets,
            self.segments,
        )


def _replicated(builder: _Builder, names: list[str], masters: Callable[[], list[torch.Tensor]]) -> _Layout:
    """Every master whole on every rank: ``masters()[i]`` is parameter ``names[i]``."""
    for i, name in enumerate(names):
        builder.flat_space(i, [(name, 0)], 0, owners=range(builder.rank, builder.rank + 1))
    lay = builder.layout("replicated", masters)
    lay.target_numel = lay.shard_numel
    return lay


def flat_row_lengths(
    groups: list[list[tuple[str, int]]], tracked: dict[str, int], fixed: dict[str, int], world: int
) -> list[int]:
    """Each rank's share of the EMA (elements) at ZeRO-1/2 on ``world`` ranks, laid out as DeepSpeed
    0.19.8's ``DeepSpeedZeroOptimizer`` does (no model, no process group): per optimizer group
    (``groups``: its trainable parameters, (name, numel), in order) one flat space padded to a
    multiple of ``2·W`` elements (``nccl_start_alignment_factor · W``) and cut in ``W`` equal
    partitions; ``tracked``: the EMA's parameters (name → numel), ``fixed``: its frozen ones.
    The gather costs ``W × max(rows)`` elements."""
    shapes = {n: torch.Size([k]) for n, k in {**tracked, **fixed}.items()}
    b = _Builder(shapes, world, 0)
    for group in groups:
        offsets, total = [], 0
        for name, numel in group:
            if name in tracked and name not in fixed:
                offsets.append((name, total))
            total += numel
        part = -(-total // (2 * world)) * 2
        b.flat_space(0, offsets, part)
    offsets = torch.tensor([0] + list(fixed.values())).cumsum(0).tolist()
    b.fixed(0, list(zip(fixed, offsets)))
    return list(b.row_len)


def build_layout(
    engine: Any, tracked: dict[str, torch.Size], fixed: dict[str, torch.Tensor], world: int, rank: int
) -> _Layout:
    """Where this rank's EMA elements come from and where the gathered ones go (see the module doc)."""
    check_deepspeed_version()
    opt = engine.optimizer
    params = dict(engine.module.named_parameters())
    missing = [n for n in tracked if n not in params and n not in fixed]
    if missing:
        raise RuntimeError(f"EMA parameters without an online counterpart: {missing[:5]}")
    by_id = {id(params[n]): n for n in tracked if n in params and n not in fixed}
    b = _Builder(tracked, world, rank)
    fixed_names = [n for n in tracked if n in fixed]
    fixed_t = [fixed[n].detach().float().reshape(-1).clone() for n in fixed_names]
    fixed_flat = torch.cat(fixed_t) if fixed_t else None

    def with_fixed(get: Callable[[], list[torch.Tensor]]) -> Callable[[], list[torch.Tensor]]:
        return get if fixed_flat is None else (lambda: [*get(), fixed_flat])

    def add_fixed(master: int) -> None:  # masters[master]: the fixed values, flat; each parameter to one rank
        if fixed_flat is not None:
            offsets = torch.tensor([0] + [t.numel() for t in fixed_t]).cumsum(0).tolist()
            b.fixed(master, list(zip(fixed_names, offsets)))

    def check_world(groups: list[Any]) -> None:
        import torch.distributed as dist

        for g in groups:
            if dist.get_world_size(group=g) != world or dist.get_rank(group=g) != rank:
                raise RuntimeError(
                    "the sharded EMA needs the optimizer partitioned over all ranks (no MiCS / hpZ / MoE groups)"
                )

    def owned_names(group: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        return [(by_id[id(p)], p) for p in group if id(p) in by_id]

    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        if getattr(opt, "optimizer_swapper", None) is not None or any(
            t.numel() == 0 for t in opt.fp32_partitioned_groups_flat
        ):
            raise RuntimeError(
                "the sharded EMA needs the fp32 masters in memory: NVMe optimizer offload is not supported"
            )
        check_world([p.ds_process_group for g in opt.fp16_groups for p in g])
        for g, group in enumerate(opt.fp16_groups):
            start = 0
            flat = opt.fp16_partitioned_groups_flat[g]
            for p in group:
                piece = p.partition_numel()
                if id(p) in by_id:
                    if (
                        flat is not None
                        and p.ds_tensor.numel()
                        and p.ds_tensor.device == flat.device
                        and _offset_in(p.ds_tensor, flat) != start
                    ):
                        raise RuntimeError("unexpected ZeRO-3 partition layout")
                    b.zero3_piece(g, by_id[id(p)], start, piece)
                start += piece
        add_fixed(len(opt.fp16_groups))
        return b.layout("zero3", with_fixed(lambda: [t.view(-1) for t in opt.fp32_partitioned_groups_flat]))

    flat_attrs = (
        ("single_partition_of_fp32_groups", "bit16_groups_flat", "bit16_groups"),
        ("fp32_groups_flat_partition", "bf16_groups_flat", "bf16_groups"),
    )
    fp32_module = all(p.dtype == torch.float32 for p in params.values())
    for masters_attr, flat_attr, groups_attr in flat_attrs:
        if hasattr(opt, masters_attr) and not fp32_module:  # fp32 at ZeRO-1/2: the module's weights are whole masters
            check_world(getattr(opt, "real_dp_process_group", [None]))
            for g, (flat, group) in enumerate(zip(getattr(opt, flat_attr), getattr(opt, groups_attr))):
                part = getattr(opt, masters_attr)[g].numel()
                if part * world != flat.numel():
                    raise RuntimeError(f"unexpected ZeRO partition size {part} x {world} != {flat.numel()}")
                b.flat_space(g, [(n, _offset_in(p, flat)) for n, p in owned_names(group)], part)
            add_fixed(len(getattr(opt, masters_attr)))
            return b.layout("flat", with_fixed(lambda a=masters_attr: list(getattr(opt, a))))

    # whole masters on every rank
    names = [n for n in tracked if n not in fixed]
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups_flat"):  # FP16_Optimizer: flat fp32 copies per group
        where = {}
        for g, (flat, group) in enumerate(zip(opt.fp16_groups_flat, opt.fp16_groups)):
            where.update({n: (g, _offset_in(p, flat)) for n, p in owned_names(group)})

        def masters() -> list[torch.Tensor]:
            return [opt.fp32_groups_flat[where[n][0]].narrow(0, where[n][1], tracked[n].numel()) for n in names]
    elif hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer: one fp32 copy each
        where = {}
        for g, group in enumerate(opt.fp16_groups):
            where.update({by_id[id(p)]: (g, i) for i, p in enumerate(group) if id(p) in by_id})

        def masters() -> list[torch.Tensor]:
            return [opt.fp32_groups[where[n][0]][where[n][1]].detach().view(-1) for n in names]
    elif fp32_module and not hasattr(opt, "fp16_groups"):

        def masters() -> list[torch.Tensor]:
            return [params[n].detach().view(-1) for n in names]
    else:
        raise RuntimeError(f"no fp32 master weights found in {type(opt).__name__}: unsupported optimizer for the EMA")
    if hasattr(opt, "fp16_groups") and any(n not in where for n in names):
        raise RuntimeError(f"EMA parameters the optimizer does not hold: {[n for n in names if n not in where][:5]}")
    return _replicated(b, names + fixed_names, masters if not fixed_t else (lambda: [*masters(), *fixed_t]))


def build_module_layout(
    engine: Any, tracked: dict[str, torch.Size], fixed: dict[str, torch.Tensor], world: int, rank: int
) -> _Layout:
    """The EMA of the module's own weights (``train.ema_source=bf16_params``), whole on every rank: at ZeRO
    0-2 DeepSpeed leaves every rank the whole updated module after its step (ZeRO-1/2: ``bit16_groups_flat``,
    rebuilt by the step's all-gather of the updated partitions, which the default EMA does not use; ZeRO-0:
    updated in place), so the update reads them and communicates nothing. At ZeRO-3 the module's parameters are
    partitioned (``ds_tensor``; gathered only around a module's forward/backward): refused."""
    check_deepspeed_version()
    params = dict(engine.module.named_parameters())
    if hasattr(engine.optimizer, "fp32_partitioned_groups_flat") or any(hasattr(p, "ds_tensor") for p in params.values()):
        raise ConfigError(
            "train.ema_source=bf16_params needs the module's weights whole on every rank (deepspeed.zero 0-2); "
            "ZeRO-3 partitions them: use train.ema_source=fp32_masters"
        )
    names = [n for n in tracked if n not in fixed]
    missing = [n for n in names if n not in params]
    if missing:
        raise RuntimeError(f"EMA parameters without an online counterpart: {missing[:5]}")
    fixed_names = [n for n in tracked if n in fixed]
    fixed_t = [fixed[n].detach().float().reshape(-1).clone() for n in fixed_names]

    def weights() -> list[torch.Tensor]:  # bf16 (fp32 when the run is fp32: then the masters themselves)
        return [params[n].detach().view(-1) for n in names]

    return _replicated(
        _Builder(tracked, world, rank), names + fixed_names, weights if not fixed_t else (lambda: [*weights(), *fixed_t])
    )


# -- the fp32 masters, whole (ZeRO-0 bf16/fp16 checkpoints, tests) ------------------------------
def fp32_masters(engine: Any, names: list[str], precision: str, zero: int) -> dict[str, torch.Tensor]:
    """The fp32 master values of the online parameters ``names`` (after the optimizer step).

    fp32 with ZeRO 0/1/2: the module's parameters are the masters (ZeRO-1/2 copy the updated fp32
    partitions back bit for bit). Otherwise (bf16/fp16, or ZeRO-3's partitioned parameters) they are
    assembled from the optimizer with ``safe_get_full_fp32_param``: a collective, called on every
    rank in the same order.
    """
    check_deepspeed_version()
    params = dict(engine.module.named_parameters())
    if precision == "fp32" and zero < 3:
        return {n: params[n].detach() for n in names}
    flat = _flat_fp32_masters(engine.optimizer)
    if flat is not None:  # bf16/fp16 at ZeRO 0: DeepSpeed's FP16_Optimizer keeps flat fp32 copies, no per-param mapping
        return {n: flat[id(params[n])] for n in names}
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for n in names:
        full = safe_get_full_fp32_param(params[n])
        if full is None:
            raise RuntimeError(f"no fp32 master weight for '{n}' (precision {precision}, ZeRO {zero})")
        out[n] = full
    return out


def _flat_fp32_masters(optimizer: Any) -> dict[int, torch.Tensor] | None:
    """id(low-precision param) → its fp32 master in DeepSpeed's FP16_(Unfused)Optimizer (bf16/fp16 at ZeRO 0),
    which keeps fp32 copies per group (``fp32_groups``) or flattened (``fp32_groups_flat``), with no per-param mapping."""
    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None:
        return None
    out = {}
    if hasattr(optimizer, "fp32_groups"):  # FP16_UnfusedOptimizer: one fp32 tensor per parameter
        for params, masters in zip(groups, optimizer.fp32_groups):
            out.update({id(p): m for p, m in zip(params, masters)})
        return out
    if hasattr(optimizer, "fp32_groups_flat"):  # FP16_Optimizer: one flat fp32 tensor per group
        for params, flat in zip(groups, optimizer.fp32_groups_flat):
            offset = 0
            for p in params:
                out[id(p)] = flat.narrow(0, offset, p.numel()).view_as(p)
                offset += p.numel()
        return out
    return None


# -- DeepSpeed 0.19.8's ZeRO-3 universal-checkpoint load ------------------------------------------
def repair_universal_load(base: torch.optim.Optimizer, hyper: list[dict[str, Any]]) -> None:
    """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal load (measured: after one resumed step
    the no-decay group had decayed and its Adam step count had advanced by 2):

    - it copies the hyperparameters of param group 0 into every group (the no-decay group got
      ``weight_decay=0.05``): each group gets back the values it was built with (mcf's config);
    - it stores one ``step`` tensor object in the state of every group, which torch's AdamW then
      increments in place once per group: each state gets its own copy, on its parameter's device.
    """
    check_deepspeed_version()
    for group, values in zip(base.param_groups, hyper):
        group.update(values)
    for p, st in base.state.items():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].detach().clone().to(p.device if torch.is_tensor(p) else st["step"].device)
