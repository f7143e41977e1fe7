"""The training clock leaves out the time a run was stopped (kill -STOP ... kill -CONT), so a
paused run keeps its time budget and LR schedule."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from segany.train.clock import PausingClock

CHILD = """
import time
from segany.train.clock import PausingClock
clock = PausingClock()
t0, c0 = time.monotonic(), clock.now()
print("ready", flush=True)
time.sleep(3.0)
print(time.monotonic() - t0, clock.now() - c0, clock.paused, flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX job control")
def test_a_stopped_process_does_not_count_the_stop():
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        os.kill(p.pid, signal.SIGSTOP)
        time.sleep(2.0)
        os.kill(p.pid, signal.SIGCONT)
        out, _ = p.communicate(timeout=30)
    finally:
        p.kill()
    wall, counted, paused = map(float, out.split())
    assert wall >= 2.9
    assert counted == pytest.approx(wall - 2.0, abs=0.5) and paused == pytest.approx(2.0, abs=0.5)


def test_a_running_process_counts_all_its_time():
    with PausingClock() as clock:
        t0, c0 = time.monotonic(), clock.now()
        x = 0
        while time.monotonic() - t0 < 0.6:  # busy, then asleep
            x += 1
        time.sleep(0.6)
        assert clock.now() - c0 == pytest.approx(time.monotonic() - t0, abs=0.05) and clock.paused == 0.0
