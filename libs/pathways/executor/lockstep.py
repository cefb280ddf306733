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

With an `Entry` (the session's request), the group's requests also travel together: the session
whose arrival completes the group (or whose wait runs out first) takes every posted entry bound
for the same replica and sends them as one message; the others sleep until their results are
handed over. Eight sessions then cost a server one message per step instead of eight (each costs
the server's Python, serialized by the GIL, and the client as much again).
"""

from __future__ import annotations

import threading
import time

_BETWEEN_STEPS = -1  # a session whose last decode call returned: its next stop is chain[0]


class Entry:
    """One session's request at a module, posted so that one session sends the group's requests
    together (see `Lockstep.arrive`); the sender hands each entry its result with `finish`."""

    __slots__ = ("key", "item", "taken", "result", "_done")

    def __init__(self, key, item):
        self.key, self.item = key, item
        self.taken = False
        self.result = None
        self._done = threading.Event()

    def finish(self, result) -> None:
        self.result = result
        self._done.set()

    def wait(self, timeout: float | None) -> bool:
        """Whether the result came within `timeout` seconds."""
        return self._done.wait(timeout)


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
        self._posted: dict[str, list[Entry]] = {}  # module -> entries not yet taken by a sender

    def arrive(
        self, session: str, chain: tuple[str, ...], i: int, entry: Entry | None = None
    ) -> list[Entry] | None:
        """Called before `session` calls chain[i]; returns when the others have caught up.

        With `entry` (this session's request, posted for a group send): returns the entries to
        send together, this session's first, when this session is the one to send them (the last
        of the group to arrive, or the first to stop waiting); [] when another session took this
        entry (its result comes through `entry.wait`). Entries go together only with entries of
        the same `key` (the replica they are for).
        """
        if self.wait_s <= 0:
            return None if entry is None else [entry]
        module = chain[i]
        with self._lock:
            now = time.monotonic()
            before = self._where.get(session)
            self._where[session] = (chain, i, now)
            at = self._at.get(module)
            if at is None:
                at = self._at[module] = threading.Condition(self._lock)
            if entry is not None:
                self._posted.setdefault(module, []).append(entry)
            if before is not None and before[0] != chain:  # its pathway changed: anyone may go
                for other in self._at.values():
                    other.notify_all()
            elif entry is None:
                at.notify_all()
            # With entries nobody is woken here: if someone is still behind this session, they
            # are behind every session waiting here too; if not, this session sends the group
            # (and wakes the others with their results, `hand_over`).
            until = now + self.wait_s
            while self._anyone_behind(session, module):
                if entry is not None and entry.taken:
                    return []
                left = until - time.monotonic()
                if left <= 0:
                    break
                at.wait(left)
            if entry is None:
                return None
            if entry.taken:
                return []
            posted = self._posted[module]
            group = [entry] + [e for e in posted if e.key == entry.key and e is not entry]
            rest = [e for e in posted if e.key != entry.key]
            for e in group:
                e.taken = True
            if rest:
                self._posted[module] = rest
                at.notify_all()  # sessions bound for other replicas: their group can go too
            else:
                del self._posted[module]
            return group

    def hand_over(self, module: str, results: list[tuple[Entry, object]]) -> None:
        """The sender of a group at `module` hands each entry its result and wakes its session
        (asleep at the module until now)."""
        with self._lock:
            for entry, result in results:
                entry.finish(result)
            at = self._at.get(module)
            if at is not None:
                at.notify_all()

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
