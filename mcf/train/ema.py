"""The EMA target encoder's weights, kept where the fp32 master weights they average are kept.

``t ← m·t + (1 − m)·θ`` in fp32, θ the online model's fp32 master weights after the optimizer step.
Each rank keeps the EMA only of the master elements its optimizer owns, so the update needs no
communication; the target's forward weights, in its forward dtype, are then assembled from every
rank's shard by one ``all_gather_into_tensor`` per step, of equal rows (each rank's shard padded to
the longest: gloo and NCCL run the same call, so the CPU tests run what the GPU runs). The gather
starts right after the update and is awaited by a forward pre-hook of the target, so it overlaps
whatever runs in between. Its cost, ``W × max(share)`` elements, is
:func:`mcf.train.ds_internals.flat_row_lengths`'s.
Where every rank holds every fp32 master (fp32 at ZeRO 0-2, whose module weights *are* the
masters; bf16/fp16 at ZeRO 0 under DeepSpeed's FP16_(Unfused)Optimizer) the EMA is whole on every
rank and nothing is communicated.

Where the fp32 masters live in DeepSpeed, and the layout of this rank's shard built from them:
:mod:`mcf.train.ds_internals`.

Frozen online parameters (no master) are averaged against their fixed fp32 values, each by the rank
whose row is shortest when it is placed (every rank has the values), so they add little padding.

``source="bf16_params"`` (``train.ema_source``; ZeRO 0-2) averages the module's own weights instead,
which DeepSpeed has already made whole on every rank after its step: the EMA is whole on every rank
(4 bytes per target element), still accumulated in fp32, and nothing is communicated; each update
adds ``(1 − m)·bf16(θ)`` instead of ``(1 − m)·θ``, so the target drifts from the exact EMA by at most
``(1 − mⁿ)·2⁻⁸·max|θ|`` per element after ``n`` updates (bf16's rounding of θ, averaged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from mcf.train.ds_internals import _Piece, build_layout, build_module_layout

log = logging.getLogger(__name__)


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
        source: ``"fp32_masters"`` (exact, the default) or ``"bf16_params"`` (the module's weights after the
            step, ZeRO 0-2: no communication; see the module doc).
    """

    def __init__(
        self,
        target: nn.Module,
        engine: Any,
        forward_dtype: torch.dtype,
        fixed: dict[str, torch.Tensor] | None = None,
        source: str = "fp32_masters",
    ):
        import torch.distributed as dist

        self.target = target
        self.forward_dtype = forward_dtype
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        named = dict(target.named_parameters())
        tracked = {n: p.shape for n, p in named.items()}
        if source not in ("fp32_masters", "bf16_params"):
            raise ValueError(f"EMA source must be fp32_masters or bf16_params, not {source!r}")
        self.source = source
        build = build_layout if source == "fp32_masters" else build_module_layout
        self.layout = lay = build(engine, tracked, fixed or {}, self.world, self.rank)
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
                "EMA target: %s of the %s, %d of %d elements on this rank, forward weights in %s%s",
                lay.kind,
                "module's weights" if source == "bf16_params" else "fp32 masters",
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
