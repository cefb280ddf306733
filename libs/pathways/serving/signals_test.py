"""A server's main thread stops on SIGTERM also when the signal lands on another thread."""

from __future__ import annotations

import subprocess
import sys
import time

from pathways.deploy.launcher import child_env

# The SIGTERM is raised in a second thread (as when the kernel picks one of gRPC's or XLA's):
# Python's handler must still run in the main thread, which is waiting for it.
PROGRAM = """
import signal, threading, time
from pathways.serving import signals

done = signals.on_stop()

def kill_from_here():
    time.sleep(0.3)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

threading.Thread(target=kill_from_here).start()
{wait}
print("stopped", flush=True)
"""


def _run(wait: str, timeout: float) -> tuple[str, float]:
    t0 = time.monotonic()
    try:
        out = subprocess.run(
            [sys.executable, "-c", PROGRAM.format(wait=wait)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(),
        ).stdout
    except subprocess.TimeoutExpired:
        out = "hung"
    return out.strip(), time.monotonic() - t0


def test_a_sigterm_another_thread_receives_stops_the_wait():
    out, took = _run("signals.wait(done)", 20)
    assert out == "stopped" and took < 10


def test_a_wait_without_a_timeout_misses_it():
    # Why signals.wait polls: the plain wait never wakes (the failure this test guards).
    out, _ = _run("done.wait()", 4)
    assert out == "hung"
