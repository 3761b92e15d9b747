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


def test_config_command_prints_resolved_config_and_lists_keys(capsys):
    from mcf.cli import main

    assert main(["config", "--config", "base", "--set", "train.seed=3"]) == 0
    out = capsys.readouterr().out
    assert "name: mcf_vit_base_patch16" in out and "seed: 3" in out
    assert main(["config", "--list"]) == 0
    assert "masking.ratio = 0.75" in capsys.readouterr().out
    assert main(["config", "--set", "trian.seed=1"]) == 2
    assert "unknown config key 'trian.seed'" in capsys.readouterr().err


def test_config_list_shows_the_values_of_the_preset_that_runs(capsys):
    """`mcf pretrain` with no --config runs the demo preset, so `mcf config --list` (and `--config demo`) shows the
    demo's values, the built-in default beside a changed one; `--config base` and --set are honoured too."""
    from mcf.cli import main

    for argv in (["config", "--list"], ["config", "--list", "--config", "demo"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "model.name = 'mcf_vit_tiny'  [default 'mcf_vit_base_patch16']" in out
        assert "checkpoint.every = 100  [default 1000]" in out
    assert main(["config", "--list", "--config", "base", "--set", "train.seed=3"]) == 0
    out = capsys.readouterr().out
    assert "\nmodel.name = 'mcf_vit_base_patch16'\n" in out and "train.seed = 3  [default 0]" in out


def test_every_bench_flag_has_help():
    import argparse

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    bench = next(a for a in sub.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"bench {name} {a.option_strings[0]}" for name, p in bench.choices.items() for a in p._actions
               if a.option_strings and a.dest != "help" and not a.help]
    assert not missing, missing


def test_error_quoting_hostile_input_stays_bounded(tmp_path, capsys):
    """An error that quotes a path or value from the input (here a shard list whose one line is a
    megabyte) is one bounded line, saying how long the message was."""
    from mcf.cli import MAX_ERROR_CHARS, main

    (tmp_path / "shards.txt").write_text("a" * 1_000_000 + ".tar\n")
    assert main(["data", "info", str(tmp_path / "shards.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mcf: error:") and err.count("\n") == 1
    assert len(err) < MAX_ERROR_CHARS + 100 and "characters in all)" in err
