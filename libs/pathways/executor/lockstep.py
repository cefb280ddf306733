"""Lines up concurrent sessions' decode steps module by module (gang scheduling at the client).

A module server batches the decode steps that reach it within its batch wait. Sessions driven by
one client drift apart by a few milliseconds per hop (responses are encoded and decoded one
thread at a time), and after a few tokens they reach each server at different moments and run in
batches of 1-3 rows. Reading weights dominates a decode step, so a batch of 8 rows costs only
~1.4x one row (GPT-2 small, measured): small batches waste most of the machine.

`Lockstep.arrive(session, chain, i)` holds a session before it calls `chain[i]` until no other
live session is still on its way to that module (behind it in its own chain, or between two
decode calls), or until `wait_s` has passed, so the group's requests leave together and the
server batches them. Sessions idle for longer than `idle_s` (their caller is busy elsewhere) are
not waited for; every wait is bounded, so a stalled session costs the others at most `wait_s` per
module.
"""

from __future__ import annotations

import threading
import time

_BETWEEN_STEPS = -1  # a session whose last decode call returned: its next stop is chain[0]


class Lockstep:
    def __init__(self, wait_s: float = 0.003, idle_s: float = 0.05):
        if wait_s < 0 or idle_s < 0:
            raise ValueError(f"wait_s and idle_s must be >= 0; got {wait_s!r}, {idle_s!r}")
        self.wait_s, self.idle_s = wait_s, idle_s
        self._lock = threading.Lock()
        # One condition per module, all on _lock: a session reaching a module can release only
        # the sessions waiting at that module (it moves one module at a time), so only they are
        # woken; with 8 sessions one shared condition woke every waiter on every move.
        self._at: dict[str, threading.Condition] = {}
        # session id -> (its chain, index of the module it is at or calling, when it got there)
        self._where: dict[str, tuple[tuple[str, ...], int, float]] = {}

    def arrive(self, session: str, chain: tuple[str, ...], i: int) -> None:
        """Called before `session` calls chain[i]; returns when the others have caught up."""
        if self.wait_s <= 0:
            return
        module = chain[i]
        with self._lock:
            now = time.monotonic()
            before = self._where.get(session)
            self._where[session] = (chain, i, now)
            at = self._at.get(module)
            if at is None:
                at = self._at[module] = threading.Condition(self._lock)
            if before is not None and before[0] != chain:  # its pathway changed: anyone may go
                for other in self._at.values():
                    other.notify_all()
            else:
                at.notify_all()
            until = now + self.wait_s
            while self._anyone_behind(session, module):
                left = until - time.monotonic()
                if left <= 0:
                    return
                at.wait(left)

    def done(self, session: str, chain: tuple[str, ...]) -> None:
        """`session`'s decode call returned (its next step starts at chain[0])."""
        if self.wait_s <= 0:
            return
        with self._lock:
            # Between steps it is behind every module of its chain: it releases nobody.
            self._where[session] = (chain, _BETWEEN_STEPS, time.monotonic())

    def leave(self, session: str) -> None:
        """`session` is closed or prefilling: nobody waits for it."""
        with self._lock:
            if self._where.pop(session, None) is not None:
                for at in self._at.values():
                    at.notify_all()

    def _anyone_behind(self, session: str, module: str) -> bool:
        now = time.monotonic()
        for other, (chain, at, since) in self._where.items():
            if other == session or module not in chain or now - since > self.idle_s:
                continue
            if at < chain.index(module):
                return True
        return False
