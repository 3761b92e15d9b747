"""The plumbing of benchmarks/gpu_check.sh on the CPU, without the vendor folder or a GPU.

The stages themselves need the GPU machine (or the CPU rehearsal in benchmarks/RESULTS.md); here:
both scripts parse, the stage table fits the call, the runner records pass / skipped / timeout /
not-run and prints the summary from its exit trap, and the summary and the checks of gpu_check.py
work on fabricated stage outputs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
CALL_LIMIT_S = 600  # the device tool's limit for one call


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("OUT", "WORK", "STAGES", "DEADLINE", "LIMITS", "SIZE")}
    e.update(
        {
            "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
            "CUDA_VISIBLE_DEVICES": "", "CACHE": str(tmp_path / "cache"),
        }
    )
    e.update(env)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_vendor.sh"])
def test_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_stage_table_fits_one_call(gc, tmp_path):
    r = run_script(tmp_path, "--list")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    stages = {name: int(limit.rstrip("s")) for name, limit, *_ in rows if name != "total"}
    assert tuple(stages) == gc.EXPECTED_STAGES
    total = sum(stages.values())
    deadline = int(r.stdout.split("deadline ")[1].split("s")[0])
    assert f"{total}s" in r.stdout.splitlines()[-1]
    assert total <= deadline <= 8 * 60 < CALL_LIMIT_S  # the summary prints before the call's limit


def test_runner_records_every_outcome_and_prints_the_summary(tmp_path):
    # profile and resume find nothing to read: skipped (exit 75); kernels cannot start pytest within 1 s: timeout
    r = run_script(tmp_path, ALLOW_CPU="1", STAGES="profile kernels resume", LIMITS="kernels:1")
    assert r.returncode == 3, r.stdout + r.stderr  # the number of stages not passed
    assert "=== gpu_check summary ===" in r.stdout
    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    got = {s["name"]: s for s in doc["stages"]}
    assert [s["name"] for s in doc["stages"]] == ["profile", "kernels", "resume"]
    assert got["profile"]["status"] == "skipped" and "needs the resume stage" in got["profile"]["note"]
    assert got["resume"]["status"] == "skipped" and "needs the pretrain stage" in got["resume"]["note"]
    assert (
        got["kernels"]["status"] == "timeout" and got["kernels"]["limit_s"] == 1 and got["kernels"]["rc"] in (124, 137)
    )
    assert (
        doc["failed"] == 3
        and doc["not_run"] == []
        and doc["meta"]["stages"].split() == ["profile", "kernels", "resume"]
    )
    with tarfile.open(tmp_path / "out" / "gpu_check_stages.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"stages.tsv", "meta.txt", "profile.log", "kernels.log"} <= names
    assert "== kernels (limit 1s)" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_without_a_gpu_it_refuses_unless_allowed_and_still_summarises(tmp_path):
    r = run_script(tmp_path, STAGES="profile")
    assert r.returncode == 1 and "no CUDA device visible" in r.stderr
    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert doc["stages"] == [] and doc["not_run"] == ["profile"]
    r = run_script(tmp_path, ALLOW_CPU="1", STAGES="profile nonsense")
    assert r.returncode == 2 and "unknown stage 'nonsense'" in r.stderr


def test_summary_of_fabricated_stages(gc, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "stages.tsv").write_text("kernels\tpass\t0\t12.5\t60\t\npretrain\tfail\t1\t40.0\t80\t\n")
    (work / "kernels.json").write_text(json.dumps({"tests": 10, "passed": 9, "failures": 0, "errors": 0, "skipped": 1}))
    (work / "pretrain.log").write_text("\n".join(f"line {i}" for i in range(40)))
    (work / "meta.txt").write_text("date=2026-11-30T00:00:00Z\nstages=kernels pretrain resume\n")
    assert gc.summary(work, tmp_path / "s.json") == 2  # pretrain failed, resume never ran
    doc = json.loads((tmp_path / "s.json").read_text())
    assert (
        doc["not_run"] == ["resume"]
        and doc["stages"][1]["log_tail"][-1] == "line 39"
        and len(doc["stages"][1]["log_tail"]) == 25
    )
    assert "9 passed, 0 failed, 1 skipped" in capsys.readouterr().out


def test_compile_log_and_junit_counts(gc, tmp_path):
    log = tmp_path / "c.log"
    log.write_text("x\nV1130 [0/0] torch/_dynamo: Graph break in user code at a.py:3\n"
                   "V1130 [0/1] Recompiling function forward in b.py:9\n")
    assert gc.compile_log(log)["graph_breaks"] == 1 and gc.compile_log(log)["recompiles"] == 1
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure/></testcase>'
                   '<testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>')
    counts = gc.junit(xml)
    assert counts["passed"] == 1 and counts["failed_tests"] == ["t::b"]
    assert gc.main(["junit", str(xml)]) == 1  # a failed kernel test fails the stage


def _vendor_with_deepspeed_wheel(tmp_path: Path) -> Path:
    """.gpu_vendor/ when gpu_vendor.sh made it here; else a folder holding a metadata-only wheel of the installed
    DeepSpeed (its real METADATA and requirements: all that pip's resolution reads)."""
    real = ROOT / ".gpu_vendor"
    if list(real.glob("deepspeed-*-py3-none-any.whl")):
        return real
    import zipfile
    from importlib import metadata

    dist = metadata.distribution("deepspeed")
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    info = f"deepspeed-{dist.version}.dist-info"
    with zipfile.ZipFile(vendor / f"deepspeed-{dist.version}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{info}/METADATA", dist.read_text("METADATA"))
        whl.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: mcf-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        whl.writestr(f"{info}/RECORD", f"{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return vendor


def test_install_rehearsal_runs_pip_with_cuda_detected_and_no_nvcc(tmp_path):
    """The CPU rehearsal of the install stage runs the vendored pip install as the GPU machine will: DeepSpeed's
    setup would see CUDA (DS_ACCELERATOR=cuda), no nvcc on PATH, no CUDA_HOME, only the vendor folder, and a
    wheel (an sdist's setup.py needs nvidia-ml-py and nvcc there). A shim interpreter records every pip call."""
    vendor = _vendor_with_deepspeed_wheel(tmp_path)
    calls = tmp_path / "pip_calls.txt"
    shim = tmp_path / "bin" / "python"
    shim.parent.mkdir()
    shim.write_text(f'''#!/bin/bash
if [ "$1" = -m ] && [ "$2" = pip ]; then
    {{ echo "call DS_ACCELERATOR=${{DS_ACCELERATOR-}} nvcc=$(command -v nvcc || echo none) CUDA_HOME=${{CUDA_HOME-}}"
      echo "args $*"; }} >> {calls}
    {sys.executable} "$@"; rc=$?; echo "rc $rc" >> {calls}; exit $rc
fi
exec {sys.executable} "$@"
''')
    shim.chmod(0o755)
    nvcc_dir = tmp_path / "cuda" / "bin"  # a toolkit on PATH, as on a developer's machine: the stage must hide it
    nvcc_dir.mkdir(parents=True)
    (nvcc_dir / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    (nvcc_dir / "nvcc").chmod(0o755)
    r = run_script(tmp_path, ALLOW_CPU="1", SIZE="tiny", STAGES="install", VENDOR=str(vendor), PYTHON=str(shim),
                   PATH=f"{nvcc_dir}:{os.environ['PATH']}", CUDA_HOME=str(tmp_path / "cuda"))
    log = (tmp_path / "work" / "install.log").read_text() if (tmp_path / "work" / "install.log").exists() else ""
    assert r.returncode == 0, r.stdout + r.stderr + log
    text = calls.read_text() if calls.exists() else ""
    installs = [line for line in text.splitlines() if line.startswith("args -m pip install")]
    assert installs, f"the install stage ran no pip install\n{log}"
    assert "call DS_ACCELERATOR=cuda nvcc=none CUDA_HOME=\n" in text
    args = installs[0].split()
    assert "--no-index" in args and str(vendor) in args and any(a.endswith("-py3-none-any.whl") for a in args)
    assert "rc 0" in text.splitlines()[text.splitlines().index(installs[0]) + 1]


def test_stage_order_puts_the_main_figures_first(gc):
    assert gc.EXPECTED_STAGES[:5] == ("install", "pretrain", "resume", "bench_step", "profile")
    compile_heavy = ("kernels", "compile", "triton_range", "bench_attention")
    assert min(gc.EXPECTED_STAGES.index(s) for s in compile_heavy) > gc.EXPECTED_STAGES.index("profile")


def test_a_stage_out_of_time_reports_what_it_measured(gc, tmp_path):
    work = tmp_path / "work"
    run = work / "pretrain"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004" / "COMPLETE").write_text("{}")
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 / s, "images_per_s": 100.0 + s}) + "\n" for s in range(1, 7))
    )
    (work / "kernels.log").write_text("..s.F.                                  [ 60%]\n....\n")
    (work / "stages.tsv").write_text(
        "pretrain\ttimeout\t124\t80.0\t80\tran past 80s\nkernels\ttimeout\t124\t85.0\t85\t\n"
    )
    (work / "meta.txt").write_text("stages=pretrain kernels\n")
    gc.summary(work, tmp_path / "s.json")
    rows = {r["name"]: r for r in json.loads((tmp_path / "s.json").read_text())["stages"]}
    assert rows["pretrain"]["partial"] == {"steps_logged": [1, 6], "loss_last": 1 / 6, "images_per_s_median": 105.0,
                                           "complete_checkpoints": [4]}
    assert rows["kernels"]["partial"] == {"passed": 8, "failed": 1, "skipped": 1}


