"""``mcf pretrain`` and ``mcf export-fp32``: flags → config keys → the trainer.

Each dedicated flag is a shortcut for one config key (shown in ``--help``); ``--set key=value``
reaches every key. Resolution order: preset/YAML (``--config``), ``$MCF_OVERRIDES``, the flags,
then ``--set``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

from mcf.errors import ConfigError

# flag dest → (config key, metavar, type, help)
FLAGS: dict[str, tuple[str, str, Any, str]] = {
    "output_dir": (
        "train.output_dir", "DIR", str,
        "run folder (config.yaml, metrics.jsonl, checkpoints/, reconstructions/, mlflow.db)",
    ),
    "data": (
        "data.path", "PATH", str,
        "image folder, mcf LMDB, the paper's LMDB, webdataset .tar shards (a folder of them, a brace pattern such as "
        "/d/{00000..00099}.tar, a .txt list of paths or URLs, pipe:COMMAND), or 'builtin' (the built-in faces)",
    ),
    "lmdb_keys": ("data.lmdb_keys", "FILE", str, "key list of the paper's LMDB layout"),
    "loader": ("data.loader", "auto|dali|torch", str, "input pipeline"),
    "model": ("model.name", "NAME", str, "registered model (mcf_vit_tiny, mcf_vit_base_patch16, ...)"),
    "batch_size": ("train.batch_size", "N", int, "micro-batch size per rank"),
    "accum_steps": ("train.accum_steps", "N", int, "gradient accumulation steps per optimizer step"),
    "max_steps": ("train.max_steps", "N", int, "stop after N optimizer steps (overrides --epochs)"),
    "epochs": ("train.epochs", "N", int, "epochs to train"),
    "precision": ("train.precision", "fp32|bf16|fp16", str, "training precision (fp16: dynamic loss scaling)"),
    "zero": ("deepspeed.zero", "0|1|2|3", int, "ZeRO stage"),
    "checkpoint_every": ("checkpoint.every", "N", int, "steps between checkpoints (a final one is always written)"),
    "log_every": ("logging.log_every", "N", int, "steps between metric logs"),
    "resume": (
        "train.resume", "auto|none|PATH", str,
        "auto = newest complete checkpoint in the output dir; or a checkpoint/run path",
    ),
    "seed": ("train.seed", "N", int, "seed of weights, masks, augmentation and data order"),
    "teacher_checkpoint": (
        "teacher.checkpoint", "PATH|random", str, "frozen perceptual teacher weights ('random' for tests)"
    ),
    "tracking_uri": (
        "logging.tracking_uri", "URI|none", str,
        "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a sqlite store in the output dir; 'none' = off)",
    ),
    "max_bad_fraction": (
        "data.max_bad_fraction", "F", float, "stop when more than this fraction of samples fails to decode"
    ),
    "overwrite_run": (
        "train.overwrite_run", "", bool,
        "start a new run in an output dir that holds one: delete that run's checkpoints and logs first",
    ),
}

OVERRIDES_ENV = "MCF_OVERRIDES"

EPILOG = f"""\
Any config key can be set with --set section.key=value (list them with `mcf config --list`; `mcf config
--config NAME --set ...` prints the resolved config). ${OVERRIDES_ENV} may hold whitespace-separated key=value pairs,
applied after the preset and before the flags (handy for `mcf` with no arguments, e.g.
{OVERRIDES_ENV}="train.max_steps=20").

