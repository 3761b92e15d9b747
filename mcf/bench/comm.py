"""Counting collectives: every ``torch.distributed`` collective this process calls, with its bytes.

:class:`CollectiveCounter` replaces the collectives of ``torch.distributed`` (and of
``torch.distributed.distributed_c10d``, where DeepSpeed looks some of them up) by wrappers that
record ``(tag, op, dtype, bytes)`` before calling the original. Install it before DeepSpeed
initialises: DeepSpeed keeps references to some functions it looked up then. A collective called
from inside another (``all_gather_into_tensor`` → ``all_gather_single``, ``all_gather_object`` →
``all_gather``) is counted once, as the outer one; the ops inside ``_coalescing_manager`` are one
collective (``coalesced[op,…]``, bytes summed), as NCCL runs them.

Each call also records whether it was issued while an autograd backward was running
(``torch._C._current_graph_task_id() >= 0``: from a gradient hook, as DeepSpeed's ``overlap_comm``
reductions are), which is how the overlap of the gradient reduction with the backward is measured.

Bytes are those of the whole buffer the operation works on, per rank: the tensor of an
all-reduce / broadcast / reduce, the output of an all-gather, the input of a reduce-scatter or an
all-to-all (a ring moves about (W − 1)/W of that through each rank's link).
"""

from __future__ import annotations

import contextlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

# op name → which argument holds the buffer whose bytes are counted (index, keyword)
_BUFFER_ARG: dict[str, tuple[int, str]] = {
    "all_reduce": (0, "tensor"),
    "broadcast": (0, "tensor"),
    "reduce": (0, "tensor"),
    "all_gather": (0, "tensor_list"),
    "all_gather_into_tensor": (0, "output_tensor"),
    "all_gather_single": (0, "output_tensor"),
    "_all_gather_base": (0, "output_tensor"),
    "all_gather_coalesced": (0, "output_tensor_lists"),
    "reduce_scatter": (1, "input_list"),
    "reduce_scatter_tensor": (1, "input"),
    "reduce_scatter_single": (1, "input"),
    "_reduce_scatter_base": (1, "input"),
    "all_reduce_coalesced": (0, "tensors"),
    "all_to_all": (1, "input_tensor_list"),
    "all_to_all_single": (1, "input"),
    "gather": (0, "tensor"),
    "scatter": (0, "tensor"),
    "send": (0, "tensor"),
    "recv": (0, "tensor"),
    "isend": (0, "tensor"),
    "irecv": (0, "tensor"),
    "barrier": (-1, ""),
    "monitored_barrier": (-1, ""),
}


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


@dataclass(frozen=True)
class Call:
    tag: Any
    label: str
    op: str
    dtype: str
    bytes: int
    in_backward: bool = False


