"""The configs of ``mcf bench step|e2e|data|memory|scale|scale-widths|ema-drift|attention --table`` on the
project's config tree (:mod:`mcf.configtree`).

Each benchmark's settings are one ``@dataclass(kw_only=True)`` whose fields are declared with
:func:`mcf.configtree.field`: typed, documented (``mcf config --list --command bench-step``, ``bench-data``,
``bench-index-scale``, ``bench-memory``, ``bench-scale``, ``bench-scale-widths``, ``bench-ema-drift``,
``bench-attention``), validated in ``__post_init__`` (a
:class:`~mcf.errors.ConfigError`). A field's metadata also declares its command-line flag (``flag``), so each
dedicated flag is sugar for its key and ``--set key=value`` reaches every key (:mod:`mcf.bench.cli`).

They live apart from the benchmarks so that building the command line imports no model code; each benchmark
module re-exports its own (``from mcf.bench.step import StepBenchConfig`` keeps working).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from mcf.bench.projection import Compute, Network
from mcf.configtree import field
from mcf.errors import ConfigError

VARIANTS = ("paper", "mcf", "mcf_compiled")  # mcf_compiled: mcf's step with torch.compile, beside eager with --compile
MODES = ("none", "encoder", "decoder", "teacher", "all")  # train.activation_checkpointing settings
PAPER_MODELS = ("mcf_vit_base_patch16", "mcf_vit_large_patch16", "mcf_vit_huge_patch14")
# scale's gradient reductions (path-dtype); "+ema-bf16": with train.ema_source=bf16_params (ZeRO 0-2: no EMA gather)
OPTIONS = tuple(f"{o}{e}" for e in ("", "+ema-bf16") for o in ("reduce-fp32", "reduce-bf16", "allreduce-fp32",
                                                               "allreduce-bf16"))


@dataclass(kw_only=True)
class StepBenchConfig:
    """Sizes and switches of the step benchmark (defaults: about a minute on a 2-core CPU): the config of ``mcf
    bench step`` and ``mcf bench e2e`` (``mcf config --list --command bench-step``). Each flag sets the key of its
    field's metadata; ``--set key=value`` reaches every key."""

    model: str = field("mcf_vit_small_patch16", flag=True, help="Model name (mcf.models.list_models()).")
    img_size: int | None = field(112, flag=True, none_flag=0, help=(
        "Input side in pixels; None or 0 = the model's own (224 for the ViT-*/16 models)."))
    teacher_img_size: int | None = field(None, flag=True, help=(
        "Teacher input side; None = the same as img_size (the paper: 224 for both)."))
    batch_size: int = field(4, flag=True, help="Images per step.")
    steps: int = field(1, flag=True, help="Steps per timed window.")
    repeats: int = field(3, flag=True, help="Timed windows; the median is reported.")
    warmup: int = field(2, flag=True, help="Untimed steps before the timed windows (the first one is FLOP-counted "
                                            "in the paper variant).")
    device: str = field("auto", flag=True, help="auto (the first GPU if any, else cpu), cpu, cuda, cuda:N.")
    compile: bool = field(False, flag=True, const=True, help=(
        "Also time mcf's step with its model torch.compile-d (variant mcf_compiled), beside eager."))
    momentum: float = field(0.99, help="EMA momentum of the target encoder in both variants' steps.")
    e2e: bool = field(False, help="Loader in the loop: JPEG files through each variant's loader (set by the "
                                  "subcommand: `mcf bench e2e`).")
    data: str | None = field(None, flag=True, help=(
        "e2e: image folder; None = synthetic JPEGs written to a temporary folder."))
    workers: int = field(2, flag=True, help="e2e: loader workers (both variants).")
    loader: Literal["auto", "dali", "torch"] = field("auto", flag=True, help=(
        "e2e: mcf's loader: auto (DALI when it works here), dali or torch."))
    variants: tuple[str, ...] = field(("paper", "mcf"), flag=True, help=(
        "Comma list of paper, mcf, mcf_compiled: the steps timed."))
    order: Literal["interleaved", "sequential"] = field("interleaved", flag=True, help=(
        "interleaved: all variants built, their timed windows alternate (fair on a shared machine); sequential: "
        "one variant after the other, only one in memory (`mcf bench e2e`'s default: an idle variant's loader "
        "workers would refill their queues during the other's windows)."))
    profile: bool = field(False, flag=True, const=True, help=(
        "Also profile one step of each variant and report its top operators (torch.profiler)."))
    out: str | None = field(None, flag=True, help="JSON file or folder the result is written to.")

    def __post_init__(self) -> None:
        if self.img_size == 0:  # the flag's "the model's own"
            self.img_size = None
        for name in ("batch_size", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.warmup < 1:
            raise ConfigError("warmup must be >= 1 (the first warm-up step is the FLOP count)")
        if not self.variants or set(self.variants) - set(VARIANTS):
            raise ConfigError(f"variants must be a subset of {VARIANTS}")
        if self.order not in ("interleaved", "sequential"):
            raise ConfigError("order must be interleaved or sequential")
        if self.loader not in ("auto", "dali", "torch"):
            raise ConfigError("loader must be auto, dali or torch")



@dataclass(kw_only=True)
class DataBenchConfig:
    """The loaders' benchmark: the config of ``mcf bench data`` (``mcf config --list --command bench-data``)."""

    data: str | None = field(None, flag=True, help=(
        "Image folder; None = count synthetic JPEGs of file_size² px in a temporary folder."))
    count: int = field(256, flag=True, help="Synthetic files.")
    file_size: int = field(256, flag=True, help="Synthetic JPEG side (px).")
    img_size: int = field(224, flag=True, help="Output side of the loaders' crops (px).")
    batch_size: int = field(32, flag=True, help="Images per batch.")
    workers: int = field(2, flag=True, help="Loader workers (DALI threads, DataLoader processes).")
    batches: int = field(6, flag=True, help="Timed batches per loader (after one untimed batch).")
    sources: tuple[str, ...] = field(("folder", "lmdb", "shards"), flag=True, help=(
        "Comma list of the stores the same files are read from: folder, lmdb, shards."))
    device: str = field("auto", flag=True, help="Where batches are delivered: auto (GPU if any), cpu, cuda.")
    out: str | None = field(None, flag=True, help="JSON file or folder the result is written to.")

    def __post_init__(self) -> None:
        if set(self.sources) - {"folder", "lmdb", "shards"}:
            raise ConfigError("sources must be a subset of folder,lmdb,shards")
        if self.batches < 1 or self.batch_size < 1 or self.workers < 0:
            raise ConfigError("batches and batch_size must be >= 1, workers >= 0")



@dataclass(kw_only=True)
class IndexScaleConfig:
    """The indexes' benchmark at scale: the config of ``mcf bench data --index-scale N`` (``mcf config --list
    --command bench-index-scale``)."""

    keys: int = field(20_000_000, flag="--index-scale", metavar="N", help=(
        "Keys of the paper-layout key file (and samples of the synthetic shard index)."), flag_help=(
        "instead of the loaders: open time and bytes per sample of the indexes for N synthetic keys/samples "
        "(e.g. 20000000)"))
    folder_files: int = field(200_000, flag=True, help="Empty files of the synthetic image folder (0 = skip).")
    worker_keys: int = field(1_000_000, flag=True, help=(
        "Keys a forked worker reads (an epoch of a worker), with the compact index and with list[str]; at most "
        "keys (a larger value is lowered to it)."))
    workdir: str | None = field(None, flag=True, help=(
        "Where the synthetic data goes (reused when present); None = a temporary folder."))
    out: str | None = field(None, flag=True, help="JSON file or folder the result is written to.")

    def __post_init__(self) -> None:
        if self.keys >= 2 and self.worker_keys > self.keys:  # the CLI's rule: a worker reads at most every key
            self.worker_keys = self.keys
        if self.keys < 2 or self.folder_files < 0 or not 0 < self.worker_keys <= self.keys:
            raise ConfigError("need keys >= 2, folder_files >= 0, 0 < worker_keys <= keys")



@dataclass(kw_only=True)
class MemoryBenchConfig:
    """Activation checkpointing's benchmark: the config of ``mcf bench memory`` (``mcf config --list --command
    bench-memory``)."""

    model: str = field("mcf_vit_small_patch16", flag=True, help="The CPU-measured model.")
    img_size: int | None = field(112, flag=True, none_flag=0, help="Its input side; None or 0 = the model's own.")
    batch_sizes: tuple[int, int] = field((4, 8), flag=True, help="Two batch sizes of the CPU measurement.")
    modes: tuple[str, ...] = field(MODES, flag=True, help=(
        "Comma list of the train.activation_checkpointing settings compared."))
    precision: Literal["bf16", "fp32"] = field("bf16", flag=True, help=(
        "Weights' and activations' dtype, as DeepSpeed runs the online model."))
    repeats: int = field(3, flag=True, help="Timed steps per setting, interleaved.")
    project: tuple[str, ...] = field(PAPER_MODELS, flag=True, help=(
        "Models counted at their own size on the meta device for the batch projection ('' = none)."))
    project_teacher: str = field("vit_base_patch16", flag=True, help="The projected models' teacher.")
    project_batch_sizes: tuple[int, int] = field((64, 128), flag=True, help=(
        "Two batch sizes of the meta count: large, so that the peak is the activations' (at the start of the "
        "backward), as at the batch sizes that fill a GPU; at small ones the gradients' peak at its end hides them."))
    gpu_gb: float = field(80.0, flag=True, help="GPU memory (GB) the largest batch is projected for.")
    ranks: int = field(8, flag=True, help="GPUs the ZeRO state is sharded over.")
    zero: int = field(1, flag=True, help="ZeRO stage of the projection.")
    reserve_gb: float = field(8.0, flag=True, help=(
        "CUDA context, NCCL buffers and allocator fragmentation (GB; an assumption, not measured)."))
    out: str | None = field(None, flag=True, help="JSON file or folder the result is written to.")

    def __post_init__(self) -> None:
        if self.img_size == 0:  # the flag's "the model's own"
            self.img_size = None
        if not self.modes or set(self.modes) - set(MODES):
            raise ConfigError(f"modes must be among {','.join(MODES)}")
        if len(self.batch_sizes) != 2 or not 0 < self.batch_sizes[0] < self.batch_sizes[1]:
            raise ConfigError("batch_sizes must be two increasing sizes")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError("precision must be bf16 or fp32")
        if self.zero not in (0, 1, 2, 3) or self.ranks < 1 or self.repeats < 1:
            raise ConfigError("zero must be 0-3, ranks and repeats >= 1")



@dataclass(kw_only=True)
class ScaleBenchConfig:
    """ZeRO scaling's benchmark: the config of ``mcf bench scale`` (``mcf config --list --command bench-scale``).
    Its ``--set`` takes these keys and, for the comm phase's trainer, pretrain's (:attr:`overrides`)."""

    model: str = field("mcf_vit_tiny", flag=True, help="Model name.")
    img_size: int | None = field(None, flag=True, none_flag=0, help="Input side; None or 0 = the model's own.")
    batch_size: int = field(4, flag=True, help="Images per rank per step.")
    steps: int = field(3, flag=True, help="Timed steps, after one warm-up step.")
    stages: tuple[int, ...] = field((0, 1, 2, 3), flag=True, help="Comma list of ZeRO stages.")
    precision: Literal["fp32", "bf16"] = field("fp32", flag=True, help=(
        "The online model's dtype, as the trainer runs it (bf16: bf16 weights + fp32 masters)."))
    nproc: int = field(2, flag=True, help="Ranks (torchrun processes; gloo on the CPU).")
    phases: tuple[str, ...] = field(("memory", "comm"), flag=True, help=(
        "Comma list: memory (bytes held, step time) and/or comm (the trainer's collectives per step)."))
    overrides: tuple[str, ...] = field((), help=(
        "Config overrides (key=value) of the comm phase's trainer, e.g. train.target_precision=fp32: what `--set` "
        "gives with one of `mcf pretrain`'s keys."))
    timeout_s: int = field(900, help="Seconds each stage's torchrun may take before it is stopped.")
    out: str | None = field(None, flag=True, help="JSON file or folder the result is written to.")
    options: tuple[str, ...] = field(("reduce-fp32",), flag=True, help=(
        "Gradient reduction options of the comm phase, one trainer run each: reduce-fp32, reduce-bf16 (mcf's "
        "default: each bucket reduced to its owners, use_multi_rank_bucket_allreduce: false) or allreduce-fp32, "
        "allreduce-bf16 (DeepSpeed's default: each bucket all-reduced; ZeRO-1/2 only), in that "
        "deepspeed.reduce_dtype; each also with +ema-bf16 (train.ema_source=bf16_params; ZeRO-1/2 only)."))
    project: tuple[str, ...] = field((), flag=True, metavar="MODELS", help=(
        "Models to project the counted steps to at gpus (mcf.bench.projection), e.g. mcf_vit_base_patch16,..."))
    gpus: tuple[int, ...] = field((8, 64, 256), flag=True, help="Comma list of the projection's GPU counts.")
    network: Network = field(default_factory=Network, help="The network the projection assumes.")
    compute: Compute = field(default_factory=Compute, help="The GPUs' compute the projection assumes.")

    def __post_init__(self) -> None:
        if self.img_size == 0:  # the flag's "the model's own"
            self.img_size = None
        if not self.phases or set(self.phases) - {"memory", "comm"}:
            raise ConfigError("phases must be among memory,comm")
        if set(self.stages) - {0, 1, 2, 3}:
            raise ConfigError("stages must be among 0,1,2,3")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError("precision must be fp32 or bf16")
        if self.nproc < 1 or self.steps < 1 or self.batch_size < 1:
            raise ConfigError("nproc, steps and batch_size must be >= 1")
        if not self.options or set(self.options) - set(OPTIONS):
            raise ConfigError(f"options must be among {','.join(OPTIONS)}")
        if self.project and "comm" not in self.phases:
            raise ConfigError("the projection needs the comm phase (--phases comm)")
        if any(g < 1 for g in self.gpus):
            raise ConfigError("gpus must be >= 1")


@dataclass(kw_only=True)
class ScaleWidthsConfig:
    """ZeRO counted at a model's real widths, extrapolated by blocks (:mod:`mcf.bench.scale_widths`): the config of
    ``mcf bench scale-widths`` (``mcf config --list --command bench-scale-widths``). Its ``--set`` takes these keys
    and, for the counted trainer, pretrain's (:attr:`overrides`), as ``mcf bench scale``'s does."""

    model: str = field("mcf_vit_base_patch16", flag=True, help=(
        "Model counted at its widths; its encoder and decoder depths must divide by units[2]."))
    stages: tuple[int, ...] = field((3,), flag=True, help="Comma list of ZeRO stages.")
    options: tuple[str, ...] = field(("reduce-bf16",), flag=True, help=(
        "Gradient reduction options, one count each (the options of `mcf bench scale`; allreduce-* and +ema-bf16 "
        "at ZeRO-1/2 only)."))
    precision: Literal["fp32", "bf16"] = field("bf16", flag=True, help=(
        "The online model's dtype, as the trainer runs it (bf16: bf16 weights + fp32 masters)."))
    nproc: int = field(2, flag=True, help="Ranks (torchrun processes; gloo on the CPU).")
    batch_size: int = field(2, flag=True, help="Images per rank per step (the counted step is the second of three).")
    units: tuple[int, int, int] = field((1, 2, 4), flag=True, help=(
        "Blocks in units: counts at units[0]/units[2] and units[1]/units[2] of the model's encoder and decoder "
        "blocks, extrapolated linearly to all of them (1,2,4: a quarter and a half)."))
    zero_set: tuple[str, ...] = field((), flag=True, metavar="KEY=JSON,...", help=(
        "KEY=VALUE pairs (VALUE in JSON) put into the counted DeepSpeed JSON's zero_optimization, e.g. "
        "stage3_param_persistence_threshold=10000."))
    overrides: tuple[str, ...] = field((), help=(
        "Config overrides (key=value) of the counted trainer: what `--set` gives with one of `mcf pretrain`'s keys."))
    timeout_s: int = field(900, help="Seconds each count's torchrun may take before it is stopped.")
    gpus: tuple[int, ...] = field((8, 64, 256), flag=True, help="Comma list of the projection's GPU counts.")
    network: Network = field(default_factory=Network, help="The network the projection assumes.")
    compute: Compute = field(default_factory=Compute, help="The GPUs' compute the projection assumes.")
    out: str | None = field(None, flag=True, help="JSON file or folder the result is written to.")

    def __post_init__(self) -> None:
        if not self.stages or set(self.stages) - {0, 1, 2, 3}:
            raise ConfigError("stages must be among 0,1,2,3")
        if not self.options or set(self.options) - set(OPTIONS):
            raise ConfigError(f"options must be among {','.join(OPTIONS)}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError("precision must be fp32 or bf16")
        if self.nproc < 1 or self.batch_size < 1 or self.timeout_s < 1:
            raise ConfigError("nproc, batch_size and timeout_s must be >= 1")
        if len(self.units) != 3 or not 0 < self.units[0] < self.units[1] <= self.units[2]:
            raise ConfigError(f"units must be three block counts 0 < a < b <= n, got {self.units}")
        if not self.gpus or any(g < 1 for g in self.gpus):
            raise ConfigError("gpus must be >= 1")
        self.zero_optimization()  # a bad pair is a one-line error before anything runs

    def zero_optimization(self) -> dict[str, Any]:
        """:attr:`zero_set` as the dict put into ``zero_optimization``."""
        out = {}
        for text in self.zero_set:
            key, sep, value = text.partition("=")
            try:
                if not sep or not key.strip():
                    raise ValueError
                out[key.strip()] = json.loads(value)
            except ValueError:
                raise ConfigError(f"zero_set takes KEY=VALUE with VALUE in JSON, got {text!r}") from None
        return out

    def scale_config(self, **changes: Any) -> ScaleBenchConfig:
        """The comm phase of ``mcf bench scale`` this count runs (two steps counted, the second reported)."""
        return ScaleBenchConfig(model=self.model, stages=self.stages, options=self.options, precision=self.precision,
                                nproc=self.nproc, batch_size=self.batch_size, steps=2, phases=("comm",),
                                overrides=self.overrides, timeout_s=self.timeout_s, network=self.network,
                                compute=self.compute, **changes)


@dataclass(kw_only=True)
class EmaDriftConfig:
    """Drift of the bf16-weights EMA target against the exact (fp32 masters) one (:mod:`mcf.bench.ema_drift`): the
    config of ``mcf bench ema-drift`` (``mcf config --list --command bench-ema-drift``). The demo preset's model
    (``mcf_vit_tiny``, 32 px), bf16, synthetic batches; the ranks run under a torchrun this command starts."""

    steps: int = field(300, flag=True, help="Training steps.")
    batch_size: int = field(16, flag=True, help="Images per rank per step.")
    momentum: float = field(0.99, flag=True, help="EMA momentum of both targets (mcf's default, the paper's).")
    lr: float = field(1e-3, flag=True, help="AdamW learning rate, constant (the demo preset's peak).")
    zero: int = field(1, flag=True, help="ZeRO stage of the online model's engine: 0, 1 or 2.")
    report: tuple[int, ...] = field((1, 10, 30, 100, 300), flag=True, help=(
        "Comma list of the steps at which the two targets are compared (the last step always is)."))
    nproc: int = field(1, flag=True, help="Ranks (torchrun processes; one is enough: the drift does not depend on "
                                          "the sharding).")
    timeout_s: int = field(3600, help="Seconds the torchrun may take before it is stopped.")
    out: str | None = field(None, flag=True, help="JSON file or folder the result is written to.")

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.nproc < 1 or self.timeout_s < 1:
            raise ConfigError("steps, batch_size, nproc and timeout_s must be >= 1")
        if self.zero not in (0, 1, 2):
            raise ConfigError("zero must be 0, 1 or 2")
        if not 0.0 <= self.momentum < 1.0 or self.lr <= 0:
            raise ConfigError("momentum must be in [0, 1) and lr > 0")
        if any(s < 1 for s in self.report):
            raise ConfigError("report steps must be >= 1")


ATTENTION_DTYPES = ("bfloat16", "float32", "float16")  # benchmarks/bench_attention.py's DTYPES


@dataclass(kw_only=True)
class AttentionTableConfig:
    """The attention dispatch table's measurement: the config of ``mcf bench attention --table``
    (``mcf config --list --command bench-attention``). Every candidate path, forward + backward, at each shape and
    dtype; the flags are those of the pass-through mode (``--batch 32 64`` or ``--set batch=32,64``). Defaults:
    MCF's sequence lengths (ViT-*/16 at 112 px: 13 visible + class for the encoders at 75 % masking, 50 for the
    decoder and teacher; at 224 px: 50 and 197) and head dimensions (64: the ViT encoders and teachers; 32: the
    MAE decoder, 512 wide with 16 heads)."""

    batch: tuple[int, ...] | None = field(None, flag=True, help=(
        "Batch sizes; None = the device's (CPU 32, GPU 256: mcf.bench.attention.TABLE_SIZES)."))
    heads: tuple[int, ...] | None = field(None, flag=True, help="Head counts; None = the device's (CPU 12, GPU 16).")
    tokens: tuple[int, ...] = field((13, 50, 197), flag=True, help="Sequence lengths.")
    head_dim: tuple[int, ...] = field((32, 64), flag=True, help="Head dimensions.")
    dtypes: tuple[str, ...] = field(("bfloat16", "float32"), flag="--dtype", help=(
        f"Input dtypes, among {', '.join(ATTENTION_DTYPES)} (the table holds a row per dtype)."))
    device: str = field("auto", flag=True, help="auto (the first GPU if any, else cpu), cpu, cuda, cuda:N.")
    warmup: int | None = field(None, flag=True, help="Untimed calls per path; None = the device's (CPU 2, GPU 5).")
    repeats: int | None = field(None, flag=True, help=(
        "Timed groups per path, the paths interleaved, the median kept; None = the device's (CPU 7, GPU 20)."))
    inner: int | None = field(None, flag=True, help="Calls per timed group; None = the device's (CPU 1, GPU 5).")
    table_file: str | None = field(None, flag=True, help=(
        "The table the rows are merged into; None = the per-user cache that attention.backend=auto reads "
        "(kernels/attention_table.json is the repository's)."))
    clock: str = field("wall", help=(
        "What a path's time is on a CPU: wall (what a training step pays; use it on a quiet host) or cpu (process "
        "CPU time, all threads: steadier on a shared host, but a path that runs on more threads pays for each). "
        "Always wall on a GPU."))

    def __post_init__(self) -> None:
        if self.clock not in ("wall", "cpu"):
            raise ConfigError(f"clock must be wall or cpu, got {self.clock!r}")
        for name in ("batch", "heads", "tokens", "head_dim"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) < 1):
                raise ConfigError(f"{name} must be one or more sizes >= 1")
        if not self.dtypes or set(self.dtypes) - set(ATTENTION_DTYPES):
            raise ConfigError(f"dtypes must be among {','.join(ATTENTION_DTYPES)}")
        if self.warmup is not None and self.warmup < 0:
            raise ConfigError("warmup must be >= 0")
        if any(v is not None and v < 1 for v in (self.repeats, self.inner)):
            raise ConfigError("repeats and inner must be >= 1")
