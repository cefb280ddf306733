"""A server's main thread waiting for SIGTERM or SIGINT."""

from __future__ import annotations

import signal
import threading


def on_stop() -> threading.Event:
    """An event set by the next SIGTERM or SIGINT (handlers installed now, in the main thread:
    install them before starting, so a signal during start-up is not lost)."""
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    return done


def wait(done: threading.Event, poll_s: float = 0.5) -> None:
    """Returns once `done` is set, waiting in slices of `poll_s`. A wait without a timeout can
    miss the signal for good: when the kernel hands it to another thread (gRPC's, XLA's), the
    main thread stays blocked and Python never runs the handler (a gateway ignored SIGTERM about
    one time in eight that way)."""
    while not done.wait(poll_s):
        pass
