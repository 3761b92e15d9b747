"""``mcf bench {step,e2e,data,attention,memory,scale,scale-widths,ema-drift}``: each prints JSON, with ``--out``
writes it, and logs it as an MLflow run (:mod:`mcf.bench.tracking`); ``mcf bench history`` and ``mcf bench results``
read the tracked runs back.

Each benchmark's settings are a config of :mod:`mcf.bench.config` (its dedicated flags are sugar for its keys, read
from the fields' metadata; ``--set key=value`` and ``--config FILE`` reach every key); each benchmark module is
imported when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from mcf.bench.config import (
    AttentionTableConfig,
    DataBenchConfig,
    EmaDriftConfig,
    IndexScaleConfig,
    MemoryBenchConfig,
    ScaleBenchConfig,
    ScaleWidthsConfig,
    StepBenchConfig,
)
from mcf.config import Config, preset_dict
from mcf.configtree import add_flags, flag_dest, flag_fields, flag_value, flags_given, flat_keys, merge, resolve
from mcf.errors import ConfigError

E2E_KEYS = ("data", "workers", "loader")  # StepBenchConfig keys with a flag on `mcf bench e2e` only
E2E_BASE = {"e2e": True, "order": "sequential"}  # what `mcf bench e2e` sets over StepBenchConfig's defaults

CONFIG_EPILOG = """\
Each flag sets the config key named in its help; --set key=value reaches every key (list them with `mcf config
--list --command bench-{command}`). Resolution order, as for pretrain and finetune: the defaults, --config FILE (a
YAML of keys), the flags, then --set. An unknown key or a bad value is a one-line error (exit status 2)."""


def _config_args(p: argparse.ArgumentParser, command: str, set_help: str | None = None) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML file of this benchmark's keys (`inherit:` another file), applied before the flags")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=set_help or f"set any config key (repeatable; `mcf config --list --command bench-{command}`)")


def _resolve(cls: type, args: argparse.Namespace, name: str, *, base: dict | None = None,
             flags: dict | None = None, overrides: list[str] | None = None):
    """``cls`` resolved as every mcf command resolves its config (:func:`mcf.configtree.resolve`): its defaults,
    ``base`` (what the subcommand sets), ``--config FILE``, the flags given, then ``--set``; any error is one line
    naming the benchmark."""
    try:
        data = dict(base or {})
        if args.config is not None:
            if not Path(args.config).suffix:
                raise ConfigError(f"--config takes a YAML file of bench {name} keys, got {args.config!r}")
            data = merge(data, preset_dict(args.config))
        given = flags_given(cls, args) if flags is None else flags
        return resolve(cls, data, flags=given, overrides=args.set if overrides is None else overrides)
    except ValueError as e:  # ConfigError, or a section's own check (projection.Network raises ValueError)
        raise ConfigError(f"bench {name}: {e}") from None


def logged_flags(cfg, cls: type, *, skip=(), base: dict | None = None) -> dict:
    """The flags a benchmark run is tracked with (MLflow params ``flag.<name>``, and its ``config_id``): every flag's
    value in its command-line form, read from the resolved config (so a run set by --set or --config is tracked as
    the same flags would track it, and earlier runs' config ids still match), plus each key without a flag whose
    value differs from its default (by dotted key; the keys in ``base``, set by the subcommand, excepted)."""
    default = cls()

    def value(c, key: str):
        for part in key.split("."):
            c = getattr(c, part)
        return c

    flagged = flag_fields(cls)
    out = {flag_dest(k, f): flag_value(f, value(cfg, k)) for k, f in flagged.items() if k not in skip}
    for key in flat_keys(cls):
        if key not in flagged and key not in (base or {}) and value(cfg, key) != value(default, key):
            out[key] = value(cfg, key)
    return out


def _step_config(args: argparse.Namespace, e2e: bool):
    skip = () if e2e else E2E_KEYS
    return _resolve(StepBenchConfig, args, "e2e" if e2e else "step", base=E2E_BASE if e2e else None,
                    flags=flags_given(StepBenchConfig, args, skip=skip))


def _prepare_step(args: argparse.Namespace, e2e: bool):
    from mcf.bench.step import main

    cfg = _step_config(args, e2e)
    flags = logged_flags(cfg, StepBenchConfig, skip=() if e2e else E2E_KEYS, base=E2E_BASE if e2e else None)
    return (lambda: main(cfg)), flags


def _data_config(args: argparse.Namespace):
    """``mcf bench data``'s config: an :class:`IndexScaleConfig` with ``--index-scale N``, else a
    :class:`DataBenchConfig`."""
    if args.index_scale:
        return _resolve(IndexScaleConfig, args, "data --index-scale")
    return _resolve(DataBenchConfig, args, "data")


def _prepare_data(args: argparse.Namespace):
    from mcf.bench.data import main as data_main
    from mcf.bench.index_scale import main as index_main

    cfg = _data_config(args)
    # both modes share the subcommand, so each is tracked with the other's flags at their defaults, as before
    if isinstance(cfg, IndexScaleConfig):
        flags = {**logged_flags(DataBenchConfig(), DataBenchConfig), **logged_flags(cfg, IndexScaleConfig)}
        return (lambda: index_main(cfg)), flags
    flags = {**logged_flags(IndexScaleConfig(), IndexScaleConfig), "index_scale": 0,
             **logged_flags(cfg, DataBenchConfig)}
    return (lambda: data_main(cfg)), flags


# Flags of benchmarks/bench_attention.py, passed through as given (that script checks them); with --table, those that
# AttentionTableConfig's fields name are its keys (its flag metadata names these flags).
_ATTENTION_FLAGS = [
    ("--tiny", {"action": "store_true", "help": "tiny shapes (CPU smoke test; the default without a GPU)"}),
    ("--full", {"action": "store_true", "help": "MCF shapes (the default on a GPU)"}),
    ("--batch", {"nargs": "+", "help": "batch sizes"}), ("--heads", {"nargs": "+", "help": "head counts"}),
    ("--tokens", {"nargs": "+", "help": "sequence lengths"}), ("--head-dim", {"help": "head dimension"}),
    ("--dtype", {"help": "input dtype (float16, bfloat16, float32)"}),
    ("--backends", {"nargs": "+", "help": "kernels compared (default: all)"}),
    ("--modes", {"nargs": "+", "help": "fwd and/or fwd+bwd (default: both)"}),
    ("--device", {"help": "device (default: cuda if available, else cpu)"}), ("--warmup", {"help": "untimed calls"}),
    ("--repeats", {"help": "timed groups, median reported"}), ("--inner", {"help": "calls per timed group"}),
    ("--min-speedup", {"help": "SDPA/Triton ratio that counts as a Triton win (default 1.1)"}),
    ("--markdown", {"metavar": "OUT", "help": "also write a markdown table to OUT"}),
    # handled by mcf.bench.attention: fill the attention dispatch table (bf16 and fp32, MCF's shapes)
    ("--table", {"action": "store_true", "help": "measure every candidate path in bf16 and fp32 at MCF's shapes and "
                 "write the rows to the per-user attention table that attention.backend=auto reads"}),
    ("--table-file", {"help": "the table to write with --table (default: the per-user cache; "
                      "kernels/attention_table.json is the repository's)"}),
]


def _attention_config(args: argparse.Namespace) -> AttentionTableConfig | None:
    """``mcf bench attention --table``'s config (its keys: the flags its fields name, ``--config``, ``--set``); None
    in the pass-through mode, which has no config (a ``--config`` or ``--set`` there is an error)."""
    if not args.table:
        if args.config is not None or args.set:
            raise ConfigError("bench attention: --config and --set set the keys of --table (`mcf config --list "
                              "--command bench-attention`); without --table the flags pass through to "
                              "benchmarks/bench_attention.py")
        if args.table_file is not None:
            raise ConfigError("bench attention: --table-file goes with --table")
        return None
    return _resolve(AttentionTableConfig, args, "attention --table")


def _run_attention(args: argparse.Namespace, cfg: AttentionTableConfig | None) -> dict:
    from mcf.bench.attention import run, run_table
    from mcf.bench.common import emit

    if cfg is not None:
        result = run_table(cfg)
        emit(result, args.out)
        return result
    argv: list[str] = []
    for flag, _ in _ATTENTION_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *value]
        elif value not in (None, False):
            argv += [flag, value]
    result = run(argv)
    emit(result, args.out)
    return result


def _prepare_attention(args: argparse.Namespace):
    from mcf.bench.tracking import bench_flags

    cfg = _attention_config(args)
    # tracked by the flags as given (the config ids of the runs before --table had a config); --config and --set
    # only where given
    flags = {k: v for k, v in bench_flags(args).items() if k not in ("config", "set") or v}
    return (lambda: _run_attention(args, cfg)), flags


def _scale_config(args: argparse.Namespace, cls: type = ScaleBenchConfig, name: str = "scale"):
    """``mcf bench scale``'s config (``scale-widths``'s with ``cls=ScaleWidthsConfig``). Its ``--set`` takes a key of
    ``cls``, or one of `mcf pretrain`'s keys for the comm phase's trainer (``cls.overrides``, as before the bench had
    keys); the two key sets are disjoint (pretrain's all sit in sections that ``cls`` lacks). The trainer's come
    after any that ``--config``'s ``overrides`` holds."""
    trainer = flat_keys(Config)
    trainer_sets = [t for t in args.set if "=" in t and t.split("=", 1)[0].strip() in trainer]
    cfg = _resolve(cls, args, name, overrides=[t for t in args.set if t not in trainer_sets])
    cfg = dataclasses.replace(cfg, overrides=(*cfg.overrides, *trainer_sets)) if trainer_sets else cfg
    if cfg.overrides:  # the trainer's config as each rank will build it: a bad value is one line before any rank starts
        from mcf.config import build_config

        build_config("demo", list(cfg.overrides))
    return cfg


def _prepare_scale(args: argparse.Namespace):
    from mcf.bench.scale import main

    cfg = _scale_config(args)
    flags = logged_flags(cfg, ScaleBenchConfig)
    flags["set"] = list(flags.pop("overrides", []))  # tracked as the trainer's --set texts, as before
    return (lambda: main(cfg)), flags


def _scale_widths_config(args: argparse.Namespace):
    return _scale_config(args, ScaleWidthsConfig, "scale-widths")


def _prepare_scale_widths(args: argparse.Namespace):
    from mcf.bench.scale_widths import check_model, main

    cfg = _scale_widths_config(args)
    check_model(cfg.model, cfg.units[2])
    flags = logged_flags(cfg, ScaleWidthsConfig)
    flags["set"] = list(flags.pop("overrides", []))  # the trainer's --set texts, as `bench scale` tracks them
    return (lambda: main(cfg)), flags


def _ema_drift_config(args: argparse.Namespace):
    return _resolve(EmaDriftConfig, args, "ema-drift")


def _prepare_ema_drift(args: argparse.Namespace):
    from mcf.bench.ema_drift import main

    cfg = _ema_drift_config(args)
    return (lambda: main(cfg)), logged_flags(cfg, EmaDriftConfig)


def _memory_config(args: argparse.Namespace):
    return _resolve(MemoryBenchConfig, args, "memory")


def _prepare_memory(args: argparse.Namespace):
    from mcf.bench.memory import main

    cfg = _memory_config(args)
    return (lambda: main(cfg)), logged_flags(cfg, MemoryBenchConfig)


def config_from_args(args: argparse.Namespace):
    """The resolved config of a parsed ``mcf bench step|e2e|data|memory|scale|scale-widths|ema-drift`` command line
    (nothing is run)."""
    command = args.bench_command
    if command in ("step", "e2e"):
        return _step_config(args, e2e=command == "e2e")
    configs = {"data": _data_config, "memory": _memory_config, "scale": _scale_config,
               "scale-widths": _scale_widths_config, "ema-drift": _ema_drift_config, "attention": _attention_config}
    if command not in configs:
        raise ConfigError(f"bench {command} has no config of its own")
    return configs[command](args)


def _tracked(prepare):
    """``prepare`` (args → a benchmark ready to run and the flags it is tracked with), then the benchmark, then its
    result logged as an MLflow run.

    The config is resolved, the store resolved and a server probed BEFORE the benchmark runs, so a bad key or an
    unreachable server is a one-line error in seconds, not after minutes of measuring."""

    def tracked(args: argparse.Namespace) -> int:
        from mcf.bench.tracking import bench_flags, log_bench_run, resolve
        from mcf.train.tracking import check_reachable

        run, flags = prepare(args)
        uri = resolve(args.tracking_uri, args.experiment).uri
        if uri is not None:
            check_reachable(uri)
        result = run()
        log_bench_run(result, bench_flags(argparse.Namespace(**flags)), tracking_uri=args.tracking_uri,
                      experiment=args.experiment)
        return 0

    return tracked


def _run_history(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mcf.bench.tracking import history

    print(history(args.benchmark, tracking_uri=args.tracking_uri, experiment=args.experiment, config=args.config,
                  metric=args.metric, plot_path=Path(args.plot) if args.plot else None))
    return 0


def _run_results(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mcf.bench.tracking import render_results, write_results

    text = render_results(args.benchmarks.split(","), tracking_uri=args.tracking_uri, experiment=args.experiment,
                          metric=args.metric)
    if args.write:
        write_results(Path(args.write), text)
        print(f"wrote the tracked-runs section of {args.write}")
    else:
        print(text)
    return 0


def _tracking_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--tracking-uri", default=None, metavar="URI|none",
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else $MCF_CACHE/bench/mlflow.db, "
                        "~/.cache/mcf/bench/mlflow.db without it); 'none' = do not track")
    p.add_argument("--experiment", default=None,
                   help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else mcf-bench)")
    return p


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench",
                                  help="benchmarks: paper vs mcf step, loaders, attention, memory, ZeRO scaling (JSON)")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    tracking = _tracking_parent()

    def parser(name: str, command: str, **kw):
        return sub.add_parser(name, parents=[tracking], epilog=CONFIG_EPILOG.format(command=command),
                              formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    p = parser("step", "step", help="compute-only training step: paper's vs mcf's (images/s, MFU)")
    add_flags(p, StepBenchConfig, skip=E2E_KEYS)
    _config_args(p, "step")
    p.set_defaults(func=_tracked(lambda args: _prepare_step(args, e2e=False)))

    p = parser("e2e", "step", help="training step with the loader in the loop (JPEG files in)")
    add_flags(p, StepBenchConfig, defaults=E2E_BASE)
    _config_args(p, "step")
    p.set_defaults(func=_tracked(lambda args: _prepare_step(args, e2e=True)))

    p = parser("data", "data", help="loader images/s: DALI vs PyTorch on the same files (folder, LMDB, shards); "
                                    "index scale (--index-scale N; its keys: `mcf config --list --command "
                                    "bench-index-scale`)")
    add_flags(p, DataBenchConfig)
    add_flags(p, IndexScaleConfig, skip=("out",))  # index-scale's flags; --out is shared
    _config_args(p, "data", set_help="set any config key (repeatable; `mcf config --list --command bench-data`, "
                                     "with --index-scale `--command bench-index-scale`)")
    p.set_defaults(func=_tracked(_prepare_data))

    p = sub.add_parser("attention", parents=[tracking],
                       help="attention kernels: Triton vs SDPA vs math (benchmarks/bench_attention.py); --table: "
                            "fill the dispatch table (its keys: `mcf config --list --command bench-attention`)")
    p.add_argument("--out", default=None, help="JSON file or folder")
    for flag, kw in _ATTENTION_FLAGS:
        p.add_argument(flag, **kw)
    _config_args(p, "attention", set_help="with --table: set any of its keys (repeatable; `mcf config --list "
                                          "--command bench-attention`)")
    p.set_defaults(func=_tracked(_prepare_attention))

    p = parser("memory", "memory", help="activation checkpointing: activation bytes per image and step time per "
                                        "setting (CPU), and the largest per-GPU batch of ViT-B/L/H")
    add_flags(p, MemoryBenchConfig)
    _config_args(p, "memory")
    p.set_defaults(func=_tracked(_prepare_memory))

    p = parser("scale", "scale", help="per-rank bytes, step time and collectives per step under ZeRO 0/1/2/3 (2 ranks)")
    add_flags(p, ScaleBenchConfig)
    _config_args(p, "scale", set_help="set a config key (`mcf config --list --command bench-scale`), or one of `mcf "
                                      "pretrain`'s for the comm phase's trainer, e.g. train.target_precision=fp32 "
                                      "(repeatable)")
    p.set_defaults(func=_tracked(_prepare_scale))

    p = parser("scale-widths", "scale-widths", help="ZeRO's collectives counted at a model's real widths with a "
                                                     "quarter and a half of its blocks, extrapolated and projected")
    add_flags(p, ScaleWidthsConfig)
    _config_args(p, "scale-widths", set_help="set a config key (`mcf config --list --command bench-scale-widths`), or "
                                             "one of `mcf pretrain`'s for the counted trainer (repeatable)")
    p.set_defaults(func=_tracked(_prepare_scale_widths))

    p = parser("ema-drift", "ema-drift", help="drift of the bf16-weights EMA target from the exact (fp32 masters) "
                                              "one over N steps (torchrun, gloo)")
    add_flags(p, EmaDriftConfig)
    _config_args(p, "ema-drift")
    p.set_defaults(func=_tracked(_prepare_ema_drift))

    p = sub.add_parser("history", parents=[tracking],
                       help="a benchmark's tracked throughput per commit and host (table, and a PNG with --plot)")
    p.add_argument("benchmark", nargs="?", default="step",
                   choices=("step", "e2e", "data", "attention", "memory", "scale", "scale_widths", "ema_drift"),
                   help="which benchmark's runs (default: %(default)s)")
    p.add_argument("--config", default=None,
                   help="config id (or a unique prefix, or its label) of the runs to show (default: the newest run's)")
    p.add_argument("--metric", default="images_per_s",
                   help="metric suffix: <variant>.<metric> per variant, or the metric itself (default: %(default)s)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw it: throughput over commits, a line per variant and host")
    p.set_defaults(func=_run_history)

    p = sub.add_parser("results", parents=[tracking],
                       help="the tracked-runs tables of benchmarks/RESULTS.md, regenerated from the store")
    p.add_argument("--benchmarks", default="step,e2e,data", help="comma list (default: %(default)s)")
    p.add_argument("--metric", default="images_per_s", help="(default: %(default)s)")
    p.add_argument("--write", default=None, metavar="MD",
                   help="replace the generated section of this file (e.g. benchmarks/RESULTS.md) instead of printing")
    p.set_defaults(func=_run_results)
