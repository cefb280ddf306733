"""Session table: per-session rows (KV-cache slots), sampling settings, TTL and a capacity cap."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid

import numpy as np

from pathways.sampling import SamplingBatch
from pathways.serving.errors import Exhausted, NotFound


@dataclasses.dataclass
class ServerSession:
    id: str
    slots: np.ndarray  # (B,) int32 rows of the KV-cache pool (or of the row budget)
    max_seq_len: int
    sampling: SamplingBatch | None
    last_used: float
    inflight: int = 0
    closed: bool = False

    @property
    def batch_size(self) -> int:
        return len(self.slots)


class SessionTable:
    """Hands out rows from a fixed pool; sessions idle longer than `ttl_s` are reclaimed.

    A session being worked on (`inflight` > 0) is never reclaimed; closing it then frees its rows
    when the work finishes, so no slot is reused while a step still writes to it.
    """

    def __init__(self, capacity: int, ttl_s: float, clock=time.monotonic):
        self.capacity, self.ttl_s, self._clock = capacity, ttl_s, clock
        self._free = list(range(capacity - 1, -1, -1))
        self._sessions: dict[str, ServerSession] = {}
        self._lock = threading.Lock()

    def open(
        self, batch_size: int, max_seq_len: int, sampling: SamplingBatch | None
    ) -> ServerSession:
        with self._lock:
            if batch_size > len(self._free):
                self._expire_locked()
            if batch_size > len(self._free):
                raise Exhausted(
                    f"no room for {batch_size} more sequence(s): {len(self._free)} of "
                    f"{self.capacity} free",
                    retry_after_s=min(self.ttl_s, 1.0),
                )
            slots = np.array([self._free.pop() for _ in range(batch_size)], np.int32)
            s = ServerSession(uuid.uuid4().hex, slots, max_seq_len, sampling, self._clock())
            self._sessions[s.id] = s
            return s

    def acquire(self, session_id: str) -> ServerSession:
        """Looks a session up for a step and marks it busy (pair with `release`)."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None or s.closed:
                raise NotFound(
                    f"unknown session_id {session_id!r} (closed, expired or never opened)"
                )
            s.inflight += 1
            s.last_used = self._clock()
            return s

    def release(self, s: ServerSession) -> None:
        with self._lock:
            s.inflight -= 1
            s.last_used = self._clock()
            if s.closed and s.inflight == 0:
                self._free_locked(s)

    def close(self, session_id: str) -> bool:
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None or s.closed:
                return False
            s.closed = True
            if s.inflight == 0:
                self._free_locked(s)
            return True

    def expire(self) -> int:
        with self._lock:
            return self._expire_locked()

    def _expire_locked(self) -> int:
        cutoff = self._clock() - self.ttl_s
        stale = [
            s
            for s in self._sessions.values()
            if not s.closed and s.inflight == 0 and s.last_used < cutoff
        ]
        for s in stale:
            s.closed = True
            self._free_locked(s)
        return len(stale)

    def _free_locked(self, s: ServerSession) -> None:
        if self._sessions.pop(s.id, None) is not None:
            self._free.extend(int(x) for x in s.slots[::-1])

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)

    def __len__(self) -> int:
        return len(self._sessions)
