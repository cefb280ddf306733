"""The gateway's running episodes: pathways that act hold each episode as a session on the
module servers (`robotics.policy.Policy` over the gateway's RemoteExecutor), named by an
unguessable id, closed when the caller ends it or after `ttl_s` without a step."""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time

import numpy as np

from pathways.infer import InferError
from pathways.robotics.policy import Policy

DEFAULT_TTL_S = 300.0
DEFAULT_CAPACITY = 1024


class UnknownEpisode(InferError):
    status = "NOT_FOUND"


class TooManyEpisodes(InferError):
    status = "RESOURCE_EXHAUSTED"


@dataclasses.dataclass
class _Episode:
    policy: Policy
    last_used: float
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class Episodes:
    """Episodes by id. `start` opens one, `step` runs one observation through it (its steps
    run one at a time), `end` closes it; every call first closes the episodes idle longer than
    `ttl_s` (their ids then answer NOT_FOUND)."""

    def __init__(
        self,
        executor,
        ttl_s: float = DEFAULT_TTL_S,
        capacity: int = DEFAULT_CAPACITY,
        clock=time.monotonic,
    ):
        if ttl_s <= 0 or capacity < 1:
            raise ValueError(f"ttl_s must be > 0 and capacity >= 1; got {ttl_s}, {capacity}")
        self.executor, self.ttl_s, self.capacity, self._clock = executor, ttl_s, capacity, clock
        self._episodes: dict[str, _Episode] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._episodes)

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl_s
        with self._lock:
            old = [k for k, e in self._episodes.items() if e.last_used < cutoff]
            gone = [self._episodes.pop(k) for k in old]
        for e in gone:
            with e.lock:
                e.policy.close()

    def start(self, pathway: str) -> str:
        """A new episode on `pathway` (a pathway that acts); its id."""
        self._expire()
        policy = Policy(self.executor, pathway)  # ValueError: not observations -> actions
        with self._lock:
            if len(self._episodes) >= self.capacity:
                raise TooManyEpisodes(
                    f"start_session: {len(self._episodes)} episodes are running, the gateway's "
                    f"most ({self.capacity}); end some or wait {self.ttl_s:g} s for idle ones "
                    "to expire"
                )
            key = "ep-" + secrets.token_hex(12)
            self._episodes[key] = _Episode(policy, self._clock())
        return key

    def pathway(self, key: str) -> str:
        return self._get(key).policy.pathway

    def _get(self, key: str) -> _Episode:
        e = self._episodes.get(key)
        if e is None:
            raise UnknownEpisode(
                f"session_id: unknown episode {key!r} (ended, or idle longer than the "
                f"gateway's session TTL of {self.ttl_s:g} s)"
            )
        return e

    def step(self, key: str, obs: np.ndarray) -> tuple[np.ndarray, bool, int]:
        """One observation (obs_dim,) float32 through the episode: (the head's outputs (A,),
        whether they are discrete scores, the episode's steps so far)."""
        self._expire()
        e = self._get(key)
        with e.lock:
            if self._episodes.get(key) is not e:  # ended or expired while this step waited
                raise UnknownEpisode(f"session_id: episode {key!r} ended")
            e.last_used = self._clock()
            try:
                out = e.policy.outputs(obs)
            finally:
                e.last_used = self._clock()
            return out, e.policy.discrete, e.policy.steps

    def end(self, key: str) -> bool:
        """Closes the episode (False when it was unknown)."""
        with self._lock:
            e = self._episodes.pop(key, None)
        if e is None:
            return False
        with e.lock:
            e.policy.close()
        return True

    def close(self) -> None:
        """Ends every episode (the gateway stopping)."""
        for key in list(self._episodes):
            self.end(key)
