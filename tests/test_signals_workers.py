"""Pre-emption signals reach every process of a slurm job step: loader workers must survive them,
and the trainer must not die of a repeated one after a stop was requested."""

import os
import signal
import time

import torch
from data_helpers import make_folder

from mcf.data import build_lmdb, build_pretrain_loader
from mcf.data.core.config import DataConfig
from mcf.train.signals import StopRequest


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except OSError:
                pass
    return out


def test_loader_workers_survive_stop_signals(tmp_path):
    make_folder(tmp_path / "src", n=12)
    build_lmdb(tmp_path / "src", tmp_path / "db", workers=1, progress=False)
    stop = StopRequest().install()
    try:
        for kind in ("torch", "dali"):
            cfg = DataConfig(path=str(tmp_path / "db"), loader=kind, num_workers=1)
            loader = build_pretrain_loader(
                cfg, img_size=32, batch_size=4, rank=0, world_size=1, seed=0, device=torch.device("cpu")
            )
            loader.set_epoch(0)
            it = iter(loader)
            next(it)
            workers = [p for p in _children(os.getpid()) if p != os.getpid()]
            assert workers, kind
            for pid in workers:
                for sig in (signal.SIGUSR1, signal.SIGTERM):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            time.sleep(1.0)
            assert len(list(it)) == 2, kind  # the rest of the epoch still arrives
            loader.close()
    finally:
        stop.restore()


def test_signals_stay_ignored_after_a_requested_stop():
    stop = StopRequest().install()
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.1)
    assert stop.requested
    stop.restore()
    os.kill(os.getpid(), signal.SIGUSR1)  # would kill the process with the default disposition
    time.sleep(0.1)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