Launch on several processes with torchrun, the deepspeed launcher (`deepspeed --no_local_rank
--num_gpus N --module mcf pretrain ...`) or srun; ranks come from the environment. A run stopped
by SIGTERM or SIGUSR1 checkpoints and exits with status 3 (requeue), and `--resume auto` (the
default) continues it. Exit status 2: a user error (one line on stderr); 1: the run failed."""


def _updates(args: argparse.Namespace) -> dict[str, Any]:
    updates: dict[str, Any] = {}
    for dest, (key, *_rest) in FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        section, leaf = key.split(".")
        updates.setdefault(section, {})[leaf] = value
    return updates


def config_from_args(args: argparse.Namespace):
    """preset/YAML → $MCF_OVERRIDES → dedicated flags → --set, validated once at the end."""
    from mcf.config import Config, preset_dict
    from mcf.configtree import resolve

    return resolve(Config, preset_dict(args.config), env=shlex.split(os.environ.get(OVERRIDES_ENV, "")),
                   flags=_updates(args), overrides=args.set)


def monitor_factory(cfg) -> Callable[..., Any] | None:
    """The representation monitor's builder when ``monitor.every > 0``: downstream's, injected into the
    trainer from this entry point (``train`` sits below ``downstream`` and imports nothing from it)."""
    if cfg.monitor.every <= 0:
        return None
    try:  # imported only when asked for: the probes read scikit-image's faces
        from mcf.downstream.monitor import build_monitor
    except ImportError as e:
        raise ConfigError(f"monitor.every={cfg.monitor.every} needs mcf.downstream.monitor, which is unavailable "
                          f"({e}); set monitor.every=0") from None
    return build_monitor


def run_pretrain(args: argparse.Namespace) -> int:
    from mcf.train.trainer import Trainer, TrainingError

    cfg = config_from_args(args)
    try:
        return Trainer(cfg, monitor_factory=monitor_factory(cfg)).fit()
    except TrainingError as e:
        print(f"mcf: error: {e}", file=sys.stderr)
        return 1


def run_export(args: argparse.Namespace) -> int:
    from mcf.train.checkpoint import export_fp32

    d = export_fp32(args.checkpoint, args.out)
    n = sum(v.numel() for v in d["online"].values())
    logging.getLogger(__name__).info(
        "wrote %s: step %d, %d online parameters (fp32), %d target tensors", args.out, d["step"], n, len(d["target"])
    )
    return 0


# The config class of each other command, by name: `mcf config --list --command NAME` documents its keys.
# Imported by name so that train imports nothing from the packages above it.
COMMAND_CONFIGS = {
    "finetune": ("mcf.downstream.finetune", "FinetuneConfig"),
    "bench-step": ("mcf.bench.config", "StepBenchConfig"),  # `mcf bench step` and `mcf bench e2e`
    "bench-data": ("mcf.bench.config", "DataBenchConfig"),
    "bench-index-scale": ("mcf.bench.config", "IndexScaleConfig"),  # `mcf bench data --index-scale N`
    "bench-memory": ("mcf.bench.config", "MemoryBenchConfig"),
    "bench-scale": ("mcf.bench.config", "ScaleBenchConfig"),
    "bench-scale-widths": ("mcf.bench.config", "ScaleWidthsConfig"),
    "bench-ema-drift": ("mcf.bench.config", "EmaDriftConfig"),
    "bench-attention": ("mcf.bench.config", "AttentionTableConfig"),  # `mcf bench attention --table`
}


def _command_config(args: argparse.Namespace) -> type:
    import importlib

    module, name = COMMAND_CONFIGS[args.command_keys]
    return getattr(importlib.import_module(module), name)


def run_config(args: argparse.Namespace) -> int:
    """Print the resolved config as YAML, or every key with its resolved value, the dataclass default
    where the preset or an override changed it, and its help (``--list``)."""
    from mcf.config import Config, dump_config
    from mcf.configtree import REQUIRED, describe, describe_fields, resolve, to_dict
    from mcf.train.metrics import flatten

    if args.command_keys != "pretrain":
        if not args.list:
            raise ConfigError("--command selects the keys --list prints; the resolved config is printed for pretrain "
                              "only")
        cls = _command_config(args)
        rows = describe_fields(cls)
        if any(default == REQUIRED for _, default, _ in rows):  # finetune: its declared defaults, None = the protocol's
            for key, default, text in rows:
                print(f"{key} = {default!r}\n    {text}")
            return 0
        resolved = flatten(to_dict(resolve(cls, overrides=args.set)))  # the bench configs: --set applies
        print(f"# the {args.command_keys} keys{' with the overrides given' if args.set else ''}: key = value as it "
              "runs [default where that differs]")
        for key, default, text in describe(cls):
            note = f"  [default {default!r}]" if resolved[key] != default else ""
            print(f"{key} = {resolved[key]!r}{note}\n    {text}")
        return 0
    cfg = config_from_args(args)
    if args.list:
        resolved = flatten(to_dict(cfg))
        print(f"# the keys of `mcf pretrain --config {args.config}`{' with the overrides given' if args.set else ''}: "
              "key = value as it runs [built-in default where that differs]")
        for key, default, text in describe(Config):
            value = resolved[key]
            note = f"  [default {default!r}]" if value != default else ""
            print(f"{key} = {value!r}{note}\n    {text}")
        return 0
    print(dump_config(cfg), end="")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    c = subparsers.add_parser(
        "config", help="print the resolved config (preset + flags + --set), or list every key (--list)"
    )
    c.add_argument("--config", default="demo", metavar="NAME|PATH", help="preset name or YAML file (default: demo)")
    c.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key (repeatable)"
    )
    c.add_argument("--list", action="store_true",
                   help="list every key with its value in the preset in use (--config, default demo), and its "
                        "documentation")
    c.add_argument("--command", dest="command_keys", choices=("pretrain", *COMMAND_CONFIGS), default="pretrain",
                   help="whose keys --list prints: pretrain's tree, finetune's (declared defaults; its --set keys; "
                        "None = the protocol's value), or a benchmark's (`mcf bench "
                        "step|e2e|data|memory|scale|scale-widths|ema-drift`; bench-index-scale: `mcf bench data "
                        "--index-scale N`; bench-attention: `mcf bench attention --table`), resolved with --set")
    c.set_defaults(func=run_config)

    p = subparsers.add_parser(
        "pretrain", help="MCF pre-training (DeepSpeed; 1 process, torchrun, deepspeed or srun)",
        description="MCF pre-training. With no arguments: the demo preset (tiny model, built-in faces).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", default="demo", metavar="NAME|PATH",
        help="preset name (demo, small, base, large, huge) or a YAML file (default: demo)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key (repeatable)"
    )
    for dest, (key, metavar, tp, text) in FLAGS.items():
        if tp is bool:  # a switch: sets the key to true
            p.add_argument("--" + dest.replace("_", "-"), dest=dest, action="store_const", const=True, default=None,
                           help=f"{text} [{key}=true]")
            continue
        p.add_argument(
            "--" + dest.replace("_", "-"), dest=dest, type=tp, default=None, metavar=metavar, help=f"{text} [{key}]"
        )
    # the deepspeed launcher's; LOCAL_RANK wins
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_pretrain)

    e = subparsers.add_parser(
        "export-fp32", help="consolidate a pre-training checkpoint (any ZeRO stage) into one fp32 file",
        description=(
            "Write {online, target, config, step} (fp32) with torch.save; load with "
            "torch.load(..., weights_only=True) or mcf.train.checkpoint.load_consolidated."
        ),
    )
    e.add_argument(
        "checkpoint", metavar="CKPT", help="a run folder (newest complete checkpoint) or a checkpoints/step_* directory"
    )
    e.add_argument("out", metavar="OUT.pt", help="output file")
    e.set_defaults(func=run_export)