class CollectiveCounter:
    """Records every collective; ``tag`` (any value, e.g. the training step) and ``label`` (who
    called it, see :meth:`labelled`) are stored with each.

    ``tag_fn``: when set, called at each collective to get the tag (e.g. ``lambda: trainer.step``).
    """

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.tag: Any = None
        self.label = ""
        self.tag_fn: Callable[[], Any] | None = None
        self._depth = 0
        self._group: list[Call] | None = None
        self._saved: list[tuple[Any, str, Any]] = []

    # -- install / remove -----------------------------------------------------------------------
    def install(self) -> CollectiveCounter:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for mod in (dist, c10d):
            for name in _BUFFER_ARG:
                orig = getattr(mod, name, None)
                if orig is None or getattr(orig, "_mcf_counted", False):
                    continue
                self._saved.append((mod, name, orig))
                setattr(mod, name, self._wrap(name, orig))
            cm = getattr(mod, "_coalescing_manager", None)
            if cm is not None and not getattr(cm, "_mcf_counted", False):
                self._saved.append((mod, "_coalescing_manager", cm))
                mod._coalescing_manager = self._wrap_coalescing(cm)
        return self

    def remove(self) -> None:
        for mod, name, orig in reversed(self._saved):
            setattr(mod, name, orig)
        self._saved.clear()

    def __enter__(self) -> CollectiveCounter:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def labelled(self, fn: Callable, label: str) -> Callable:
        """``fn`` whose collectives carry ``label`` (e.g. ``"ema"``)."""

        def call(*args: Any, **kwargs: Any) -> Any:
            outer, self.label = self.label, label
            try:
                return fn(*args, **kwargs)
            finally:
                self.label = outer

        return call

    # -- recording ------------------------------------------------------------------------------
    def _record(self, name: str, args: tuple, kwargs: dict) -> None:
        index, key = _BUFFER_ARG[name]
        arg = kwargs.get(key) if key in kwargs else (args[index] if 0 <= index < len(args) else None)
        ts = _tensors(arg)
        call = Call(
            self.tag_fn() if self.tag_fn else self.tag,
            self.label,
            name,
            str(ts[0].dtype).replace("torch.", "") if ts else "-",
            sum(t.numel() * t.element_size() for t in ts),
            torch._C._current_graph_task_id() >= 0,
        )
        if self._group is not None:
            self._group.append(call)
        else:
            self.calls.append(call)

    def _wrap(self, name: str, orig: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return orig(*args, **kwargs)
            self._record(name, args, kwargs)
            self._depth += 1
            try:
                return orig(*args, **kwargs)
            finally:
                self._depth -= 1

        counted._mcf_counted = True  # type: ignore[attr-defined]
        counted.__wrapped__ = orig  # type: ignore[attr-defined]
        return counted

    def _wrap_coalescing(self, orig: Callable) -> Callable:
        @contextlib.contextmanager
        def counted(*args: Any, **kwargs: Any) -> Iterator[Any]:
            outer = self._group is None and not self._depth
            if outer:
                self._group = []
            try:
                with orig(*args, **kwargs) as cm:
                    yield cm
            finally:
                if outer:
                    group, self._group = self._group or [], None
                    if group:
                        ops = ",".join(sorted({c.op for c in group}))
                        self.calls.append(
                            Call(
                                group[0].tag,
                                group[0].label,
                                f"coalesced[{ops}]",
                                group[0].dtype,
                                sum(c.bytes for c in group),
                                group[0].in_backward,
                            )
                        )

        counted._mcf_counted = True  # type: ignore[attr-defined]
        return counted

    # -- summaries ------------------------------------------------------------------------------
    def select(self, tags: Any) -> list[Call]:
        wanted = set(tags)
        return [c for c in self.calls if c.tag in wanted]

    def per_step(self, tags: list[Any]) -> dict[str, Any]:
        """Mean collectives and bytes per tag over ``tags``, by ``op/dtype`` and by label; ``steady``
        says whether every tag had the same calls."""
        calls = self.select(tags)
        n = max(len(tags), 1)

        def table(key: Callable[[Call], str]) -> dict[str, dict[str, float]]:
            return table_of(calls, n, key)

        signatures = {t: sorted((c.label, c.op, c.dtype, c.bytes) for c in calls if c.tag == t) for t in tags}
        during = [c for c in calls if c.in_backward]
        return {
            "in_backward": {"count": len(during) / n, "bytes": sum(c.bytes for c in during) / n},
            "in_backward_by_label": table_of(during, n, lambda c: c.label or "other"),
            "collectives": len(calls) / n,
            "bytes": sum(c.bytes for c in calls) / n,
            "by_op": table(lambda c: f"{c.op}/{c.dtype}"),
            "by_label": table(lambda c: c.label or "other"),
            "steady": len({str(v) for v in signatures.values()}) <= 1,
        }


def table_of(calls: list[Call], n: int, key: Callable[[Call], str]) -> dict[str, dict[str, float]]:
    """Count and bytes of ``calls`` per ``key``, divided by ``n`` (steps)."""
    count: Counter[str] = Counter()
    nbytes: defaultdict[str, int] = defaultdict(int)
    for c in calls:
        count[key(c)] += 1
        nbytes[key(c)] += c.bytes
    return {k: {"count": count[k] / n, "bytes": nbytes[k] / n} for k in sorted(count)}
