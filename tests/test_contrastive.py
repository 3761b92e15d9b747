"""The contrastive loss with keys gathered from every rank equals the single-process loss."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tolerances import assert_close_scaled

from mcf.losses import ContrastiveLoss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(q, k, tau=0.2):
    """The released formula on one process: CE(q·kᵀ/τ, arange) · 2τ."""
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / tau
    return F.cross_entropy(logits, torch.arange(q.shape[0])) * 2 * tau


def test_single_process_matches_formula():
    q, k = torch.randn(8, 16), torch.randn(8, 16)
    assert_close_scaled(ContrastiveLoss(0.2)(q, k), _reference(q, k), depth=3)  # normalize, q.k, logsumexp


def test_gather_is_called_only_with_several_ranks():
    calls = []

    def fake_gather(k):
        calls.append(k.shape)
        return torch.cat([torch.randn_like(k), k])  # this rank is rank 1 of 2

    q, k = torch.randn(4, 16), torch.randn(4, 16)
    ContrastiveLoss(0.2)(q, k)
    assert calls == []
    loss = ContrastiveLoss(0.2, rank=1, world_size=2, gather=fake_gather)(q, k)
    assert calls == [torch.Size([4, 16])] and torch.isfinite(loss)


def _worker(rank, world, port, q_all, k_all, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = q_all.shape[0] // world
    q = q_all[rank * n : (rank + 1) * n].clone().requires_grad_(True)
    loss = ContrastiveLoss(0.2, rank=rank, world_size=world)(q, k_all[rank * n : (rank + 1) * n])
    loss.backward()
    out[rank, 0] = loss.detach()
    out[rank, 1:] = q.grad.flatten()
    dist.destroy_process_group()


def test_two_gloo_ranks_equal_concatenated_batch():
    q_all, k_all = torch.randn(8, 6), torch.randn(8, 6)
    out = torch.zeros(2, 1 + 4 * 6).share_memory_()
    mp.spawn(_worker, args=(2, _free_port(), q_all, k_all, out), nprocs=2, join=True)
    q = q_all.clone().requires_grad_(True)
    full = _reference(q, k_all)
    # each rank's loss is the mean over its queries: their mean is the whole batch's loss
    assert_close_scaled(out[:, 0].mean(), full.detach(), depth=4)  # other GEMM shapes per rank, one more mean
    full.backward()
    # per-rank gradients are of the rank's own mean; the full-batch mean halves them
    assert_close_scaled(torch.cat([out[0, 1:], out[1, 1:]]).view(8, 6) / 2, q.grad, depth=8)  # forward + backward
