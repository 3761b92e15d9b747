"""bf16 buffers and torch.compile (found by the CPU rehearsal of benchmarks/gpu_check.sh).

The trainer casts the engine module's floating buffers to the training dtype. Done through
``buf.data = …`` a buffer that is a view (the sin-cos position tables) kept its fp32 base, and every
``train.compile=true`` bf16 run failed in dynamo ("torch.float32 != torch.bfloat16"). The eager
backend runs dynamo's tracing, which is where it failed, without Inductor's compile time.
"""

from __future__ import annotations

import torch

from mcf.models import create_model
from mcf.train.engine import cast_floating_buffers


def test_cast_buffers_are_new_tensors_that_dynamo_traces():
    torch.manual_seed(0)
    online = create_model("mcf_vit_tiny", teacher_checkpoint="random", depth=1, decoder_depth=1).online
    assert online.encoder.pos_embed._base is not None  # the position table is a view: the case that failed
    for p in online.parameters():  # as DeepSpeed casts the parameters (ZeRO 1/2 bf16)
        p.data = p.data.to(torch.bfloat16)
    cast_floating_buffers(online, torch.bfloat16)
    assert all(b.dtype == torch.bfloat16 for b in online.buffers() if b.is_floating_point())
    assert all(b._base is None or b._base.dtype == b.dtype for b in online.buffers())
    x, noise = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16), torch.rand(2, 64)
    compiled = torch.compile(online, backend="eager", fullgraph=True)
    out = compiled(x, 0.75, noise)
    ref = online(x, 0.75, noise)
    # bit-exact: the eager backend runs the same aten ops as eager mode, on one host
    assert torch.equal(out.pred, ref.pred) and out.pred.dtype == torch.bfloat16
