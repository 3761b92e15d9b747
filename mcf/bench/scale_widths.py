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

    mcf bench scale-widths --model mcf_vit_base_patch16 --stages 3 --options reduce-bf16 --out scale_widths.json

(``python -m mcf.bench.scale_widths ...`` is the same command.) Its keys: ``mcf config --list --command
bench-scale-widths`` (:class:`~mcf.bench.config.ScaleWidthsConfig`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from mcf.bench.common import emit
from mcf.bench.config import ScaleWidthsConfig
from mcf.bench.projection import extrapolate_blocks, model_facts, project, table
from mcf.bench.scale import run_stage
from mcf.errors import ConfigError

log = logging.getLogger(__name__)
UNITS = (1, 2, 4)  # the default units: a quarter, a half, all of the blocks (ScaleWidthsConfig.units)


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


def check_model(name: str, of: int) -> None:
    """A one-line :class:`~mcf.errors.ConfigError` unless ``name`` is a registered model whose encoder and decoder
    depths divide by ``of`` (checked before any rank starts)."""
    from mcf.models.registry import MODELS

    if name not in MODELS:
        raise ConfigError(f"bench scale-widths: unknown model {name!r} (mcf.models.list_models())")
    spec = MODELS[name]
    if spec.depth % of or spec.decoder_depth % of:
        raise ConfigError(f"bench scale-widths: {name}'s depth {spec.depth} and decoder depth {spec.decoder_depth} "
                          f"must divide by units[2]={of}")


def count(cfg: ScaleWidthsConfig) -> dict[str, dict[str, Any]]:
    """Per counted (stage, option): the comm phase at ``units[0]`` and ``units[1]`` of ``cfg.model``'s blocks (in
    units of ``units[2]``), extrapolated to all of them (the same keys as :func:`mcf.bench.scale.run`'s
    ``stages``)."""
    model, of, zero_set = cfg.model, cfg.units[2], cfg.zero_optimization()
    full = model_facts(model)["trainable"]
    base = cfg.scale_config()
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mcf-bench-widths-") as tmp:
        for stage in cfg.stages:
            options = [o for o in cfg.options if stage in (1, 2) or not o.startswith("allreduce") and "+ema" not in o]
            for option in options:
                counted = []
                for units in cfg.units[:2]:
                    name = block_model(model, units, of)
                    share = model_facts(name)["trainable"] / full
                    ds = _ds_json(stage, cfg.precision, share, Path(tmp), f"{units}", zero_set)
                    overrides = (*cfg.overrides, f"deepspeed.config={ds}") if stage == 3 else cfg.overrides
                    sub = dataclasses.replace(base, model=name, img_size=None, overrides=overrides)
                    log.info("bench scale-widths: %s, ZeRO-%d, %s", name, stage, option)
                    counted.append(run_stage(sub, stage, Path(tmp), option, ("comm",))["comm"])
                key = f"{stage}:{option}"
                out[key] = {"comm": extrapolate_blocks(counted[0], counted[1], cfg.units), "counts": counted}
    return out


def main(cfg: ScaleWidthsConfig) -> dict[str, Any]:
    """Count, extrapolate, project; the result JSON printed (and written to ``cfg.out``), the table on stderr."""
    check_model(cfg.model, cfg.units[2])
    counted = count(cfg)
    rows = [project(c["comm"], int(k.split(":")[0]), cfg.model, g, cfg.network, cfg.compute)
            for g in cfg.gpus for k, c in counted.items()]
    print(table(rows), file=sys.stderr)
    result = {"benchmark": "scale_widths", "model": cfg.model, "zero_set": cfg.zero_optimization(),
              "units": list(cfg.units), "counted": counted, "projection": rows, "projection_table": table(rows)}
    emit(result, cfg.out)
    return result


if __name__ == "__main__":  # the former entry point: the same process becomes `python -m mcf.bench scale-widths`
    # (an exec, not an import: the command line sits above this module)
    os.execv(sys.executable, [sys.executable, "-m", "mcf.bench", "scale-widths", *sys.argv[1:]])
