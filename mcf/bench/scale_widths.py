"""ZeRO-3 (and any stage) counted at a model's real widths: ``mcf bench scale``'s comm phase run on the model
with a quarter and a half of its transformer blocks, extrapolated to all of them
(:func:`mcf.bench.projection.extrapolate_blocks`), then projected like the other counts.

Why: DeepSpeed's ZeRO-3 decides per parameter, by its size, whether it stays whole on every rank
(``stage3_param_persistence_threshold``: then one all-gather per parameter after every step) or is gathered
around its module's forward and backward, and it groups the gathers by its prefetch bucket. The tiny counted
model (96 wide) puts most of its weights under the threshold, ViT-B (768 wide) only its biases and norms: only
a count at ViT-B's widths shows what DeepSpeed does with ViT-B. Its depth is what the extrapolation restores:
the two counts differ by one unit of blocks, and every class of collective is linear in the blocks.
Absolute bucket sizes of the DeepSpeed config (``stage3_prefetch_bucket_size``) are scaled to the counted
model's share of the trainable elements, so that a bucket spans the same blocks; ``reduce_bucket_size`` is
mcf's ``P/8`` already.

    python -m mcf.bench.scale_widths --model mcf_vit_base_patch16 --stages 3 --options reduce-bf16 \\
        --out scale_widths.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from mcf.bench.common import emit
from mcf.bench.config import ScaleBenchConfig
from mcf.bench.projection import Compute, Network, extrapolate_blocks, model_facts, project, table
from mcf.bench.scale import run_stage

UNITS = (1, 2, 4)  # a quarter, a half, all of the blocks


def block_model(name: str, units: int, of: int = UNITS[-1]) -> str:
    """Register (in :data:`mcf.models.registry.MODELS`, this process only) model ``name`` with ``units/of`` of its
    encoder and decoder blocks, the same widths, and return its name."""
    from mcf.models.registry import MODELS

    spec = MODELS[name]
    if spec.depth % of or spec.decoder_depth % of:
        raise ValueError(f"{name}: depth {spec.depth} and decoder depth {spec.decoder_depth} must divide by {of}")
    short = f"{name}_blocks{units}of{of}"
    MODELS.setdefault(short, dataclasses.replace(spec, depth=spec.depth * units // of,
                                                 decoder_depth=spec.decoder_depth * units // of))
    return short


def register_block_model(name: str) -> None:
    """Register ``name`` if it is a :func:`block_model` name (``<model>_blocks<u>of<n>``; the comm phase's worker
    runs in its own process)."""
    import re

    m = re.fullmatch(r"(.+)_blocks(\d+)of(\d+)", name)
    if m:
        block_model(m.group(1), int(m.group(2)), int(m.group(3)))


def _ds_json(stage: int, precision: str, share: float, workdir: Path, tag: str, zero_set: dict[str, Any]) -> Path:
    """The stage's default DeepSpeed JSON with ``zero_set``'s ``zero_optimization`` keys and its absolute prefetch
    bucket scaled by ``share``."""
    from mcf.train.engine import default_ds_config_path, load_ds_json

    path = default_ds_config_path(stage, precision)
    ds = load_ds_json(str(path)) if path.is_file() else {}
    zo = ds.setdefault("zero_optimization", {})
    zo.update(zero_set)
    if "stage3_prefetch_bucket_size" in zo:
        zo["stage3_prefetch_bucket_size"] = max(1, round(zo["stage3_prefetch_bucket_size"] * share))
    out = workdir / f"ds_zero{stage}_{tag}.json"
    out.write_text(json.dumps(ds))
    return out


def count(cfg: ScaleBenchConfig, model: str, zero_set: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per counted (stage, option): the comm phase at ``UNITS[0]`` and ``UNITS[1]`` of ``model``'s blocks,
    extrapolated to all of them (the same keys as :func:`mcf.bench.scale.run`'s ``stages``)."""
    full = model_facts(model)["trainable"]
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mcf-bench-widths-") as tmp:
        for stage in cfg.stages:
            options = [o for o in cfg.options if stage in (1, 2) or not o.startswith("allreduce") and "+ema" not in o]
            for option in options:
                counted = []
                for units in UNITS[:2]:
                    name = block_model(model, units)
                    share = model_facts(name)["trainable"] / full
                    ds = _ds_json(stage, cfg.precision, share, Path(tmp), f"{units}", zero_set or {})
                    overrides = (*cfg.overrides, f"deepspeed.config={ds}") if stage == 3 else cfg.overrides
                    sub = dataclasses.replace(cfg, model=name, img_size=None, overrides=overrides, phases=("comm",))
                    counted.append(run_stage(sub, stage, Path(tmp), option, ("comm",))["comm"])
                key = f"{stage}:{option}"
                out[key] = {"comm": extrapolate_blocks(counted[0], counted[1], UNITS), "counts": counted}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mcf_vit_base_patch16")
    ap.add_argument("--stages", default="3")
    ap.add_argument("--options", default="reduce-bf16")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--gpus", default="8,64,256")
    ap.add_argument("--set", action="append", default=[], help="config override of the trainer (repeatable)")
    ap.add_argument("--zero-set", action="append", default=[],
                    help="KEY=VALUE (JSON) into the ZeRO-3 JSON's zero_optimization (repeatable), e.g. "
                         "stage3_param_persistence_threshold=0")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cfg = ScaleBenchConfig(model=args.model, stages=tuple(int(s) for s in args.stages.split(",")),
                           options=tuple(args.options.split(",")), precision=args.precision, nproc=args.nproc,
                           batch_size=args.batch_size, steps=2, phases=("comm",), overrides=tuple(args.set))
    zero_set = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.zero_set)}
    counted = count(cfg, args.model, zero_set)
    net, compute = Network(), Compute()
    rows = [project(c["comm"], int(k.split(":")[0]), args.model, g, net, compute)
            for g in (int(x) for x in args.gpus.split(",")) for k, c in counted.items()]
    print(table(rows))
    emit({"benchmark": "scale_widths", "model": args.model, "zero_set": zero_set, "units": UNITS, "counted": counted,
          "projection": rows, "projection_table": table(rows)}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
