"""Hostile or unlucky input (issue 23): nothing hangs, nothing mcf did not create is deleted, and every
failure is one clear line. Each test is one case of a class: crafted pickles, tar headers, brace patterns,
stalled streams, output folders that hold the source or another run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mcf.errors import CheckpointError


def self_sharing_list(depth: int = 60) -> list:
    """A list that holds itself twice, ``depth`` levels deep: 2**depth paths, depth + 1 objects (2 KB)."""
    a: list = [0]
    for _ in range(depth):
        a = [a, a]
    return a


@pytest.mark.timeout(60)
def test_shared_references_load_in_linear_time(tmp_path):
    from mcf.serialization import safe_load

    torch.save({"model": {"w": torch.zeros(2)}, "junk": self_sharing_list()}, tmp_path / "a.pth")
    assert (tmp_path / "a.pth").stat().st_size < 4096
    obj = safe_load(tmp_path / "a.pth")
    assert obj["junk"][0] is obj["junk"][1]  # memo of the unpickler kept: one object, walked once


@pytest.mark.timeout(60)
def test_export_of_a_self_sharing_pickle_ends(tmp_path):
    torch.save({"args": self_sharing_list()}, tmp_path / "a.pth")
    proc = subprocess.run([sys.executable, "-m", "mcf", "export", str(tmp_path / "a.pth"), str(tmp_path / "x.safetensors")],
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("mcf: error:"), proc.stderr[-2000:]


@pytest.mark.timeout(60)
def test_too_deep_nesting_is_one_line(tmp_path):
    from mcf.serialization import MAX_DEPTH, safe_load

    a: list = []
    for _ in range(MAX_DEPTH + 5):
        a = [a]
    torch.save({"x": a}, tmp_path / "deep.pth")
    with pytest.raises(CheckpointError, match=f"nest more than {MAX_DEPTH} deep"):
        safe_load(tmp_path / "deep.pth")
