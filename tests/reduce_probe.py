"""Runs ``mcf <args>`` in this process and records every reduction collective's dtype and size.

Usage: ``python tests/reduce_probe.py OUT.json pretrain ...``. The JSON holds the exit status, the
engine's and its ZeRO optimizer's ``communication_data_type``, and ``[name, dtype, numel]`` per
all_reduce / reduce (ZeRO-1/2 buckets to their owners) / reduce_scatter call (the torch.distributed
functions are wrapped before DeepSpeed is imported, since DeepSpeed keeps references to some of
them). Used by tests/test_reduce_dtype.py.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

REDUCTIONS = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor")
records: list[tuple[str, str, int]] = []
engines: list = []


def _wrap(name: str) -> None:
    fn = getattr(dist, name)

    def wrapped(*args, **kwargs):
        values = [*args, *kwargs.values()]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        for v in values:
            if isinstance(v, (list, tuple)):
                tensors += [t for t in v if isinstance(t, torch.Tensor)]
        reduced = tensors[-1] if name.startswith("reduce_scatter") else tensors[0]  # reduce_scatter: (output, input)
        records.append((name, str(reduced.dtype).removeprefix("torch."), reduced.numel()))
        return fn(*args, **kwargs)

    setattr(dist, name, wrapped)


for _name in REDUCTIONS:
    _wrap(_name)

import deepspeed  # noqa: E402

_initialize = deepspeed.initialize


def _recording_initialize(*args, **kwargs):
    result = _initialize(*args, **kwargs)
    engines.append(result[0])
    return result


deepspeed.initialize = _recording_initialize

from mcf.cli import main  # noqa: E402

rc = main(sys.argv[2:])
engine = engines[0] if engines else None
comm = {
    "engine": str(engine.communication_data_type).removeprefix("torch.") if engine else None,
    "optimizer": str(getattr(engine.optimizer, "communication_data_type", None)).removeprefix("torch.")
    if engine
    else None,
}
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "communication_data_type": comm, "records": records}, f)
sys.exit(rc)
