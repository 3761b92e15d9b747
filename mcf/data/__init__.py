"""Data: datasets (image folder, our LMDB, the paper's LMDB, webdataset shards) over compact cached
indexes, the converters, the built-in real faces, the distributed samplers, the transform, and the
PyTorch / DALI pre-training loaders.

Exports are resolved lazily (PEP 562) so that DALI's spawned source workers, which import
``mcf.data.source``, do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "DataConfig": "mcf.data.config",
    "build_pretrain_loader": "mcf.data.loader",
    "PretrainLoader": "mcf.data.loader",
    "TorchPretrainLoader": "mcf.data.loader",
    "dali_available": "mcf.data.loader",
    "DaliPretrainLoader": "mcf.data.dali_loader",
    "DistributedSampler": "mcf.data.sampler",
    "EncodedImageDataset": "mcf.data.datasets",
    "ImageFolderDataset": "mcf.data.datasets",
    "LMDBDataset": "mcf.data.datasets",
    "PaperLMDBDataset": "mcf.data.datasets",
    "open_dataset": "mcf.data.datasets",
    "ShardDataset": "mcf.data.shards",
    "ShardSampler": "mcf.data.shards",
    "StreamedShards": "mcf.data.shards",
    "open_shards": "mcf.data.shards",
    "build_shards": "mcf.data.shards_build",
    "IndexOptions": "mcf.data.index",
    "build_transform": "mcf.data.transforms",
    "PretrainTransform": "mcf.data.transforms",
    "IMAGENET_MEAN": "mcf.data.transforms",
    "IMAGENET_STD": "mcf.data.transforms",
    "BadImage": "mcf.data.decode",
    "decode_rgb": "mcf.data.decode",
    "build_lmdb": "mcf.data.lmdb_build",
    "verify_dataset": "mcf.data.lmdb_build",
    "dataset_info": "mcf.data.lmdb_build",
    "build_builtin": "mcf.data.builtin",
    "ensure_builtin": "mcf.data.builtin",
    "load_builtin_faces": "mcf.data.builtin",
}

__all__ = [
    "BadImage",
    "DaliPretrainLoader",
    "DataConfig",
    "DistributedSampler",
    "EncodedImageDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "IndexOptions",
    "LMDBDataset",
    "PaperLMDBDataset",
    "PretrainLoader",
    "PretrainTransform",
    "ShardDataset",
    "ShardSampler",
    "StreamedShards",
    "TorchPretrainLoader",
    "build_builtin",
    "build_lmdb",
    "build_pretrain_loader",
    "build_shards",
    "build_transform",
    "dali_available",
    "dataset_info",
    "decode_rgb",
    "ensure_builtin",
    "load_builtin_faces",
    "open_dataset",
    "open_shards",
    "verify_dataset",
]

if TYPE_CHECKING:
    from mcf.data.builtin import build_builtin, ensure_builtin, load_builtin_faces
    from mcf.data.config import DataConfig
    from mcf.data.dali_loader import DaliPretrainLoader
    from mcf.data.datasets import EncodedImageDataset, ImageFolderDataset, LMDBDataset, PaperLMDBDataset, open_dataset
    from mcf.data.decode import BadImage, decode_rgb
    from mcf.data.index import IndexOptions
    from mcf.data.lmdb_build import build_lmdb, dataset_info, verify_dataset
    from mcf.data.loader import PretrainLoader, TorchPretrainLoader, build_pretrain_loader, dali_available
    from mcf.data.sampler import DistributedSampler
    from mcf.data.shards import ShardDataset, ShardSampler, StreamedShards, open_shards
    from mcf.data.shards_build import build_shards
    from mcf.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PretrainTransform, build_transform


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mcf.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
