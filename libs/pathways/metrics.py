"""Prometheus exposition of the OpenTelemetry metrics: one registry, OTel's.

Every process records through OTel instruments (`telemetry.ModuleMetrics`, `GatewayMetrics`,
`HttpMetrics` below). `telemetry.init(..., prometheus=True)` adds `reader()` to the process's
MeterProvider beside any OTLP exporter; a scrape collects it and writes Prometheus' text format
with prometheus_client (`render`, or `serve` on a side port for gRPC servers). Names: dots become
underscores, the unit a suffix (`s` -> `_seconds`, `ms` -> `_milliseconds`, `By` -> `_bytes`),
counters end in `_total`.
"""

from __future__ import annotations

import math
import re
import threading
import time

from opentelemetry import metrics
from opentelemetry.sdk.metrics.export import Gauge, Histogram, MetricReader, Sum
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_UNITS = {"s": "_seconds", "ms": "_milliseconds", "By": "_bytes"}
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
HOP_MS = (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class PrometheusReader(MetricReader):
    """A pull reader: `families()` collects the MeterProvider's data at scrape time."""

    def __init__(self):
        super().__init__()
        self._data = None
        self._lock = threading.Lock()

    def _receive_metrics(self, metrics_data, timeout_millis: float = 10_000, **kwargs) -> None:
        self._data = metrics_data

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        pass

    def families(self) -> list[Metric]:
        with self._lock:
            self._data = None
            try:
                self.collect()
            except Exception:  # no MeterProvider registered this reader yet: nothing to show
                return []
            data = self._data
        out: dict[str, Metric] = {}
        for rm in data.resource_metrics if data is not None else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    _convert(m, out)
        return list(out.values())


def _name(name: str, unit: str) -> str:
    base = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    suffix = _UNITS.get(unit, "")
    return base if base.endswith(suffix) else base + suffix


def _labels(attrs) -> dict[str, str]:
    return {re.sub(r"[^a-zA-Z0-9_]", "_", str(k)): str(v) for k, v in (attrs or {}).items()}


def _convert(m, out: dict[str, Metric]) -> None:
    name, data = _name(m.name, m.unit), m.data
    if isinstance(data, Histogram):
        fam = out.setdefault(name, Metric(name, m.description or m.name, "histogram"))
        for p in data.data_points:
            labels, cum = _labels(p.attributes), 0
            for bound, count in zip(p.explicit_bounds, p.bucket_counts):
                cum += count
                fam.add_sample(f"{name}_bucket", {**labels, "le": _float(bound)}, cum)
            fam.add_sample(f"{name}_bucket", {**labels, "le": "+Inf"}, p.count)
            fam.add_sample(f"{name}_count", labels, p.count)
            fam.add_sample(f"{name}_sum", labels, p.sum)
    elif isinstance(data, Sum) and data.is_monotonic:
        base = name[: -len("_total")] if name.endswith("_total") else name
        fam = out.setdefault(base, Metric(base, m.description or m.name, "counter"))
        for p in data.data_points:
            fam.add_sample(f"{base}_total", _labels(p.attributes), p.value)
    elif isinstance(data, Sum | Gauge):
        fam = out.setdefault(name, Metric(name, m.description or m.name, "gauge"))
        for p in data.data_points:
            fam.add_sample(name, _labels(p.attributes), p.value)


def _float(x: float) -> str:
    return "+Inf" if math.isinf(x) else repr(float(x))


class _Collector:
    def __init__(self, reader: PrometheusReader):
        self.reader = reader

    def collect(self):
        return self.reader.families()


_reader: PrometheusReader | None = None
_registry: CollectorRegistry | None = None
_lock = threading.Lock()


def reader() -> PrometheusReader:
    """This process's Prometheus reader (give it to the MeterProvider: `telemetry.init`)."""
    global _reader, _registry
    with _lock:
        if _reader is None:
            _reader = PrometheusReader()
            _registry = CollectorRegistry(auto_describe=False)
            _registry.register(_Collector(_reader))
        return _reader


def render() -> bytes:
    """The process's metrics in Prometheus' text format."""
    reader()
    return generate_latest(_registry)


def serve(host: str, port: int):
    """Serves GET /metrics on `host:port` (a side port of a gRPC server) on its own thread;
    returns the server (`.server_port`, `.shutdown()`)."""
    from prometheus_client import start_http_server

    reader()
    server, _ = start_http_server(port, host, _registry)
    return server


class GatewayMetrics:
    """The gateway's generations: count by pathway and status, time to first token, tokens/s,
    streams in flight."""

    def __init__(self):
        meter = metrics.get_meter("pathways.gateway")
        self.requests = meter.create_counter(
            "pathways.gateway.generations", description="Generate calls by pathway and status"
        )
        self.ttft = meter.create_histogram(
            "pathways.gateway.time_to_first_token",
            unit="s",
            description="Generate: call start to the first token",
            explicit_bucket_boundaries_advisory=SECONDS,
        )
        self.duration = meter.create_histogram(
            "pathways.gateway.generation.duration",
            unit="s",
            description="Generate: call start to its last message",
            explicit_bucket_boundaries_advisory=SECONDS,
        )
        self.rate = meter.create_histogram(
            "pathways.gateway.tokens_per_second",
            description="Generate: decode tokens per second after the first token",
            explicit_bucket_boundaries_advisory=RATES,
        )
        self.tokens = meter.create_counter(
            "pathways.gateway.generated_tokens", description="tokens generated, by pathway"
        )
        self.active = meter.create_up_down_counter(
            "pathways.gateway.active_generations", description="Generate streams in flight"
        )
        self.hops = meter.create_histogram(
            "pathways.gateway.hop.latency",
            unit="ms",
            description="a session step's call to one hop (a module, or modules one server "
            "hosts) as the gateway sees it: network, the server's queue and step, and a decode "
            "step's wait for the sessions it is batched with; by hop and method",
            explicit_bucket_boundaries_advisory=HOP_MS,
        )
        self.moves = meter.create_counter(
            "pathways.gateway.session_moves",
            description="module sessions moved to another replica by replay, by hop and the "
            "status that moved them (UNAVAILABLE, CANCELLED: the replica went away; NOT_FOUND: "
            "it forgot the session)",
        )

    def move(self, hop: str, code: str) -> None:
        """Counts a session moved off a replica of `hop` (RemoteExecutor.on_move)."""
        self.moves.add(1, {"hop": hop, "code": code})

    def hop(self, hop: str, method: str, seconds: float) -> None:
        """Records one call to `hop` (RemoteExecutor.on_hop)."""
        self.hops.record(seconds * 1e3, {"hop": hop, "method": method})

    def generation(self, pathway: str) -> _Generation:
        return _Generation(self, pathway)


class _Generation:
    """One stream's record: `token()` per token, `status`, then `finish()` (once)."""

    def __init__(self, m: GatewayMetrics, pathway: str):
        self.m, self.attrs = m, {"pathway": pathway}
        self.t0, self.first, self.n = time.perf_counter(), None, 0
        self.status = "CANCELLED"  # until the stream ends normally or with an error
        m.active.add(1, self.attrs)

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.m.ttft.record(self.first - self.t0, self.attrs)
        self.n += 1

    def finish(self) -> None:
        end = time.perf_counter()
        self.m.active.add(-1, self.attrs)
        self.m.requests.add(1, {**self.attrs, "code": self.status})
        self.m.duration.record(end - self.t0, {**self.attrs, "code": self.status})
        if self.n:
            self.m.tokens.add(self.n, self.attrs)
        if self.first is not None and self.n > 1 and end > self.first:
            self.m.rate.record((self.n - 1) / (end - self.first), self.attrs)


class HttpMetrics:
    """The HTTP front's completions: time to first token, tokens/s, tokens, streams in flight.
    (Requests by route and status and their latency are FastAPI's own OTel HTTP metrics.)"""

    def __init__(self):
        meter = metrics.get_meter("pathways.http")
        self.ttft = meter.create_histogram(
            "pathways.http.time_to_first_token",
            unit="s",
            description="completions: arrival to the first token sent",
            explicit_bucket_boundaries_advisory=SECONDS,
        )
        self.rate = meter.create_histogram(
            "pathways.http.tokens_per_second",
            description="completions: tokens per second after the first",
            explicit_bucket_boundaries_advisory=RATES,
        )
        self.tokens = meter.create_counter(
            "pathways.http.completion_tokens", description="tokens sent, by model"
        )
        self.active = meter.create_up_down_counter(
            "pathways.http.active_streams", description="completions in flight"
        )

    def start(self, model: str) -> _HttpGeneration:
        """One completion's recorder: `token()` per token sent, then `finish()`."""
        return _HttpGeneration(self, model)


class _HttpGeneration:
    def __init__(self, m: HttpMetrics, model: str):
        self.m, self.attrs = m, {"model": model}
        self.t0, self.first, self.n, self.done = time.perf_counter(), None, 0, False
        m.active.add(1, self.attrs)

    def token(self, count: int = 1) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.m.ttft.record(self.first - self.t0, self.attrs)
        self.n += count

    def finish(self) -> None:
        if self.done:
            return
        self.done, end = True, time.perf_counter()
        self.m.active.add(-1, self.attrs)
        if self.n:
            self.m.tokens.add(self.n, self.attrs)
        if self.first is not None and self.n > 1 and end > self.first:
            self.m.rate.record((self.n - 1) / (end - self.first), self.attrs)
