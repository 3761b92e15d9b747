"""Step time and scaling efficiency at many GPUs, projected from the collectives the real trainer
issued on a few ranks (``mcf bench scale``'s ``comm`` phase) and a stated network model.

What is counted, and what is modelled:

- Counted (:mod:`mcf.bench.comm`, the trainer's step 2 on ``W0`` gloo ranks with a small model):
  every collective in order, its operation, dtype, bytes, who issued it (``grads``: the engine's
  backward and its epilogue; ``params``: the engine's step; ``ema``; ``keys``; ``other``) and whether
  it was issued while the backward still ran. From these come the bytes per element of each class
  (the reduce dtype, the forward dtype), the operations, the order and the share of the gradient
  reduction issued during the backward (``overlap_comm``).
- Scaled to a model and ``W`` GPUs: gradient and parameter traffic by the model's trainable elements;
  the EMA's gather by its padded rows at ``W`` (:func:`mcf.train.ds_internals.flat_row_lengths` at ZeRO-1/2,
  ``ceil(numel / W)`` pieces at ZeRO-3); the contrastive keys by ``W × batch × proj_dim``; the
  number of owner reduces by the ``W − W0`` extra owners per optimizer group.
- Network (:class:`Network`): a ring per collective; each GPU sends ``(W − 1)/W`` of an all-gather's
  output or a reduce-scatter's input (twice that for an all-reduce; DeepSpeed's per-owner reduces of
  a bucket add up to one reduce-scatter), at the NVLink bus bandwidth within a node and across nodes
  at the smaller of that and the node's NICs (rail-aligned rings; ``rail_aligned=False``: one NIC);
  latency ``(W − nodes)·hop_intra + nodes·hop_inter`` per collective (x2 for an all-reduce).
- Compute (:class:`Compute`): the step's FLOPs counted on the meta device
  (:func:`mcf.models.flops.step_flops`) at a stated MFU of a stated peak.
- Overlap: the reduction issued during the backward runs beside the backward's compute (what exceeds
  it is exposed); the rest of the reduction (the last bucket, after the backward) is exposed; at
  ZeRO-3 the parameter gathers of the forward, and everywhere the EMA's gather (awaited by the
  target's forward, which runs after the online forward) run beside the forward; the parameter
  all-gather after the step (ZeRO-1/2), the keys and the flags are exposed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mcf.configtree import field

# ops whose bytes a ring moves twice per rank
_ALL_REDUCE = ("all_reduce", "all_reduce_coalesced")


@dataclass(kw_only=True)
class Network:
    """The network the projection assumes (defaults: H100 SXM nodes of 8 GPUs, NVLink 4, one 400 Gb/s NIC
    per GPU, NCCL's rings rail-aligned: each of a node's GPUs is the cross-node hop of its own rings, so
    a collective across nodes moves ``gpus_per_node`` NICs' worth of bandwidth per GPU ring)."""

    gpus_per_node: int = field(8, flag=True, help="GPUs per node.")
    intra_GBps: float = field(360.0, flag="--intra-gbytes", help=(
        "Bus bandwidth per GPU within a node (GB/s): NVLink 4 is 450 GB/s each way; ~360 is what NCCL reaches."))
    inter_Gbps: float = field(400.0, flag="--inter-gbits", help="Per GPU, across nodes (Gb/s): the GPU's NIC.")
    inter_efficiency: float = field(0.8, flag=True, help=(
        "The share of the NIC's line rate a collective reaches (protocol, congestion)."))
    rail_aligned: bool = field(True, flag="--one-nic-per-ring", const=False, help=(
        "Rings cross nodes through every NIC of a node at once (NCCL on rail-optimised fabrics); False: each GPU's "
        "traffic leaves through its one NIC (a pessimistic bound, the issue's 40 GB/s per GPU)."), flag_help=(
        "pessimistic: a GPU's cross-node traffic leaves through its one NIC (no rail-aligned rings)"))
    hop_intra_us: float = field(1.0, flag=True, help="Latency per ring hop within a node (µs).")
    hop_inter_us: float = field(5.0, flag=True, help="Latency per ring hop between nodes (µs).")

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1 or min(self.intra_GBps, self.inter_Gbps) <= 0 or not 0 < self.inter_efficiency <= 1:
            raise ValueError("gpus_per_node, intra_GBps and inter_Gbps must be positive, 0 < inter_efficiency <= 1")
        if min(self.hop_intra_us, self.hop_inter_us) < 0:
            raise ValueError("hop latencies must be >= 0")

    def bus_GBps(self, world: int) -> float:
        """The bandwidth (GB/s) at which each GPU sends its share of a ring collective on ``world`` GPUs."""
        if world <= self.gpus_per_node:
            return self.intra_GBps
        nic = self.inter_Gbps / 8 * self.inter_efficiency * (self.gpus_per_node if self.rail_aligned else 1)
        return min(self.intra_GBps, nic)

    @staticmethod
    def wire_bytes(op: str, nbytes: float, world: int) -> float:
        """Bytes each GPU sends for one collective of ``nbytes`` (its buffer, as :mod:`mcf.bench.comm`
        counts it): ``(W − 1)/W`` of it, twice for an all-reduce."""
        if world <= 1:
            return 0.0
        return (2 if op in _ALL_REDUCE else 1) * (world - 1) / world * nbytes

    def seconds(self, op: str, nbytes: float, world: int) -> float:
        """One collective of ``nbytes`` on ``world`` GPUs: ring latency plus its wire bytes at the bus bandwidth."""
        if world <= 1:
            return 0.0
        nodes = math.ceil(world / self.gpus_per_node)
        hops = ((world - nodes) * self.hop_intra_us + (nodes if nodes > 1 else 0) * self.hop_inter_us) * 1e-6
        passes = 2 if op in _ALL_REDUCE else 1
        return passes * hops + self.wire_bytes(op, nbytes, world) / (self.bus_GBps(world) * 1e9)


@dataclass(kw_only=True)
class Compute:
    peak_tflops: float = field(989.0, flag=True, help="The GPU's dense bf16 peak (TFLOP/s; H100 SXM: 989).")
    mfu: float = field(0.45, flag=True, help=(
        "The share of the peak the step's compute reaches (40-50 % for ViT training on H100)."))
    batch_size: int = field(64, flag="--project-batch", help="Images per GPU per step of the projection.")

    def __post_init__(self) -> None:
        if self.peak_tflops <= 0 or not 0 < self.mfu <= 1 or self.batch_size < 1:
            raise ValueError("peak_tflops > 0, 0 < mfu <= 1 and batch_size >= 1 are required")


@lru_cache(maxsize=16)
def model_facts(name: str) -> dict[str, Any]:
    """Sizes of model ``name`` (meta device, no weights): trainable online elements, the optimizer groups
    as (name, numel) lists, the EMA's tracked and fixed elements, the projection's output width."""
    from mcf.models import create_model
    from mcf.train.optim import param_groups

    with torch.device("meta"):
        model = create_model(name, teacher_checkpoint="random")
    online = dict(model.online.named_parameters())
    names = {id(p): n for n, p in online.items()}
    groups = [[(names[id(p)], p.numel()) for p in g["params"]] for g in param_groups(model.online, 0.05)]
    target = {n: p.numel() for n, p in model.target.named_parameters()}
    fixed = {n: k for n, k in target.items() if n in online and not online[n].requires_grad}
    return {
        "trainable": sum(k for g in groups for _, k in g),
        "groups": groups,
        "tracked": {n: k for n, k in target.items() if n not in fixed},
        "fixed": fixed,
        "target": sum(target.values()),
        "proj_dim": model.spec.proj_dim,
    }


@lru_cache(maxsize=16)
def flops_per_image(name: str) -> tuple[float, float, float]:
    """(step, online forward, backward) FLOPs per image of model ``name``, counted on the meta device
    (the backward: the step's count less the forward's)."""
    from mcf.models import create_model
    from mcf.models.flops import meta_model, step_flops

    def build() -> Any:
        return create_model(name, teacher_checkpoint="random")

    batch = 2
    total = step_flops(build, batch)
    model, images = meta_model(build, batch)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    per_module = counter.get_flop_counts()
    forward = sum(per_module["Global"].values())
    online = sum(per_module.get("MCF.online", {}).values())
    return total / batch, online / batch, (total - forward) / batch


def ema_gather_elements(facts: dict[str, Any], stage: int, world: int) -> int:
    """Elements the EMA's gather receives per step on ``world`` ranks: ``W × max(share)`` (0: no gather)."""
    from mcf.train.ds_internals import flat_row_lengths

    if stage == 3:  # every rank a ceil(numel / W) piece of each parameter; frozen ones whole, to the shortest row
        rows = [sum(-(-k // world) for k in facts["tracked"].values())] * world
        for k in sorted(facts["fixed"].values(), reverse=True):
            rows[rows.index(min(rows))] += k
        return world * max(rows)
    rows = flat_row_lengths(facts["groups"], facts["tracked"], facts["fixed"], world)
    return world * max(rows)


def _scaled_calls(counted: dict[str, Any], stage: int, facts: dict[str, Any], world: int,
                  batch: int) -> list[dict[str, Any]]:
    """The counted step's collectives (``counted``: the comm phase's result) rescaled to a model and
    ``world`` ranks, in the counted order."""
    small = counted["facts"]
    w0 = counted["world"]
    ratio = facts["trainable"] / small["trainable"]
    ema0 = counted["ema_gather_elements"]
    ema = ema_gather_elements(facts, stage, world)
    keys = world * batch * facts["proj_dim"] / (w0 * counted["batch_size"] * small["proj_dim"])
    groups = len(facts["groups"])
    out = []
    reduces_added = False
    for label, op, dtype, nbytes, in_backward, *times in counted["step_2_calls"]:
        count = times[0] if times else 1.0  # extrapolate_blocks' calls stand for several of one class
        if count <= 0:
            continue
        each = nbytes / count  # scales with the model, else a flag/scalar
        big = each >= 64 * 1024 or each >= 0.01 * small["trainable"]
        if label == "ema":
            scaled = nbytes / ema0 * ema if ema0 else 0.0
        elif label == "keys":
            scaled = nbytes * keys
        elif big:
            scaled = nbytes * ratio
        else:
            scaled = float(nbytes)
        if label == "grads" and op == "reduce" and not reduces_added:
            count += groups * (world - w0)  # each optimizer group's extra owners get a reduce of their own
            reduces_added = True
        out.append({"label": label, "op": op, "dtype": dtype, "bytes": scaled, "count": count,
                    "in_backward": bool(in_backward), "scales": big or label in ("ema", "keys")})
    return out


def extrapolate_blocks(small: dict[str, Any], large: dict[str, Any],
                       units: tuple[float, float, float]) -> dict[str, Any]:
    """The counted step of a model extrapolated from two counts of it with fewer transformer blocks (the same
    widths, so DeepSpeed classifies every parameter alike: persistent or gathered at ZeRO-3, bucket by bucket).

    ``units``: (the blocks of ``small``, of ``large``, of the model) in one unit, e.g. (1, 2, 4) for ViT-B/16
    counted with 3+2 and 6+4 encoder+decoder blocks (12+8). Every class of collective (label, operation,
    dtype, issued during the backward) is linear in the blocks, in number and in bytes (each block adds its
    parameters' gathers and gradients; the rest is fixed): ``small + (large − small)·(u − u₀)/(u₁ − u₀)``.
    A collective's time is affine in its bytes, so a class projects as its count times one call of its mean
    size (:func:`project`); the order within the step is lost, the phase (backward, forward, after) is kept."""
    u0, u1, u = units
    f = (u - u0) / (u1 - u0)

    def classes(c: dict[str, Any]) -> dict[tuple, list[float]]:
        out: dict[tuple, list[float]] = {}
        for label, op, dtype, nbytes, in_backward, *times in c["step_2_calls"]:
            acc = out.setdefault((label, op, dtype, bool(in_backward)), [0.0, 0.0])
            acc[0] += times[0] if times else 1.0
            acc[1] += nbytes
        return out

    a, b = classes(small), classes(large)
    calls = []
    for key in dict.fromkeys([*a, *b]):
        (n0, b0), (n1, b1) = a.get(key, [0.0, 0.0]), b.get(key, [0.0, 0.0])
        n, nbytes = max(0.0, n0 + (n1 - n0) * f), max(0.0, b0 + (b1 - b0) * f)
        calls.append([key[0], key[1], key[2], nbytes, key[3], n])

    def lin(x0: float, x1: float) -> float:
        return x0 + (x1 - x0) * f

    out = dict(small)
    out["step_2_calls"] = calls
    out["facts"] = {**small["facts"], "trainable": round(lin(small["facts"]["trainable"], large["facts"]["trainable"]))}
    out["ema_gather_elements"] = round(lin(small["ema_gather_elements"], large["ema_gather_elements"]))
    out["extrapolated_from"] = {"units": list(units), "trainable": [small["facts"]["trainable"],
                                                                    large["facts"]["trainable"]]}
    return out


def project(counted: dict[str, Any], stage: int, model: str, world: int, net: Network,
            compute: Compute) -> dict[str, Any]:
    """The projected step of ``model`` on ``world`` GPUs (see the module doc): compute, each class's bytes
    and time, what overlaps, the step time and the scaling efficiency (compute / step)."""
    facts = model_facts(model)
    total, online_forward, backward = flops_per_image(model)
    t_compute = total * compute.batch_size / (compute.peak_tflops * 1e12 * compute.mfu)
    t_bwd = t_compute * backward / total
    t_fwd = t_compute * online_forward / total  # what the EMA's gather (and ZeRO-3's forward gathers) run beside
    calls = _scaled_calls(counted, stage, facts, world, compute.batch_size)
    phases = {"backward": 0.0, "forward": 0.0, "exposed": 0.0}
    by_label: dict[str, dict[str, float]] = {}
    for c in calls:
        t = c["count"] * net.seconds(c["op"], c["bytes"] / c["count"], world)
        if c["in_backward"]:
            phase = "backward"
        elif c["label"] == "ema" or (stage == 3 and c["label"] == "other" and c["scales"]):
            phase = "forward"
        else:
            phase = "exposed"
        phases[phase] += t
        d = by_label.setdefault(c["label"], {"bytes": 0.0, "wire_bytes": 0.0, "collectives": 0.0, "seconds": 0.0})
        d["bytes"] += c["bytes"]
        d["wire_bytes"] += net.wire_bytes(c["op"], c["bytes"], world)
        d["collectives"] += c["count"]
        d["seconds"] += t
    exposed = phases["exposed"] + max(0.0, phases["backward"] - t_bwd) + max(0.0, phases["forward"] - t_fwd)
    step = t_compute + exposed
    grads = by_label.get("grads", {"bytes": 0.0})
    params_bytes = facts["trainable"] * counted["param_bytes"]
    reduce_bytes = facts["trainable"] * counted["reduce_bytes"]
    # ZeRO-3 gathers the parameters for the forward and, unless they stay gathered through the backward (mcf's
    # ds_configs/zero3: stage3_max_live_parameters 1e9 >= the model, the default reuse distance), again for it
    regather = any(c["label"] == "other" and c["op"].startswith("all_gather") and c["in_backward"] for c in calls)
    minimum = {0: reduce_bytes, 1: reduce_bytes + params_bytes, 2: reduce_bytes + params_bytes,
               3: reduce_bytes + (2 if regather else 1) * params_bytes}[stage]
    # the target's weights reach every rank each step where the EMA of the fp32 masters is sharded with them
    # (train.ema_source=bf16_params averages the gathered bf16 weights instead: no bytes of its own)
    sharded = counted.get("ema_source", "fp32_masters") == "fp32_masters" and (
        stage == 3 or (stage in (1, 2) and counted["precision"] != "fp32"))
    minimum += facts["target"] * counted["forward_bytes"] if sharded else 0
    minimum += world * compute.batch_size * facts["proj_dim"] * 4
    nbytes = sum(c["bytes"] for c in calls)
    wire = sum(d["wire_bytes"] for d in by_label.values())
    minimum_wire = (world - 1) / world * minimum  # every one of them a ring all-gather or reduce-scatter
    return {
        "model": model,
        "gpus": world,
        "zero": stage,
        "option": counted["option"],
        "compute_ms": t_compute * 1e3,
        "backward_ms": t_bwd * 1e3,
        "online_forward_ms": t_fwd * 1e3,
        "comm_ms": {"during_backward": phases["backward"] * 1e3, "during_forward": phases["forward"] * 1e3,
                    "exposed_alone": phases["exposed"] * 1e3},
        "exposed_ms": exposed * 1e3,
        "step_ms": step * 1e3,
        "efficiency": t_compute / step,
        "bytes": nbytes,
        "minimum_bytes": minimum,
        "bytes_over_minimum": nbytes / minimum,
        "wire_bytes": wire,
        "wire_over_minimum": wire / minimum_wire if minimum_wire else 1.0,
        "by_label": by_label,
        "grads_overlap_share": grads.get("bytes", 0.0) and sum(
            c["bytes"] for c in calls if c["label"] == "grads" and c["in_backward"]) / grads["bytes"],
        "ema_gather_elements": ema_gather_elements(facts, stage, world) if sharded else 0,
        "network": asdict(net),
        "compute": asdict(compute),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per projected (model, GPUs, stage, option)."""
    out = ["| model | GPUs | ZeRO | option | compute ms | comm ms (in backward / in forward / alone) | exposed ms "
           "| step ms | efficiency | GB sent / GPU / step | / minimum |",
           "|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r["comm_ms"]
        out.append(f"| {r['model']} | {r['gpus']} | {r['zero']} | {r['option']} | {r['compute_ms']:.1f} | "
                   f"{c['during_backward']:.1f} / {c['during_forward']:.1f} / {c['exposed_alone']:.1f} | "
                   f"{r['exposed_ms']:.1f} | {r['step_ms']:.1f} | {100 * r['efficiency']:.1f} % | "
                   f"{r['wire_bytes'] / 1e9:.3f} | {r['wire_over_minimum']:.2f} |")
    return "\n".join(out)
