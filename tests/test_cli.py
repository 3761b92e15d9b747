import os
import subprocess
import sys

from mcf.cli import _pop_local_rank, build_parser


def test_local_rank_is_taken_out_of_argv(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert _pop_local_rank(["--local_rank=1", "pretrain", "--max-steps", "2"]) == ["pretrain", "--max-steps", "2"]
    assert os.environ["LOCAL_RANK"] == "1"
    monkeypatch.delenv("LOCAL_RANK")
    assert _pop_local_rank(["pretrain", "--local-rank", "3"]) == ["pretrain"]
    assert os.environ["LOCAL_RANK"] == "3"


def test_every_command_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"pretrain", "export-fp32", "data", "export", "finetune", "probe", "bench"} <= set(sub.choices)


def test_help_is_fast_and_lists_commands():
    out = subprocess.run([sys.executable, "-m", "mcf", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "pretrain" in out.stdout and "bench" in out.stdout
