"""``data.num_workers: auto`` and DALI's start-up check (issue 11, defects 5 and 7)."""

import logging
import os

import pytest
import torch

from mcf.data import DataConfig, build_pretrain_loader
from mcf.data.core.transforms import build_transform
from mcf.data.core.workers import AUTO_WORKERS_CAP, auto_num_workers, cpus_per_rank
from mcf.errors import ConfigError

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "env,cpus,per_rank,workers",
    [
        ({}, 1, 1, 0),  # one CPU: decode in the main process
        ({}, 2, 2, 1),  # this CI machine: 1 worker + the main process
        ({}, 8, 8, 7),
        ({}, 192, 192, AUTO_WORKERS_CAP),  # capped
        ({"LOCAL_WORLD_SIZE": "8"}, 96, 12, 11),  # torchrun: 8 ranks share the mask
        ({"LOCAL_WORLD_SIZE": "8"}, 4, 1, 1),  # fewer CPUs than ranks: still 1 worker
        ({"LOCAL_SIZE": "4"}, 32, 8, 7),  # the deepspeed launcher
        # torchrun inside srun: the launcher's ranks share the task's CPUs
        ({"LOCAL_WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_CPUS_PER_TASK": "64"}, 64, 32, AUTO_WORKERS_CAP),
        # the deepspeed launcher as one srun -c 8 task (pretrain_deepspeed.sbatch), its mask not bound: 8 CPUs / 2
        ({"LOCAL_SIZE": "2", "SLURM_PROCID": "0", "SLURM_CPUS_PER_TASK": "8"}, 80, 4, 3),
        ({"SLURM_PROCID": "3", "SLURM_CPUS_PER_TASK": "10"}, 10, 10, 9),  # srun -c 10, task bound to its CPUs
        ({"SLURM_PROCID": "3", "SLURM_CPUS_PER_TASK": "10"}, 80, 10, 9),  # srun -c 10 without binding
        ({"SLURM_PROCID": "0", "SLURM_NTASKS_PER_NODE": "4", "SLURM_CPUS_ON_NODE": "48"}, 48, 12, 11),
        ({"SLURM_PROCID": "0", "SLURM_CPUS_ON_NODE": "48"}, 6, 6, 5),  # srun bound the task to 6 of the 48
        ({"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "4(x2),2", "SLURM_NODEID": "2"}, 16, 8, 7),
        ({"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "4(x2),2", "SLURM_NODEID": "1"}, 16, 4, 3),
        ({"LOCAL_WORLD_SIZE": "garbage"}, 4, 4, 3),  # unreadable: as if unset
    ],
)
def test_auto_num_workers(env, cpus, per_rank, workers):
    assert cpus_per_rank(env, cpus)[0] == per_rank
    n, how = auto_num_workers(env, cpus)
    assert n == workers and "\n" not in how and str(cpus) in how


@pytest.mark.parametrize(
    "env,threads",
    [
        ({"LOCAL_SIZE": "2", "SLURM_PROCID": "0", "SLURM_CPUS_PER_TASK": "8"}, "4"),  # deepspeed in one srun task
        ({"SLURM_PROCID": "5", "SLURM_CPUS_PER_TASK": "8"}, "8"),  # a rank srun started itself
        ({"LOCAL_WORLD_SIZE": "4"}, "20"),  # torchrun, no slurm
        ({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "3"}, "3"),  # set by the user or a launcher: kept
    ],
)
def test_cpu_threads_per_rank_use_the_same_share_as_the_workers(monkeypatch, env, threads):
    """OMP_NUM_THREADS per rank from :func:`cpus_per_rank`: the deepspeed launcher inside one ``srun -c 8`` task starts
    2 ranks that share the task's 8 CPUs (each took all 8 before: SLURM_CPUS_PER_TASK read as every rank's own)."""
    import torch

    from mcf import threads as T

    for key in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_PROCID", "SLURM_STEP_ID",
                "SLURM_CPUS_PER_TASK", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_CPUS_ON_NODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(80)))
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    n, why = T.set_cpu_threads()
    assert os.environ["OMP_NUM_THREADS"] == threads and n == int(threads) and set_to == [n] and "\n" not in why


def test_auto_uses_the_affinity_mask(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert auto_num_workers({}) == auto_num_workers({}, 5)
    assert auto_num_workers({})[0] == 4


def test_num_workers_config_and_log(tmp_path, monkeypatch, caplog):
    assert DataConfig().num_workers == "auto"
    for bad in (-1, True, 1.5, "many"):
        with pytest.raises(ConfigError, match="num_workers"):
            DataConfig(num_workers=bad)
    from data_helpers import make_folder

    import mcf.data.loaders.base as loader_mod

    make_folder(tmp_path, 8)
    monkeypatch.setattr(loader_mod, "_WORKERS_LOGGED", False)
    monkeypatch.setattr(loader_mod, "auto_num_workers", lambda: (2, "12 CPUs in the affinity mask / 4 local ranks"))
    kw = dict(img_size=32, batch_size=4, world_size=1, seed=0, device=CPU)
    with caplog.at_level(logging.INFO, logger="mcf.data.loaders.base"):
        a = build_pretrain_loader(DataConfig(path=str(tmp_path), loader="torch"), rank=0, **kw)
        b = build_pretrain_loader(DataConfig(path=str(tmp_path), loader="torch"), rank=0, **kw)
        c = build_pretrain_loader(DataConfig(path=str(tmp_path), loader="torch", num_workers=1), rank=0, **kw)
    assert (a.cfg.num_workers, b.cfg.num_workers, c.cfg.num_workers) == (2, 2, 1)  # an explicit integer wins
    lines = [r.getMessage() for r in caplog.records if "num_workers=auto" in r.getMessage()]
    assert lines == ["data: num_workers=auto -> 2 per rank (12 CPUs in the affinity mask / 4 local ranks)"]  # once


# -- DALI's start-up check -----------------------------------------------------------------------


def test_dali_check_passes_on_the_cpu_pipeline():
    pytest.importorskip("nvidia.dali")
    from mcf.data.loaders.dali_check import MEAN_LEVELS, P99_LEVELS, check_dali, compare

    for size, rrc in ((32, False), (64, True), (224, False)):
        t = build_transform(size, random_resized_crop=rrc)
        check_dali(CPU, t)
        stats = compare(CPU, t)
        assert len(stats) == 4
        # libjpeg-turbo decodes as PIL does: only the resize filters differ (measured: mean <= 0.3
        # levels, p99 <= 5 at 32 px, a 5x downscale), well inside the tolerance
        assert all(mean < MEAN_LEVELS / 5 and p99 < P99_LEVELS / 2 for mean, p99, _ in stats), stats


def test_dali_check_catches_a_mismatching_pipeline(monkeypatch):
    """A DALI graph that computes something else (here: a wrong std) fails the check."""
    pytest.importorskip("nvidia.dali")
    import mcf.data.loaders.dali_loader as dl
    from mcf.data.loaders.dali_check import DaliCheckError, check_dali

    monkeypatch.setattr(dl, "IMAGENET_STD", (0.25, 0.25, 0.25))
    with pytest.raises(DaliCheckError, match="reference JPEG 0 differs .* levels mean"):
        check_dali(CPU, build_transform(32))
    monkeypatch.setattr(dl, "decoder_device", lambda device: "mixed")  # no GPU decoder here
    with pytest.raises(DaliCheckError, match="^[A-Za-z]+Error: "):
        check_dali(CPU, build_transform(32))


def _failing(device, transform):
    raise RuntimeError("nvJPEG: no such\nmultiline  thing")


def test_auto_falls_back_to_torch_with_one_log_line(tmp_path, caplog):
    from data_helpers import make_folder

    make_folder(tmp_path, 8)
    kw = dict(img_size=32, batch_size=4, world_size=1, seed=0, device=CPU)
    with caplog.at_level(logging.INFO, logger="mcf.data.loaders"):
        ld = build_pretrain_loader(DataConfig(path=str(tmp_path), loader="auto", num_workers=0), rank=0,
                                   dali_check=_failing, **kw)
    assert ld.kind == "torch"
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == [
        "data: DALI failed its start-up check, using the PyTorch loader (nvJPEG: no such multiline thing)"
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mcf.data.loaders"):
        other_rank = build_pretrain_loader(DataConfig(path=str(tmp_path), num_workers=0), rank=1, dali_check=_failing,
                                           **{**kw, "world_size": 2, "batch_size": 2})
    assert other_rank.kind == "torch" and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    explicit = DataConfig(path=str(tmp_path), loader="dali", num_workers=0)
    with pytest.raises(
        ConfigError, match=r"^data.loader=dali, but DALI failed its start-up check \(nvJPEG: no such multi"
    ):
        build_pretrain_loader(explicit, rank=0, dali_check=_failing, **kw)
    passed = build_pretrain_loader(DataConfig(path=str(tmp_path), loader="auto", num_workers=0), rank=0,
                                   dali_check=lambda d, t: None, **kw)
    assert passed.kind == "dali"


def test_ranks_agree_on_the_loader(monkeypatch):
    """One rank failing the check sends every rank to the PyTorch loader (with its reason)."""
    import mcf.data.loaders.factory as factory_mod

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)

    def gather(out, obj):
        out[:] = [None, "ImportError: no nvidia.dali", None]

    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    assert factory_mod._agree(None, 3) == "on rank 1: ImportError: no nvidia.dali"
    assert factory_mod._agree("x", 1) == "x"
