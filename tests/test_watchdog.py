"""The step watchdog and the bounded stop (issue 22 item 6, issue 23 item 2): a stalled step ends the rank
with STALL_EXIT_CODE, the phase that stalled and a stack dump; SIGTERM ends a run within
``train.stop_grace_s`` even when no step boundary comes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from train_helpers import ROOT, command, env, kill_tree, pretrain_args

from mcf.train.signals import REQUEUE_EXIT_CODE, StopRequest
from mcf.train.watchdog import SLOW_FIRST_STEPS, STALL_EXIT_CODE, StepWatchdog


class Exits:
    """Stands in for os._exit: records the code and wakes the test."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.event = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.event.set()


def test_a_stalled_phase_ends_the_rank_with_the_stall_code_and_names_it(caplog):
    exits = Exits()
    dog = StepWatchdog(rank=3, timeout_s=0.3, slow_s=0.3, exit=exits, poll_s=0.02).start()
    try:
        with caplog.at_level(logging.ERROR, logger="mcf.train.watchdog"):
            for step in range(1, 8):  # steps that end in time: no exit
                dog.step(step)
                dog.phase("forward/backward")
                time.sleep(0.05)
            assert exits.codes == []
            dog.step(8)
            dog.phase("data")
            assert exits.event.wait(5)
    finally:
        dog.close()
    assert exits.codes == [STALL_EXIT_CODE]
    assert "rank 3: step 8 stalled in phase 'data'" in caplog.text


def test_first_steps_and_slow_phases_get_the_slow_deadline():
    exits = Exits()
    dog = StepWatchdog(rank=0, timeout_s=0.2, slow_s=30, exit=exits, poll_s=0.02).start()
    try:
        for step in range(1, SLOW_FIRST_STEPS + 1):
            dog.step(step)
            time.sleep(0.4)  # longer than timeout_s: the first steps are slow
        dog.step(SLOW_FIRST_STEPS + 1)
        with dog.slow("checkpoint"):
            time.sleep(0.4)
        assert exits.codes == []
        assert exits.event.wait(5)  # the step deadline restarts after the slow phase
    finally:
        dog.close()
    assert exits.codes == [STALL_EXIT_CODE]


def test_a_stop_signal_without_a_boundary_exits_with_the_requeue_code_after_the_grace():
    exits = Exits()
    stop = StopRequest().install()
    dog = StepWatchdog(rank=0, timeout_s=0, slow_s=0, grace_s=0.5, stop=stop, exit=exits, poll_s=0.02).start()
    try:
        dog.step(1)
        t0 = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        assert exits.event.wait(5)
        assert 0.4 <= time.monotonic() - t0 < 3
    finally:
        dog.close()
        stop.restore()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
    assert exits.codes == [REQUEUE_EXIT_CODE]


def test_a_boundary_within_the_grace_cancels_it():
    exits = Exits()
    stop = StopRequest().install()
    dog = StepWatchdog(rank=0, timeout_s=0, slow_s=0, grace_s=0.3, stop=stop, exit=exits, poll_s=0.02).start()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        dog.stopping()  # every rank reached the boundary: the checkpoint may take longer than the grace
        time.sleep(0.6)
    finally:
        dog.close()
        stop.restore()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
    assert exits.codes == [] and stop.requested


def _start_stalling(tmp_path: Path, stall_at: int, *sets: str) -> tuple[subprocess.Popen, Path, Path]:
    args = pretrain_args(tmp_path / "run", 20, "--checkpoint-every", "1000", *sum((["--set", s] for s in sets), []))
    mark, log = tmp_path / "stalled", tmp_path / "run.log"
    cmd = [sys.executable, str(ROOT / "tests" / "stall_in_loader.py"), *command(args)[3:]]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(MCF_STALL_AT=str(stall_at), MCF_STALL_MARK=str(mark)), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, mark, log


def _wait(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"still running after {timeout} s\n{log.read_text()[-3000:]}") from None


def test_a_run_whose_loader_stalls_ends_with_the_watchdog_code_and_a_stack_dump(tmp_path):
    proc, mark, log = _start_stalling(tmp_path, SLOW_FIRST_STEPS + 1, "train.step_timeout_s=3",
                                      "train.step_timeout_slow_s=300")
    rc = _wait(proc, 240, log)
    text = log.read_text()
    assert mark.exists(), text[-3000:]
    assert rc == STALL_EXIT_CODE, text[-3000:]
    assert f"rank 0: step {SLOW_FIRST_STEPS + 2} stalled in phase 'data'" in text, text[-3000:]
    assert "stall_in_data_path" in text  # faulthandler's dump shows where the main thread is blocked


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_sigterm_during_a_stalled_step_ends_the_run_within_the_grace(tmp_path, sig):
    grace = 4
    proc, mark, log = _start_stalling(tmp_path, 1, "train.step_timeout_s=0", f"train.stop_grace_s={grace}")
    deadline = time.monotonic() + 240
    while not mark.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_tree(proc)
            raise AssertionError(f"the run never reached the stall (rc {proc.returncode})\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    t0 = time.monotonic()
    proc.send_signal(sig)
    rc = _wait(proc, grace + 30, log)
    took = time.monotonic() - t0
    text = log.read_text()
    assert rc == REQUEUE_EXIT_CODE, text[-3000:]
    assert grace - 0.5 <= took <= grace + 10, (took, text[-3000:])
    assert f"no step boundary within train.stop_grace_s={grace} s" in text, text[-3000:]
