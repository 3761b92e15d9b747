"""The EMA target encoder's weights, kept where the fp32 master weights they average are kept.

``t ← m·t + (1 − m)·θ`` in fp32, θ the online model's fp32 master weights after the optimizer step.
Each rank keeps the EMA only of the master elements its optimizer owns, so the update needs no
communication; the target's forward weights, in its forward dtype, are then assembled from every
rank's shard by one ``all_gather_into_tensor`` per step, of equal rows (each rank's shard padded to
the longest: gloo and NCCL run the same call, so the CPU tests run what the GPU runs). The gather
starts right after the update and is awaited by a forward pre-hook of the target, so it overlaps
whatever runs in between. Its cost, ``W × max(share)`` elements, is :func:`flat_row_lengths`'s.
Where every rank holds every fp32 master (fp32 at ZeRO 0-2, whose module weights *are* the
masters; bf16/fp16 at ZeRO 0 under DeepSpeed's FP16_(Unfused)Optimizer) the EMA is whole on every
rank and nothing is communicated.

Where the masters live in DeepSpeed 0.19.8 (read from its source):

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

Frozen online parameters (no master) are averaged against their fixed fp32 values, each by the rank
whose row is shortest when it is placed (every rank has the values), so they add little padding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


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


def build_layout(
    engine: Any, tracked: dict[str, torch.Size], fixed: dict[str, torch.Tensor], world: int, rank: int
) -> _Layout:
    """Where this rank's EMA elements come from and where the gathered ones go (see the module doc)."""
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


