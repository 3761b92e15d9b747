"""``mcf bench``'s configs on the project's config tree (:mod:`mcf.bench.config`): each dedicated flag is sugar
for a key (the same value as ``--set``), ``--config FILE`` and ``--set`` resolve after the defaults as for pretrain
and finetune, bad keys and values are one-line errors, ``mcf config --list --command bench-*`` documents every key,
and the tracked flags (hence the runs' config ids) are what they were before the flags became keys. Nothing here
runs a benchmark: the configs are resolved from parsed command lines."""

from __future__ import annotations

import argparse

import pytest

from mcf.bench import cli as bench_cli
from mcf.bench.config import (
    AttentionTableConfig,
    DataBenchConfig,
    EmaDriftConfig,
    IndexScaleConfig,
    MemoryBenchConfig,
    ScaleBenchConfig,
    ScaleWidthsConfig,
    StepBenchConfig,
)
from mcf.bench.tracking import bench_flags, config_id
from mcf.cli import build_parser, main
from mcf.configtree import flat_keys
from mcf.errors import ConfigError


def _config(*argv: str):
    return bench_cli.config_from_args(build_parser().parse_args(["bench", *argv]))


def _key(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# command words, the flag form, the --set form, the key and the value both give (not the default),
# the --command name of `mcf config --list`, its class
CASES = {
    "step": (["step"], ["--variants", "mcf", "--img-size", "0"], ["variants=mcf", "img_size=0"],
             {"variants": ("mcf",), "img_size": None}, "bench-step", StepBenchConfig),
    "data": (["data"], ["--sources", "folder,lmdb"], ["sources=folder,lmdb"], {"sources": ("folder", "lmdb")},
             "bench-data", DataBenchConfig),
    "index-scale": (["data", "--index-scale", "5000"], ["--worker-keys", "300"], ["worker_keys=300"],
                    {"keys": 5000, "worker_keys": 300}, "bench-index-scale", IndexScaleConfig),
    "memory": (["memory"], ["--batch-sizes", "2,6", "--precision", "fp32"], ["batch_sizes=[2, 6]", "precision=fp32"],
               {"batch_sizes": (2, 6), "precision": "fp32"}, "bench-memory", MemoryBenchConfig),
    "scale": (["scale"], ["--one-nic-per-ring", "--hop-inter-us", "2.5"],
              ["network.rail_aligned=false", "network.hop_inter_us=2.5"],
              {"network.rail_aligned": False, "network.hop_inter_us": 2.5}, "bench-scale", ScaleBenchConfig),
    "scale-widths": (["scale-widths"], ["--units", "1,2,2", "--zero-set", "stage3_param_persistence_threshold=0",
                                        "--mfu", "0.3"],
                     ["units=1,2,2", "zero_set=stage3_param_persistence_threshold=0", "compute.mfu=0.3"],
                     {"units": (1, 2, 2), "zero_set": ("stage3_param_persistence_threshold=0",), "compute.mfu": 0.3},
                     "bench-scale-widths", ScaleWidthsConfig),
    "ema-drift": (["ema-drift"], ["--report", "1,5", "--zero", "2", "--lr", "0.01"], ["report=1,5", "zero=2",
                                                                                      "lr=0.01"],
                  {"report": (1, 5), "zero": 2, "lr": 0.01}, "bench-ema-drift", EmaDriftConfig),
    # the pass-through mode's flags (several values after one flag) set --table's keys
    "attention": (["attention", "--table"], ["--batch", "2", "4", "--dtype", "float32", "--repeats", "3"],
                  ["batch=2,4", "dtypes=float32", "repeats=3"], {"batch": (2, 4), "dtypes": ("float32",), "repeats": 3},
                  "bench-attention", AttentionTableConfig),
}


@pytest.mark.parametrize("name", CASES)
def test_flag_and_set_reach_the_same_value(name):
    words, flags, sets, want, _, cls = CASES[name]
    by_flag = _config(*words, *flags)
    by_set = _config(*words, *(a for text in sets for a in ("--set", text)))
    assert isinstance(by_flag, cls)
    assert by_flag == by_set
    for key, value in want.items():
        assert _key(by_flag, key) == value, key
        assert _key(cls(), key) != value, key  # the case sets something other than the default
    # no flag: exactly the dataclass's defaults (the flags only set what is given)
    plain = _config(*words)
    changed = {k for k in flat_keys(cls) if _key(plain, k) != _key(cls(), k)}
    assert changed <= {"keys", "worker_keys"}, changed  # index-scale: keys from --index-scale, worker_keys lowered


BAD_VALUES = {  # a --set of the wrong type per benchmark, and what the error says
    "step": ("batch_size=many", "expected an integer"), "data": ("batch_size=many", "expected an integer"),
    "index-scale": ("folder_files=many", "expected an integer"), "memory": ("gpu_gb=many", "expected a number"),
    "scale": ("compute.mfu=many", "expected a number"), "scale-widths": ("nproc=many", "expected an integer"),
    "ema-drift": ("momentum=many", "expected a number"), "attention": ("repeats=many", "expected an integer"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_key_and_bad_value_are_one_line_errors(name, capsys):
    words, *_ = CASES[name]
    argv = ["bench", *words, "--tracking-uri", "none"]
    assert main([*argv, "--set", "batch_sizee=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mcf: error: bench ") and err.count("\n") == 1, err
    assert "unknown config key 'batch_sizee'" in err
    bad, message = BAD_VALUES[name]
    assert main([*argv, "--set", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mcf: error: bench ") and err.count("\n") == 1, err
    assert f"invalid value for '{bad.split('=')[0]}': {message}, got 'many'" in err, err

def test_a_value_the_config_refuses_is_one_line(capsys):
    assert main(["bench", "step", "--tracking-uri", "none", "--warmup", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "mcf: error: bench step: warmup must be >= 1 (the first warm-up step is the FLOP count)\n"
    assert main(["bench", "scale", "--tracking-uri", "none", "--set", "network.inter_efficiency=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mcf: error: bench scale: ") and "inter_efficiency" in err and err.count("\n") == 1
    # the comm phase's trainer config, built as each rank builds it, before any rank starts (it was each rank's
    # traceback, cut to torchrun's summary)
    assert main(["bench", "scale", "--tracking-uri", "none", "--set", "optim.lr=-5"]) == 2
    assert capsys.readouterr().err == "mcf: error: optim.blr / optim.lr must be > 0\n"
    assert main(["bench", "scale-widths", "--tracking-uri", "none", "--set", "optim.lr=-5"]) == 2
    assert capsys.readouterr().err == "mcf: error: optim.blr / optim.lr must be > 0\n"


@pytest.mark.parametrize("argv, message", [
    (["scale-widths", "--model", "mcf_vit_tiny"],  # its decoder has 2 blocks: no quarter of them
     "bench scale-widths: mcf_vit_tiny's depth 4 and decoder depth 2 must divide by units[2]=4"),
    (["scale-widths", "--model", "mcf_vit_tinyy"], "bench scale-widths: unknown model 'mcf_vit_tinyy'"),
    (["scale-widths", "--units", "2,1,4"], "bench scale-widths: units must be three block counts 0 < a < b <= n"),
    (["scale-widths", "--zero-set", "stage3_param_persistence_threshold"],
     "bench scale-widths: zero_set takes KEY=VALUE with VALUE in JSON, got 'stage3_param_persistence_threshold'"),
    (["scale-widths", "--set", "zero_set=[a=b]"], "bench scale-widths: zero_set takes KEY=VALUE with VALUE in JSON"),
    (["scale-widths", "--options", "reduce-fp16"], "bench scale-widths: options must be among reduce-fp32,"),
    (["ema-drift", "--zero", "3"], "bench ema-drift: zero must be 0, 1 or 2"),
    (["ema-drift", "--steps", "0"], "bench ema-drift: steps, batch_size, nproc and timeout_s must be >= 1"),
    (["attention", "--table", "--dtype", "float8"], "bench attention --table: dtypes must be among bfloat16,"),
    (["attention", "--table", "--set", "tokens=8,0"], "bench attention --table: tokens must be one or more sizes >= 1"),
    (["attention", "--tiny", "--set", "repeats=3"], "bench attention: --config and --set set the keys of --table"),
    (["attention", "--table-file", "t.json"], "bench attention: --table-file goes with --table"),
])
def test_scale_widths_ema_drift_attention_refuse_bad_values_in_one_line(argv, message, capsys, monkeypatch):
    """Refused before anything runs: neither benchmark's run may start."""
    from mcf.bench import attention, ema_drift, scale_widths

    def never(*args):
        raise AssertionError("the benchmark ran")

    for module, name in ((scale_widths, "main"), (ema_drift, "main"), (attention, "run"), (attention, "run_table")):
        monkeypatch.setattr(module, name, never)
    assert main(["bench", *argv, "--tracking-uri", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mcf: error: {message}") and err.count("\n") == 1, err


def test_a_failed_stage_shows_the_failing_ranks_own_lines(tmp_path):
    """torchrun's summary says only which rank died of which signal; the error quotes that rank's stderr too, read from
    the files torchrun writes with the flags run_stage passes (--log-dir, --redirects 3)."""
    import subprocess
    import sys

    from mcf.bench.scale import _free_port, failure_text

    script = tmp_path / "worker.py"
    script.write_text("import os, sys\nif os.environ['RANK'] == '1':\n    sys.exit('rank 1 says: out of bananas')\n")
    logs = tmp_path / "logs"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(_free_port()), "--log-dir", str(logs), "--redirects", "3",
                           str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    text = failure_text(proc, logs)
    assert "[rank 1] rank 1 says: out of bananas" in text and "[torchrun]" in text, text
    assert "[rank 0]" not in text  # rank 0 wrote nothing


@pytest.mark.parametrize("name", CASES)
def test_config_list_documents_every_key(name, capsys):
    *_, command, cls = CASES[name]
    assert main(["config", "--list", "--command", command]) == 0
    out = capsys.readouterr().out
    for key, f in flat_keys(cls).items():
        assert f"\n{key} = " in out, key
        assert f.metadata.get("help"), f"{cls.__name__}.{key} has no help"
        assert f"\n    {f.metadata['help']}\n" in out, key


def test_config_list_resolves_the_bench_keys_with_set(capsys):
    assert main(["config", "--list", "--command", "bench-step", "--set", "steps=4"]) == 0
    out = capsys.readouterr().out
    assert "\nsteps = 4  [default 1]\n" in out and "\nbatch_size = 4\n" in out
    assert main(["config", "--list", "--command", "bench-step", "--set", "stepz=4"]) == 2
    assert "unknown config key 'stepz'; did you mean steps" in capsys.readouterr().err


def test_yaml_file_then_flags_then_set(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model: mcf_vit_tiny\nbatch_size: 8\nsteps: 5\nrepeats: 7\n")
    run = tmp_path / "run.yaml"
    run.write_text("inherit: base.yaml\nsteps: 6\n")
    cfg = _config("step", "--config", str(run), "--batch-size", "2", "--set", "repeats=9")
    assert (cfg.model, cfg.batch_size, cfg.steps, cfg.repeats) == ("mcf_vit_tiny", 2, 6, 9)
    with pytest.raises(ConfigError, match="takes a YAML file"):
        _config("step", "--config", "demo")
    (tmp_path / "bad.yaml").write_text("stpes: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'stpes'"):
        _config("memory", "--config", str(tmp_path / "bad.yaml"))


def test_e2e_defaults_and_its_own_flags():
    e2e = _config("e2e", "--workers", "0")
    assert (e2e.e2e, e2e.order, e2e.workers) == (True, "sequential", 0)
    assert _config("e2e", "--order", "interleaved").order == "interleaved"
    step = _config("step")
    assert (step.e2e, step.order) == (False, "interleaved")
    with pytest.raises(SystemExit):  # the loader's flags belong to e2e ...
        build_parser().parse_args(["bench", "step", "--workers", "0"])
    assert _config("step", "--set", "workers=0").workers == 0  # ... the key is reachable by --set


def test_scale_set_takes_its_keys_and_the_trainers():
    """``bench scale --set`` kept its meaning (the comm phase's trainer overrides) and now also sets the bench's
    keys: the two key sets cannot collide."""
    from mcf.config import Config

    assert not set(flat_keys(Config)) & set(flat_keys(ScaleBenchConfig))
    cfg = _config("scale", "--set", "train.target_precision=fp32", "--set", "steps=1",
                       "--set", "overrides=[deepspeed.reduce_dtype=bf16]")
    assert cfg.steps == 1
    assert cfg.overrides == ("deepspeed.reduce_dtype=bf16", "train.target_precision=fp32")
    assert not set(flat_keys(Config)) & set(flat_keys(ScaleWidthsConfig))
    widths = _config("scale-widths", "--set", "train.target_precision=fp32", "--set", "batch_size=3")
    assert (widths.batch_size, widths.overrides) == (3, ("train.target_precision=fp32",))
    # the count runs `bench scale`'s comm phase with these keys
    scale = widths.scale_config()
    assert (scale.batch_size, scale.overrides, scale.phases, scale.steps) == (3, widths.overrides, ("comm",), 2)


# config ids of these command lines as the tracker computed them before the flags became config keys (read from
# the argparse namespace): the resolved config must be tracked under the same id, or a benchmark's history splits
OLD_IDS = {
    "step": (["step", "--model", "mcf_vit_tiny", "--img-size", "0", "--batch-size", "2", "--variants", "mcf",
              "--compile"], "ec72caf7b2"),
    "e2e": (["e2e", "--workers", "0", "--loader", "torch"], "b7ab84307c"),
    "data": (["data", "--count", "24", "--sources", "folder"], "675efc4e27"),
    "data_index": (["data", "--index-scale", "20000", "--folder-files", "2000", "--worker-keys", "20000"],
                   "5abb72b256"),
    "memory": (["memory", "--batch-sizes", "4,16", "--project", "", "--precision", "fp32"], "4a7e70e536"),
    "scale": (["scale", "--one-nic-per-ring", "--set", "train.target_precision=fp32", "--stages", "3", "--gpus", "8"],
              "22ccea8055"),
    "attention": (["attention", "--table", "--batch", "2", "--heads", "2", "--tokens", "8", "--head-dim", "16"],
                  "a5f2f5fa5d"),
    "attention_pass": (["attention", "--tiny", "--modes", "fwd"], "a07858db9b"),
}


@pytest.mark.parametrize("name", OLD_IDS)
def test_tracked_flags_keep_the_earlier_config_ids(name):
    argv, old = OLD_IDS[name]
    args = build_parser().parse_args(["bench", *argv])
    prepare = {"step": lambda a: bench_cli._prepare_step(a, e2e=False),
               "e2e": lambda a: bench_cli._prepare_step(a, e2e=True),
               "data": bench_cli._prepare_data, "data_index": bench_cli._prepare_data,
               "memory": bench_cli._prepare_memory, "scale": bench_cli._prepare_scale,
               "attention": bench_cli._prepare_attention, "attention_pass": bench_cli._prepare_attention}[name]
    _, flags = prepare(args)
    assert config_id(argv[0], bench_flags(argparse.Namespace(**flags))) == old


def test_a_key_without_a_flag_is_tracked_when_set():
    args = build_parser().parse_args(["bench", "step", "--set", "momentum=0.9"])
    _, flags = bench_cli._prepare_step(args, e2e=False)
    assert flags["momentum"] == 0.9
    _, plain = bench_cli._prepare_step(build_parser().parse_args(["bench", "step"]), e2e=False)
    assert "momentum" not in plain


def test_every_bench_flag_is_a_config_key():
    """No flag is parsed and then dropped: each one's destination is a key's flag of its benchmark's config."""
    from mcf.configtree import flag_dest, flag_fields

    sub = build_parser()._subparsers._group_actions[0].choices["bench"]
    parsers = sub._subparsers._group_actions[0].choices
    classes = {"step": [StepBenchConfig], "e2e": [StepBenchConfig], "data": [DataBenchConfig, IndexScaleConfig],
               "memory": [MemoryBenchConfig], "scale": [ScaleBenchConfig], "scale-widths": [ScaleWidthsConfig],
               "ema-drift": [EmaDriftConfig]}
    for command, owners in classes.items():
        dests = {a.dest for a in parsers[command]._actions} - {"help", "set", "config", "tracking_uri", "experiment"}
        keys = {flag_dest(k, f) for cls in owners for k, f in flag_fields(cls).items()}
        assert dests <= keys, (command, dests - keys)


def test_attention_table_keys_are_the_pass_through_flags():
    """``--table``'s keys are set by the flags the pass-through mode has (each field's flag metadata names one), and
    the pass-through mode has no config."""
    from mcf.configtree import flag_dest, flag_fields

    sub = build_parser()._subparsers._group_actions[0].choices["bench"]
    parser = sub._subparsers._group_actions[0].choices["attention"]
    dests = {a.dest for a in parser._actions}
    assert {flag_dest(k, f) for k, f in flag_fields(AttentionTableConfig).items()} <= dests
    assert _config("attention", "--tiny", "--batch", "2") is None
    cfg = _config("attention", "--table", "--head-dim", "16", "--device", "cpu", "--table-file", "t.json")
    assert (cfg.head_dim, cfg.device, cfg.table_file, cfg.tokens) == ((16,), "cpu", "t.json", (13, 50, 197))
