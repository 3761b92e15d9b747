"""``mcf bench {step,e2e,data,attention,memory,scale}``: each prints JSON, with ``--out`` writes it, and
logs it as an MLflow run (:mod:`mcf.bench.tracking`); ``mcf bench history`` and ``mcf bench results``
read the tracked runs back.

Nothing heavy is imported here; each sub-command imports its module when it runs.
"""

from __future__ import annotations

import argparse


def _add_step_args(p: argparse.ArgumentParser, e2e: bool) -> None:
    p.add_argument("--model", default="mcf_vit_small_patch16", help="model name (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=112, help="input side; 0 = the model's own (default: %(default)s)")
    p.add_argument("--teacher-img-size", type=int, default=None, help="teacher input side (default: = --img-size)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1, help="steps per timed window (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows, median reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps before the timed windows (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="auto (the first GPU if any, else cpu), cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="also time the mcf step torch.compile-d, beside eager (variant mcf_compiled)")
    p.add_argument("--variants", default="paper,mcf",
                   help="comma list of paper,mcf,mcf_compiled (default: %(default)s)")
    p.add_argument("--profile", action="store_true", help="add each variant's top operators (torch.profiler, one step)")
    p.add_argument("--order", default="sequential" if e2e else "interleaved", choices=("interleaved", "sequential"),
                   help="interleaved: both variants built, timed windows alternate (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON file or folder")
    if e2e:
        p.add_argument("--data", default=None, help="image folder (default: synthetic JPEGs in a temporary folder)")
        p.add_argument("--workers", type=int, default=2, help="loader workers, both variants (default: %(default)s)")
        p.add_argument("--loader", default="auto", choices=("auto", "dali", "torch"),
                       help="mcf's loader (default: %(default)s)")


def _step_config(args: argparse.Namespace, e2e: bool):
    from mcf.bench.step import StepBenchConfig
    from mcf.errors import ConfigError

    try:
        return StepBenchConfig(model=args.model, img_size=args.img_size or None, teacher_img_size=args.teacher_img_size,
                               batch_size=args.batch_size, steps=args.steps, repeats=args.repeats, warmup=args.warmup,
                               device=args.device, compile=args.compile, variants=tuple(v for v in args.variants.split(",") if v),
                               profile=args.profile, order=args.order, out=args.out, e2e=e2e, data=getattr(args, "data", None),
                               workers=getattr(args, "workers", 2), loader=getattr(args, "loader", "auto"))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _run_step(args: argparse.Namespace) -> dict:
    from mcf.bench.step import main

    return main(_step_config(args, e2e=False))


def _run_e2e(args: argparse.Namespace) -> dict:
    from mcf.bench.step import main

    return main(_step_config(args, e2e=True))


def _run_data(args: argparse.Namespace) -> dict:
    if args.index_scale:
        from mcf.bench.index_scale import IndexScaleConfig
        from mcf.bench.index_scale import main as index_main
        from mcf.errors import ConfigError

        try:
            cfg = IndexScaleConfig(keys=args.index_scale, folder_files=args.folder_files, worker_keys=min(args.worker_keys, args.index_scale),
                                   workdir=args.workdir, out=args.out)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return index_main(cfg)
    from mcf.bench.data import DataBenchConfig, main

    return main(DataBenchConfig(data=args.data, count=args.count, file_size=args.file_size, img_size=args.img_size, batch_size=args.batch_size,
                         workers=args.workers, batches=args.batches, sources=tuple(args.sources.split(",")), device=args.device,
                         out=args.out))


# Flags of benchmarks/bench_attention.py, passed through as given (that script checks them).
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


def _run_attention(args: argparse.Namespace) -> dict:
    from mcf.bench.attention import run
    from mcf.bench.common import emit

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


def _run_scale(args: argparse.Namespace) -> dict:
    from mcf.bench.projection import Compute, Network
    from mcf.bench.scale import ScaleBenchConfig, main
    from mcf.errors import ConfigError

    try:
        cfg = ScaleBenchConfig(
            model=args.model,
            img_size=args.img_size or None,
            batch_size=args.batch_size,
            steps=args.steps,
            stages=tuple(int(s) for s in args.stages.split(",")),
            precision=args.precision,
            nproc=args.nproc,
            phases=tuple(p for p in args.phases.split(",") if p),
            overrides=tuple(args.set),
            out=args.out,
            options=tuple(o for o in args.options.split(",") if o),
            project=tuple(m for m in args.project.split(",") if m),
            gpus=tuple(int(g) for g in args.gpus.split(",") if g),
            network=Network(gpus_per_node=args.gpus_per_node, intra_GBps=args.intra_gbytes, inter_Gbps=args.inter_gbits,
                            inter_efficiency=args.inter_efficiency, rail_aligned=not args.one_nic_per_ring,
                            hop_intra_us=args.hop_intra_us, hop_inter_us=args.hop_inter_us),
            compute=Compute(peak_tflops=args.peak_tflops, mfu=args.mfu, batch_size=args.project_batch),
        )
    except ValueError as e:
        raise ConfigError(f"bench scale: {e}") from None
    return main(cfg)


def _pair(text: str) -> tuple[int, int]:
    a, b = (int(x) for x in text.split(","))
    return a, b


def _run_memory(args: argparse.Namespace) -> dict:
    from mcf.bench.memory import MemoryBenchConfig, main
    from mcf.errors import ConfigError

    try:
        cfg = MemoryBenchConfig(
            model=args.model,
            img_size=args.img_size or None,
            batch_sizes=_pair(args.batch_sizes),
            modes=tuple(m for m in args.modes.split(",") if m),
            precision=args.precision,
            repeats=args.repeats,
            project=tuple(m for m in args.project.split(",") if m),
            project_teacher=args.project_teacher,
            project_batch_sizes=_pair(args.project_batch_sizes),
            gpu_gb=args.gpu_gb,
            ranks=args.ranks,
            zero=args.zero,
            reserve_gb=args.reserve_gb,
            out=args.out,
        )
    except ValueError as e:
        raise ConfigError(f"bench memory: {e}") from None
    return main(cfg)


def _tracked(run):
    """``run`` (a benchmark: args → its result JSON), then that result logged as an MLflow run.

    The store is resolved and a server probed BEFORE the benchmark runs, so an unreachable server is
    a one-line error in seconds, not after minutes of measuring."""

    def tracked(args: argparse.Namespace) -> int:
        from mcf.bench.tracking import bench_flags, log_bench_run, resolve
        from mcf.train.tracking import check_reachable

        uri = resolve(args.tracking_uri, args.experiment).uri
        if uri is not None:
            check_reachable(uri)
        result = run(args)
        log_bench_run(result, bench_flags(args), tracking_uri=args.tracking_uri, experiment=args.experiment)
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

    p = sub.add_parser("step", parents=[tracking], help="compute-only training step: paper's vs mcf's (images/s, MFU)")
    _add_step_args(p, e2e=False)
    p.set_defaults(func=_tracked(_run_step))

    p = sub.add_parser("e2e", parents=[tracking], help="training step with the loader in the loop (JPEG files in)")
    _add_step_args(p, e2e=True)
    p.set_defaults(func=_tracked(_run_e2e))

    p = sub.add_parser("data", parents=[tracking], help="loader images/s: DALI vs PyTorch on the same files (folder, LMDB, shards); index scale")
    p.add_argument("--data", default=None, help="image folder (default: synthetic JPEGs)")
    p.add_argument("--count", type=int, default=256, help="synthetic files (default: %(default)s)")
    p.add_argument("--file-size", type=int, default=256, help="synthetic JPEG side (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=224, help="output side of the loaders' crops (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2,
                   help="loader workers (DALI threads, DataLoader processes) (default: %(default)s)")
    p.add_argument("--batches", type=int, default=6, help="timed batches per loader (default: %(default)s)")
    p.add_argument("--sources", default="folder,lmdb,shards",
                   help="comma list of the stores the same files are read from (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="where batches are delivered: auto (GPU if any), cpu, cuda (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON file or folder")
    p.add_argument("--index-scale", type=int, default=0, metavar="N",
                   help="instead: open time and bytes per sample of the indexes for N synthetic keys/samples (e.g. 20000000)")
    p.add_argument("--folder-files", type=int, default=200_000,
                   help="index-scale: files of the synthetic folder (default: %(default)s)")
    p.add_argument("--worker-keys", type=int, default=1_000_000,
                   help="index-scale: keys a forked worker reads (default: %(default)s)")
    p.add_argument("--workdir", default=None,
                   help="index-scale: keep the synthetic data here (reused; default: a temporary folder)")
    p.set_defaults(func=_tracked(_run_data))

    p = sub.add_parser("attention", parents=[tracking], help="attention kernels: Triton vs SDPA vs math (benchmarks/bench_attention.py)")
    p.add_argument("--out", default=None, help="JSON file or folder")
    for flag, kw in _ATTENTION_FLAGS:
        p.add_argument(flag, **kw)
    p.set_defaults(func=_tracked(_run_attention))

    p = sub.add_parser("memory", parents=[tracking], help="activation checkpointing: activation bytes per image and step time per "
                                       "setting (CPU), and the largest per-GPU batch of ViT-B/L/H")
    p.add_argument("--model", default="mcf_vit_small_patch16", help="the CPU-measured model (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=112,
                   help="its input side; 0 = the model's own (default: %(default)s)")
    p.add_argument("--batch-sizes", default="4,8", help="two batch sizes of the CPU measurement (default: %(default)s)")
    p.add_argument("--modes", default="none,encoder,decoder,teacher,all",
                   help="train.activation_checkpointing settings compared (default: %(default)s)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                   help="weights' and activations' dtype, as DeepSpeed runs the online model (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per setting, interleaved (default: %(default)s)")
    p.add_argument("--project", default="mcf_vit_base_patch16,mcf_vit_large_patch16,mcf_vit_huge_patch14",
                   help="models counted at their own size on the meta device for the batch projection ('' = none)")
    p.add_argument("--project-teacher", default="vit_base_patch16",
                   help="the projected models' teacher (default: %(default)s)")
    p.add_argument("--project-batch-sizes", default="64,128",
                   help="two batch sizes of the meta count (large, so the activations' peak shows) "
                        "(default: %(default)s)")
    p.add_argument("--gpu-gb", type=float, default=80.0,
                   help="GPU memory the largest batch is projected for (default: %(default)s)")
    p.add_argument("--ranks", type=int, default=8, help="GPUs the ZeRO state is sharded over (default: %(default)s)")
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage of the projection (default: %(default)s)")
    p.add_argument("--reserve-gb", type=float, default=8.0,
                   help="CUDA context, NCCL, fragmentation (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON file or folder")
    p.set_defaults(func=_tracked(_run_memory))

    p = sub.add_parser("scale", parents=[tracking],
                       help="per-rank bytes, step time and collectives per step under ZeRO 0/1/2/3 (2 ranks)")
    p.add_argument("--model", default="mcf_vit_tiny", help="model name (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=0, help="input side; 0 = the model's own (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="per rank (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step (default: %(default)s)")
    p.add_argument("--stages", default="0,1,2,3", help="comma list of ZeRO stages (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="the online model's dtype, as the trainer runs it (bf16: bf16 weights + fp32 masters)")
    p.add_argument("--nproc", type=int, default=2,
                   help="ranks (torchrun processes; gloo on the CPU) (default: %(default)s)")
    p.add_argument("--phases", default="memory,comm",
                   help="memory (bytes held, step time) and/or comm (the trainer's collectives per step) "
                        "(default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override of the comm phase's trainer, e.g. train.target_precision=fp32 (repeatable)")
    p.add_argument("--options", default="reduce-fp32",
                   help="gradient reduction options, one comm run each: reduce-fp32, reduce-bf16 (each bucket to "
                        "its owners), allreduce-fp32, allreduce-bf16 (DeepSpeed's path) (default: %(default)s)")
    p.add_argument("--project", default="", metavar="MODELS",
                   help="project the counted steps to these models at --gpus (e.g. mcf_vit_base_patch16,...)")
    p.add_argument("--gpus", default="8,64,256", help="GPU counts of the projection (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node of the projection (default: %(default)s)")
    p.add_argument("--intra-gbytes", type=float, default=360.0, help="GB/s per GPU within a node (NVLink)")
    p.add_argument("--inter-gbits", type=float, default=400.0, help="Gb/s per GPU across nodes (its NIC)")
    p.add_argument("--inter-efficiency", type=float, default=0.8, help="share of the NIC line rate reached")
    p.add_argument("--one-nic-per-ring", action="store_true",
                   help="pessimistic: a GPU's cross-node traffic leaves through its one NIC (no rail-aligned rings)")
    p.add_argument("--hop-intra-us", type=float, default=1.0, help="ring hop latency within a node (µs)")
    p.add_argument("--hop-inter-us", type=float, default=5.0, help="ring hop latency across nodes (µs)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.45, help="share of the peak the step's compute reaches")
    p.add_argument("--project-batch", type=int, default=64, help="images per GPU per step of the projection")
    p.add_argument("--out", default=None, help="JSON file or folder")
    p.set_defaults(func=_tracked(_run_scale))

    p = sub.add_parser("history", parents=[tracking],
                       help="a benchmark's tracked throughput per commit and host (table, and a PNG with --plot)")
    p.add_argument("benchmark", nargs="?", default="step", choices=("step", "e2e", "data", "attention", "memory", "scale"),
                   help="which benchmark's runs (default: %(default)s)")
    p.add_argument("--config", default=None,
                   help="config id (or a unique prefix, or its label) of the runs to show (default: the newest run's)")
    p.add_argument("--metric", default="images_per_s",
                   help="metric suffix: <variant>.<metric> per variant, or the metric itself (default: %(default)s)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw it: throughput over commits, a line per variant and host")
    p.set_defaults(func=_run_history)

    p = sub.add_parser("results", parents=[tracking],
                       help="the tracked-runs tables of benchmarks/RESULTS.md, regenerated from the store")
    p.add_argument("--benchmarks", default="step,e2e,data", help="comma list (default: %(default)s)")
    p.add_argument("--metric", default="images_per_s", help="(default: %(default)s)")
    p.add_argument("--write", default=None, metavar="MD",
                   help="replace the generated section of this file (e.g. benchmarks/RESULTS.md) instead of printing")
    p.set_defaults(func=_run_results)
