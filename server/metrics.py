"""Prometheus metrics: engine counters read at scrape time, latencies measured from streams.

Each app gets its own `CollectorRegistry` (two apps in one process, as in tests, never share
or collide). Engine-side numbers (queue lengths, KV pool, prefix-cache tokens, preemptions)
are not mirrored into counters we would have to keep in sync: a custom collector reads
`engine.stats()` when Prometheus scrapes. Latencies exist only in the server, which sees
each delta arrive: time to first token, inter-token latency and end-to-end latency.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

logger = logging.getLogger(__name__)

PREFIX = "radixserve"

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)

# (metric suffix, EngineStats attribute, help). Gauges are levels, counters only grow.
_ENGINE_GAUGES = (
    ("num_requests_running", "running", "Requests being computed (prefill or decode)."),
    ("num_requests_waiting", "waiting", "Requests queued, not yet admitted."),
    ("kv_cache_usage_ratio", "kv_usage", "Fraction of KV pages in use (neither free nor evictable)."),
    ("kv_pages_total", "total_pages", "KV pages in the pool."),
    ("kv_pages_free", "free_pages", "KV pages not holding any tokens."),
    ("kv_pages_cached", "cached_pages", "KV pages held by the prefix cache."),
    ("kv_pages_evictable", "evictable_pages", "Cached KV pages no running request uses."),
    ("kv_pages_locked", "locked_pages", "Cached KV pages in use by running requests."),
    ("kv_pages_private", "private_pages", "KV pages private to running requests."),
)
_ENGINE_COUNTERS = (
    ("prefix_cache_queried_tokens", "queried_tokens", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hit_tokens", "cached_tokens", "Prompt tokens served from the prefix cache."),
    ("prompt_tokens", "prompt_tokens", "Prompt tokens of admitted requests."),
    ("generation_tokens", "generation_tokens", "Tokens generated."),
    ("num_preemptions", "preemptions", "Running requests preempted for lack of KV pages."),
    ("engine_finished_requests", "finished", "Continuations the engine finished."),
    ("engine_steps", "steps", "Engine loop steps that ran the model."),
)


class EngineStatsCollector(Collector):
    """Reads `engine.stats()` at scrape time. A missing attribute is skipped, not an error, so
    the scrape keeps working if the engine's stats change shape."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._engine.stats()
            healthy = bool(self._engine.healthy())
        except Exception:  # noqa: BLE001 - a scrape must not fail because the engine did
            logger.exception("engine.stats() failed during a metrics scrape")
            return
        yield GaugeMetricFamily(f"{PREFIX}_engine_healthy", "1 when the engine loop is alive and not stuck.", value=float(healthy))
        for suffix, attr, help_text in _ENGINE_GAUGES:
            value = getattr(stats, attr, None)
            if value is not None:
                yield GaugeMetricFamily(f"{PREFIX}_{suffix}", help_text, value=float(value))
        for suffix, attr, help_text in _ENGINE_COUNTERS:
            value = getattr(stats, attr, None)
            if value is not None:
                yield CounterMetricFamily(f"{PREFIX}_{suffix}", help_text, value=float(value))


class ServerMetrics:
    """The app's registry and the latency metrics the server measures itself."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(EngineStatsCollector(engine))
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From request arrival to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between consecutive tokens of one continuation (per token).",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "From request arrival to its last token, for requests that ran to the end.",
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            f"{PREFIX}_request_finished",
            "Continuations finished, by finish reason (abort includes client disconnects).",
            ["finish_reason"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StreamTiming:
    """Latency bookkeeping of one HTTP request's continuations (all on the event loop).

    arrival ──ttft──▶ first token ──itl──▶ next token ... ──▶ last token
    └──────────────────────────── e2e ─────────────────────────────┘
    """

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self._metrics = metrics
        self._arrival = arrival
        self._first_seen = False
        self._last: dict[tuple[int, int], float] = {}

    def on_tokens(self, key: tuple[int, int], num_tokens: int, now: float) -> None:
        if num_tokens <= 0:
            return
        if not self._first_seen:
            self._first_seen = True
            self._metrics.ttft.observe(now - self._arrival)
        last = self._last.get(key)
        if last is not None:
            self._metrics.itl.observe((now - last) / num_tokens)
        self._last[key] = now

    def on_finish(self, finish_reason: str) -> None:
        self._metrics.finished.labels(finish_reason=finish_reason).inc()

    def on_complete(self, now: float) -> None:
        self._metrics.e2e.observe(now - self._arrival)


async def metrics_endpoint(request: Request) -> Response:
    metrics: ServerMetrics = request.app.state.server.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