def _all_gather() -> Callable[..., Any]:
    """``all_gather_single`` (torch >= 2.14; ``all_gather_into_tensor`` is deprecated there) or its older name."""
    import torch.distributed as dist

    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Rows:
    """The gathered buffer ``[W, row]``: every rank's shard, one row each, padded to the longest
    (``row = max(lengths)``), filled by one ``all_gather_single`` of equal sizes. gloo refuses an
    all-gather of unequal sizes and NCCL would run one as a group of broadcasts: equal rows are the
    one call both run alike, at ``W × row`` elements received instead of ``sum(lengths)``."""

    def __init__(self, lengths: list[int], rank: int, dtype: torch.dtype, device: torch.device):
        self.lengths = lengths
        self.row = max(lengths)
        self.buffer = torch.empty(len(lengths) * self.row, dtype=dtype, device=device)
        self.send = torch.zeros(self.row, dtype=dtype, device=device)  # the tail beyond this rank's length stays 0

    def gather(self, shard: torch.Tensor, async_op: bool = False) -> Any:
        self.send.narrow(0, 0, shard.numel()).copy_(shard)
        return _all_gather()(self.buffer, self.send, async_op=async_op)

    def views(self, pieces: list[_Piece], flat: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(sources in the buffer, destinations in ``flat``) of every piece."""
        src = []
        for p in pieces:
            src.append(self.buffer.view(len(self.lengths), self.row)[p.row : p.row + p.rows, p.col : p.col + p.cols])
        dst = [flat.narrow(0, p.dst, p.rows * p.cols).view(p.rows, p.cols) for p in pieces]
        return src, dst


class TargetEMA:
    """The target encoder's fp32 EMA, partitioned like the online model's fp32 masters.

    ``target``'s parameters become views into one flat tensor of ``forward_dtype`` (its forward
    weights; its buffers are left as they are); the fp32 EMA lives in ``self.shard``.
    ``update(m)`` after every optimizer step; ``state_dict()`` gives the whole fp32 EMA (a
    collective when sharded) and ``load_state_dict`` takes one.

    Args:
        target: the EMA module (``MCF.target``), fp32, equal on every rank (it starts as the EMA).
        engine: the DeepSpeed engine of the online model (``engine.module``: the online model).
        forward_dtype: the dtype the target computes in (its weights are cast to it).
        fixed: fp32 values of frozen online parameters (they have no master weights).
    """

    def __init__(
        self,
        target: nn.Module,
        engine: Any,
        forward_dtype: torch.dtype,
        fixed: dict[str, torch.Tensor] | None = None,
    ):
        import torch.distributed as dist

        self.target = target
        self.forward_dtype = forward_dtype
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        named = dict(target.named_parameters())
        tracked = {n: p.shape for n, p in named.items()}
        self.layout = lay = build_layout(engine, tracked, fixed or {}, self.world, self.rank)
        device = next(target.parameters()).device
        masters = lay.masters()
        ema_device = masters[0].device if masters else device
        init = {n: p.detach().float() for n, p in named.items()}
        # the fp32 EMA of this rank's masters (ZeRO-3: padding slots stay 0)
        self.shard = torch.zeros(lay.shard_numel, dtype=torch.float32, device=ema_device)
        self._fill_shard(init)
        self._ema_views = [self.shard.narrow(0, r.shard, r.length) for r in lay.runs]
        if lay.kind == "replicated" and forward_dtype == torch.float32 and ema_device == device:
            self.flat = self.shard  # the target computes with the EMA itself
        else:
            self.flat = torch.zeros(lay.target_numel, dtype=forward_dtype, device=device)
        for n, p in named.items():  # the forward weights start as the (cast) EMA, on every rank alike
            view = self.flat.narrow(0, lay.offsets[n], p.numel()).view(p.shape)
            if self.flat is not self.shard:
                view.copy_(init[n])
            p.data = view
        self._pending: Any = None
        if lay.kind != "replicated":
            self.rows = _Rows(lay.row_lengths, self.rank, forward_dtype, device)
            self._src, self._dst = self.rows.views(lay.pieces, self.flat)
        self._hook = target.register_forward_pre_hook(lambda *_: self.wait())
        if self.rank == 0:
            gather = (
                f", one all-gather of {self.rows.buffer.numel()} elements per step "
                f"({sum(lay.row_lengths)} without padding)"
                if lay.kind != "replicated"
                else ", no communication"
            )
            log.info(
                "EMA target: %s, %d of %d elements on this rank, forward weights in %s%s",
                lay.kind,
                lay.shard_numel,
                sum(p.numel() for p in named.values()),
                str(forward_dtype).replace("torch.", ""),
                gather,
            )

    def _fill_shard(self, full: dict[str, torch.Tensor]) -> None:
        for s in self.layout.segments:
            self.shard.narrow(0, s.shard, s.length).copy_(full[s.name].reshape(-1).narrow(0, s.offset, s.length))

    @property
    def sharded(self) -> bool:
        return self.layout.kind != "replicated"

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """``t ← m·t + (1 − m)·θ`` on this rank's elements, then start assembling the forward weights
        (the trainer times this as ``mcf.ema``; the wait for the gather shows inside ``mcf.target``)."""
        self.wait()
        masters = self.layout.masters()
        src = [masters[r.master].narrow(0, r.start, r.length) for r in self.layout.runs]
        torch._foreach_mul_(self._ema_views, momentum)
        torch._foreach_add_(self._ema_views, src, alpha=1.0 - momentum)
        if not self.sharded:
            if self.flat is not self.shard:
                self.flat.copy_(self.shard)
            return
        self._pending = self.rows.gather(self.shard, async_op=True)

    @torch.no_grad()
    def wait(self) -> None:
        """Finish a gather started by :meth:`update` (the target's forward calls this first)."""
        if self._pending is None:
            return
        self._pending.wait()
        self._pending = None
        torch._foreach_copy_(self._dst, self._src)

    @torch.no_grad()
    def full_fp32(self) -> dict[str, torch.Tensor]:
        """Every EMA parameter whole, fp32, on the target's device (a collective when sharded)."""
        self.wait()
        lay = self.layout
        if self.sharded:
            rows = _Rows(lay.row_lengths, self.rank, torch.float32, self.flat.device)
            rows.gather(self.shard)
            flat = torch.zeros(lay.target_numel, dtype=torch.float32, device=self.flat.device)
            src, dst = rows.views(lay.pieces, flat)
            torch._foreach_copy_(dst, src)
        else:
            flat = self.shard
        return {n: flat.narrow(0, lay.offsets[n], p.numel()).view(p.shape) for n, p in self.target.named_parameters()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The target's state dict with the fp32 EMA for its parameters, on the CPU (a collective when sharded)."""
        params = self.full_fp32()
        return {
            k: (params[k] if k in params else v).detach().float().cpu().clone()
            for k, v in self.target.state_dict().items()
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from a whole fp32 state dict (:meth:`state_dict`'s): this rank's EMA elements, and
        the forward weights cast from it (no communication)."""
        self.wait()
        self.target.load_state_dict(state)  # checks keys and shapes; casts into the forward weights, copies buffers
        self._fill_shard({n: state[n].to(self.shard.device, torch.float32) for n, _ in self.target.named_parameters()})
