"""An LMDB read in the parent is read again by forked DataLoader workers (py-lmdb refuses to open a
file twice in one process, and the inherited environment must be dropped first)."""

import torch
from data_helpers import make_folder

from mcf.data import LMDBDataset, build_lmdb, build_pretrain_loader
from mcf.data.core.config import DataConfig


def test_torch_loader_workers_after_parent_opened_lmdb(tmp_path):
    make_folder(tmp_path / "src", n=12)
    build_lmdb(tmp_path / "src", tmp_path / "db", workers=1, progress=False)
    LMDBDataset(tmp_path / "db")[0]  # the parent process opens the environment and keeps it
    cfg = DataConfig(path=str(tmp_path / "db"), loader="torch", num_workers=2)
    loader = build_pretrain_loader(
        cfg, img_size=32, batch_size=4, rank=0, world_size=1, seed=0, device=torch.device("cpu")
    )
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 3 and all(b.shape == (4, 3, 32, 32) for b in batches)
    assert loader.bad_samples == 0
