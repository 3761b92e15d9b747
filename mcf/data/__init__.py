"""Data: datasets (image folder, our LMDB, the paper's LMDB, webdataset shards) over compact cached
indexes, the converters, the built-in real faces, the distributed samplers, the transform, and the
PyTorch / DALI pre-training loaders.

Exports are resolved lazily (PEP 562) so that DALI's spawned source workers, which import
``mcf.data.core.source``, do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "DataConfig": "mcf.data.core.config",
    "build_pretrain_loader": "mcf.data.loaders.factory",
    "PretrainLoader": "mcf.data.loaders.base",
    "TorchPretrainLoader": "mcf.data.loaders.torch_loader",
    "dali_available": "mcf.data.loaders.factory",
    "DaliPretrainLoader": "mcf.data.loaders.dali_loader",
    "DistributedSampler": "mcf.data.core.sampler",
    "EncodedImageDataset": "mcf.data.formats.datasets",
    "ImageFolderDataset": "mcf.data.formats.datasets",
    "LMDBDataset": "mcf.data.formats.datasets",
    "PaperLMDBDataset": "mcf.data.formats.datasets",
    "open_dataset": "mcf.data.formats.factory",
    "ShardDataset": "mcf.data.formats.shards",
    "ShardSampler": "mcf.data.formats.shards",
    "StreamedShards": "mcf.data.formats.shards",
    "open_shards": "mcf.data.formats.shards",
    "build_shards": "mcf.data.tools.shards_build",
    "IndexOptions": "mcf.data.core.index",
    "build_transform": "mcf.data.core.transforms",
    "PretrainTransform": "mcf.data.core.transforms",
    "IMAGENET_MEAN": "mcf.data.core.transforms",
    "IMAGENET_STD": "mcf.data.core.transforms",
    "BadImage": "mcf.data.core.decode",
    "decode_rgb": "mcf.data.core.decode",
    "build_lmdb": "mcf.data.tools.lmdb_build",
    "verify_dataset": "mcf.data.tools.lmdb_build",
    "dataset_info": "mcf.data.tools.lmdb_build",
    "build_builtin": "mcf.data.formats.builtin",
    "ensure_builtin": "mcf.data.formats.builtin",
    "load_builtin_faces": "mcf.data.formats.builtin",
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
    from mcf.data.core.config import DataConfig
    from mcf.data.core.decode import BadImage, decode_rgb
    from mcf.data.core.index import IndexOptions
    from mcf.data.core.sampler import DistributedSampler
    from mcf.data.core.transforms import IMAGENET_MEAN, IMAGENET_STD, PretrainTransform, build_transform
    from mcf.data.formats.builtin import build_builtin, ensure_builtin, load_builtin_faces
    from mcf.data.formats.datasets import EncodedImageDataset, ImageFolderDataset, LMDBDataset, PaperLMDBDataset
    from mcf.data.formats.factory import open_dataset
    from mcf.data.formats.shards import ShardDataset, ShardSampler, StreamedShards, open_shards
    from mcf.data.loaders.base import PretrainLoader
    from mcf.data.loaders.dali_loader import DaliPretrainLoader
    from mcf.data.loaders.factory import build_pretrain_loader, dali_available
    from mcf.data.loaders.torch_loader import TorchPretrainLoader
    from mcf.data.tools.lmdb_build import build_lmdb, dataset_info, verify_dataset
    from mcf.data.tools.shards_build import build_shards


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mcf.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
