"""What one request may cost a server, checked before anything is allocated.

The limits themselves are settings (`ModuleServerSettings`: flags and PATHWAYS_* variables; the
gateway's flags); this module holds the three mechanisms that enforce them:

- `ProgramCap`: distinct compiled shapes per server. Engines pad shapes to power-of-two buckets;
  a shape that would compile a program past the cap is refused (RESOURCE_EXHAUSTED naming
  `max_programs`), so a client sending many shapes cannot fill memory with programs.
- `MemoryBudget`: the process's resident memory (weights, KV cache, programs, everything
  measured from /proc) plus an estimate of what the calls in flight will allocate must stay
  under `memory_budget_mb`; a call that would go over is refused before it runs.
- `StreamSlots`: a server interceptor that keeps handler threads for short calls. Streaming calls
  (a decode stream, a generation, a training step waiting on its neighbours) may hold at most
  `workers - reserve` threads; past that they are refused, so health, reflection and the unary
  calls always find a thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import grpc

from pathways.serving.errors import ServingError


class LimitExceeded(ServingError):
    """A request over one of the server's limits; the message names the limit and its setting."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


def check_count(value: int, limit: int, field: str, setting: str) -> None:
    """INVALID_ARGUMENT when a request's `field` (a count it chose) is over `limit`."""
    from pathways.serving.errors import InvalidArgument

    if value > limit:
        raise InvalidArgument(f"{field} = {value} exceeds the server's {setting} = {limit}")


def call_positions(cfg, length: int) -> int:
    """The positions a call of `length` along its input's second axis costs module `cfg`, as
    max_call_tokens counts them: a kind whose input is not one position per element (audio:
    samples) says how many positions it computes on (`input_positions`: an audio embedding's
    log-mel frames, 100 per second at 16 kHz, not 16,000 samples); otherwise `length`."""
    positions = getattr(cfg, "input_positions", None)
    return positions(length) if callable(positions) else length


def positions_field(cfg, field: str, length: int) -> tuple[int, str]:
    """(`call_positions`, the field's name saying what they were counted from when not
    `length` itself), for messages that must name what was counted."""
    n = call_positions(cfg, length)
    if n == length:
        return n, field
    return n, f"{field} ({length} {cfg.input_contract[0]} values = {n} positions)"


class ProgramCap:
    """At most `limit` distinct program shapes (keys) per server; None: no cap (in-process)."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self._seen: set = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, key) -> None:
        if self.limit is None or key in self._seen:
            return
        with self._lock:
            if key in self._seen:
                return
            if len(self._seen) >= self.limit:
                raise LimitExceeded(
                    f"this server has compiled max_programs = {self.limit} distinct shapes; "
                    f"{_describe(key)} would compile another (send shapes the server already "
                    f"runs, or raise --max-programs / PATHWAYS_MAX_PROGRAMS)"
                )
            self._seen.add(key)


def _describe(key) -> str:
    entry, *shapes = key
    return f"{entry} with shapes {', '.join(str(s) for s in shapes)}"


def resident_bytes() -> int:
    """This process's resident set size (from /proc/self/statm; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def machine_memory() -> int:
    """Memory this process may use: the cgroup's limit where one is set, else physical RAM."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
    return total


class MemoryBudget:
    """Resident memory plus the estimates of calls in flight must stay under `limit` bytes."""

    AUTO_FRACTION = 0.9  # memory_budget_mb = 0: this fraction of machine_memory()

    def __init__(self, limit_mb: float):
        self.auto = limit_mb <= 0
        self.limit = (
            int(machine_memory() * self.AUTO_FRACTION) if self.auto else int(limit_mb * 2**20)
        )
        self._in_flight = 0
        self._lock = threading.Lock()

    def describe(self) -> str:
        how = "auto: 90 % of this machine's memory" if self.auto else "--memory-budget-mb"
        return f"memory_budget_mb = {self.limit / 2**20:.0f} ({how})"

    def check_start(self) -> None:
        """A server whose weights, cache and programs already exceed the budget does not start."""
        rss = resident_bytes()
        if rss > self.limit:
            raise ValueError(
                f"the module server holds {rss / 2**20:.0f} MiB after loading its weights and "
                f"KV cache, over its {self.describe()}"
            )

    @contextmanager
    def reserve(self, nbytes: int, what: str) -> Iterator[None]:
        """Holds `nbytes` (an estimate of what `what` allocates) while the call runs, or raises
        LimitExceeded naming the budget when resident memory plus the calls in flight plus
        `nbytes` would go over it."""
        with self._lock:
            rss = resident_bytes()
            if rss + self._in_flight + nbytes > self.limit:
                raise LimitExceeded(
                    f"{what} needs about {nbytes / 2**20:.1f} MiB; the server holds "
                    f"{rss / 2**20:.0f} MiB and calls in flight {self._in_flight / 2**20:.0f} MiB "
                    f"of its {self.describe()}"
                )
            self._in_flight += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= nbytes


class StreamSlots(grpc.ServerInterceptor):
    """At most `limit` calls of the `streaming` methods (full names) at once; more are refused
    with RESOURCE_EXHAUSTED, so the rest of the server's `workers` threads stay free for health,
    reflection and short calls."""

    def __init__(self, workers: int, reserve: int, streaming: Iterable[str]):
        self.limit = max(1, workers - reserve)
        self.workers, self.reserve = workers, reserve
        self.streaming = frozenset(streaming)
        self.active = 0
        self._lock = threading.Lock()

    def intercept_service(self, continuation, details):
        # Runs on gRPC's polling thread: counting here needs no handler thread.
        if details.method not in self.streaming:
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        with self._lock:
            if self.active >= self.limit:
                return _refused(
                    handler,
                    f"{details.method}: {self.active} streaming calls already hold this "
                    f"server's handler threads (workers = {self.workers}, {self.reserve} kept "
                    f"for health and short calls); retry later or raise --workers",
                )
            self.active += 1
        return _counted(handler, self._release)

    def _release(self) -> None:
        with self._lock:
            self.active -= 1


def _refused(handler, message: str):
    def abort(request_or_iterator, context):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    return _same_shape(handler, abort)


def _same_shape(handler, behavior):
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            behavior, handler.request_deserializer, handler.response_serializer
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            behavior, handler.request_deserializer, handler.response_serializer
        )
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            behavior, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        behavior, handler.request_deserializer, handler.response_serializer
    )


def _counted(handler, release):
    """`handler` with `release` called once when its call ends (returned, failed, cancelled)."""
    inner = (
        handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary
    )

    def once_per_call(context):
        done = threading.Lock()

        def release_once():
            if done.acquire(blocking=False):
                release()

        if not context.add_callback(release_once):  # the call has already ended
            release_once()
        return release_once

    if handler.response_streaming:

        def behavior(request, context):
            release_once = once_per_call(context)
            try:
                yield from inner(request, context)
            finally:
                release_once()

    else:

        def behavior(request, context):
            release_once = once_per_call(context)
            try:
                return inner(request, context)
            finally:
                release_once()

    return _same_shape(handler, behavior)
