"""The ``data`` section of the config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mcf.configtree import field
from mcf.errors import ConfigError


@dataclass(kw_only=True)
class DataConfig:
    path: str = field(
        "builtin",
        help="Image folder, mcf LMDB, the paper's LMDB, or webdataset shards (brace pattern, directory of .tar, "
        "list file, pipe:/URL); 'builtin' = the built-in real faces (train split).",
    )
    lmdb_keys: str | None = field(
        None, help="Key list file of the paper's LMDB layout (one key per line); only with such an LMDB."
    )
    loader: Literal["auto", "dali", "torch"] = field(
        "auto", help="Input pipeline: DALI when installed and working ('auto'), or the PyTorch DataLoader."
    )
    num_workers: int | Literal["auto"] = field(
        "auto",
        help="Decoding workers per rank (DataLoader workers / DALI threads and source workers); 'auto' = the CPUs of "
        "this rank (affinity mask / ranks on the node) minus 1 for the main process, 1..16 (mcf.data.core.workers).",
    )
    prefetch: int = field(2, help="Batches prefetched per worker / DALI queue depth.")
    img_size: int | None = field(None, help="Input resolution; None = the model's image size.")
    random_resized_crop: bool = field(False, help="RandomResizedCrop instead of the released plain resize.")
    crop_scale: tuple[float, float] = field((0.2, 1.0), help="Area range of RandomResizedCrop.")
    hflip: bool = field(True, help="Random horizontal flip (p=0.5), as released.")
    max_bad_fraction: float = field(
        0.01, help="Stop the run when more than this fraction of the samples seen failed to decode."
    )
    max_image_pixels: int = field(
        64_000_000, help="Images with more pixels (from the header) are bad samples: a decompression-bomb guard."
    )
    shuffle_buffer: int = field(
        2048, help="webdataset shards: samples per shuffle window (streamed shards hold one window per worker)."
    )
    stream_stall_s: float = field(
        120.0,
        help="pipe: shards: a command that delivers less than 64 KiB in this many seconds of "
        "waiting is stalled; the rest of its shard is bad samples (substituted, counted), never a hang.",
    )
    index_cache: str | None = field(
        None, help="Folder for file/key/shard index files (read-only data); None = <data>/.mcf/."
    )
    index_wait_s: float = field(
        7200.0, help="How long ranks other than 0 wait for rank 0 to write a missing or stale index."
    )

    def __post_init__(self) -> None:
        nw = self.num_workers
        if nw != "auto" and (isinstance(nw, bool) or not isinstance(nw, int) or nw < 0):
            raise ConfigError(f"data.num_workers must be 'auto' or an integer >= 0, not {self.num_workers!r}")
        if self.prefetch < 1:
            raise ConfigError("data.prefetch must be >= 1")
        if self.img_size is not None and self.img_size <= 0:
            raise ConfigError("data.img_size must be positive")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError("data.crop_scale must satisfy 0 < min <= max <= 1")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError("data.max_bad_fraction must be in [0, 1]")
        if self.loader not in ("auto", "dali", "torch"):
            raise ConfigError(f"data.loader must be auto, dali or torch, not {self.loader!r}")
        if self.max_image_pixels < 1:
            raise ConfigError("data.max_image_pixels must be positive")
        if self.shuffle_buffer < 1:
            raise ConfigError("data.shuffle_buffer must be >= 1")
        if not self.stream_stall_s > 0:
            raise ConfigError("data.stream_stall_s must be positive")
        if not self.index_wait_s > 0:
            raise ConfigError("data.index_wait_s must be positive")