def test_the_json_is_written_after_every_stage_and_the_cache_outlives_work(tmp_path):
    """The call may be cut off (the device tool's limit): gpu_check.json already holds the stages that ran. The
    compile caches live in CACHE, outside WORK, so a second call on the same machine starts warm."""
    cache = tmp_path / "cache"
    (cache / "triton_cache").mkdir(parents=True)
    (cache / "triton_cache" / "kernel.marker").write_text("x")
    e = {k: v for k, v in os.environ.items() if k not in ("OUT", "WORK", "STAGES", "DEADLINE", "LIMITS", "SIZE")}
    e.update(PYTHON=sys.executable, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), CUDA_VISIBLE_DEVICES="",
             ALLOW_CPU="1", STAGES="profile kernels", LIMITS="kernels:120", CACHE=str(cache),
             KERNEL_TESTS="tests/test_kernels_dispatch.py")
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)], cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    log = tmp_path / "out" / "gpu_check.log"
    try:
        deadline = time.monotonic() + 120
        while not (log.is_file() and "== kernels" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "the kernels stage never started"
            time.sleep(0.2)
        time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no exit trap runs
        proc.wait(timeout=30)
    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [s["name"] for s in doc["stages"]] == ["profile"] and doc["not_run"] == ["kernels"]
    assert (cache / "triton_cache" / "kernel.marker").exists()  # WORK was emptied, the cache was not
