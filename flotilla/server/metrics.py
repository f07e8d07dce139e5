"""Prometheus metrics of one app: token counters, latency histograms, and engine gauges read at scrape time.

Each app has a registry of its own, so several apps in one process (the tests) never collide in the global one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from flotilla.server.engine_client import Delta, EngineClient

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """Prometheus metrics in a registry of this app's own, so several apps (tests) never collide in the global
    one. Engine gauges are read from ``engine.stats()`` at scrape time rather than pushed."""

    def __init__(self, get_engine: Callable[[], EngineClient | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("flotilla_prompt_tokens", "Prompt tokens of accepted requests.", registry=r)
        self.generation_tokens = Counter("flotilla_generation_tokens", "Tokens generated and streamed.",
                                         registry=r)
        self.cached_tokens = Counter("flotilla_prefix_cache_hit_tokens",
                                     "Prompt tokens of finished requests served from the prefix cache.", registry=r)
        self.requests = Counter("flotilla_requests", "Finished requests by finish reason.", ["finish_reason"],
                                registry=r)
        self.ttft = Histogram("flotilla_time_to_first_token_seconds", "From submission to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("flotilla_inter_token_latency_seconds",
                             "Gap between streamed tokens (a gap carrying k tokens counts k times gap/k).",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("flotilla_e2e_request_latency_seconds", "From submission to the last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.finished_prompt = Counter("flotilla_finished_prompt_tokens", "Prompt tokens of finished requests.",
                                       registry=r)
        self.finished_prompt_tokens = 0
        self.finished_cached_tokens = 0
        self.engine_collector = _EngineCollector(get_engine, self)
        r.register(self.engine_collector)

    def record_finish(self, result: dict[str, Any], elapsed: float) -> None:
        self.requests.labels(result.get("finish_reason") or "stop").inc()
        self.e2e.observe(elapsed)
        cached = int(result.get("cached_tokens") or 0)
        self.cached_tokens.inc(cached)
        self.finished_cached_tokens += cached
        prompt = int(result.get("prompt_tokens") or 0)
        self.finished_prompt.inc(prompt)
        self.finished_prompt_tokens += prompt

    def hit_rate(self) -> float:
        return self.finished_cached_tokens / self.finished_prompt_tokens if self.finished_prompt_tokens else 0.0


class _EngineCollector:
    """Gauges refreshed from ``engine.stats()`` on every scrape (a custom collector, so nothing goes stale)."""

    _PER_REPLICA = (("running", "Requests running in the replica."),
                    ("waiting", "Requests queued in the replica."),
                    ("kv_used", "KV cache blocks (or tokens) in use in the replica."),
                    ("cached_tokens", "Tokens held by the replica's prefix cache."),
                    ("alive", "1 while the replica's workers are alive."))

    def __init__(self, get_engine: Callable[[], EngineClient | None], metrics: ServerMetrics):
        self._get_engine, self._metrics = get_engine, metrics

    def collect(self, hit_rate: float | None = None) -> Iterable[GaugeMetricFamily]:
        engine = self._get_engine()
        stats = safe_stats(engine) if engine is not None else None
        families = {k: GaugeMetricFamily(f"flotilla_replica_{k}", doc, labels=["replica"])
                    for k, doc in self._PER_REPLICA}
        for rep in (stats or {}).get("replicas", []):
            for key, fam in families.items():
                fam.add_metric([str(rep.get("id"))], float(rep.get(key) or 0))
        yield from families.values()
        yield GaugeMetricFamily("flotilla_num_requests_inflight", "Requests in flight in the engine.",
                                value=float((stats or {}).get("num_requests_inflight", 0)))
        yield GaugeMetricFamily("flotilla_engine_ready", "1 once the engine is loaded.",
                                value=1.0 if engine is not None else 0.0)
        yield GaugeMetricFamily("flotilla_prefix_cache_hit_rate",
                                "Cached / prompt tokens over finished requests since start.",
                                value=self._metrics.hit_rate() if hit_rate is None else hit_rate)


def safe_stats(engine: EngineClient) -> Mapping[str, Any] | None:
    try:
        return engine.stats()
    except Exception:  # an engine that is shutting down must not break /health or /metrics
        log.exception("engine.stats() failed")
        return None


class RequestTimer:
    """Latency bookkeeping for one engine request."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.t0 = time.monotonic()
        self.last: float | None = None
        self.done = False

    def on_delta(self, delta: Delta) -> None:
        now = time.monotonic()
        k = len(delta.get("token_ids") or ())
        if k:
            self.metrics.generation_tokens.inc(k)
            if self.last is None:
                self.metrics.ttft.observe(now - self.t0)
            else:
                for _ in range(k):
                    self.metrics.itl.observe((now - self.last) / k)
            self.last = now
        if delta.get("finished") and not self.done:
            self.done = True
            self.metrics.record_finish(delta.get("result") or {"finish_reason": delta.get("finish_reason")},
                                       now - self.t0)

    def on_end(self, reason: str) -> None:
        """The request ended without a final delta: the client left ("abort") or it failed ("error")."""
        if not self.done:
            self.done = True
            self.metrics.requests.labels(reason).inc()


def render(metrics: ServerMetrics) -> tuple[bytes, str]:
    """The registry in Prometheus' text format, and its content type. In an HTTP process of several
    (``--api-server-count``, ``PROMETHEUS_MULTIPROC_DIR`` set) the counters and histograms are every process's,
    summed (prometheus_client's multiprocess files), and the engine gauges this process's reading."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest(_MultiProcessView(metrics)), CONTENT_TYPE_LATEST  # type: ignore[arg-type]
    return generate_latest(metrics.registry), CONTENT_TYPE_LATEST


class _MultiProcessView:
    """A registry-like collector set: every process's files, then this app's engine gauges with the hit rate
    computed from the summed counters."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self) -> Iterable[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        families = list(MultiProcessCollector(None).collect())
        totals = {s.name: s.value for fam in families for s in fam.samples}
        cached = totals.get("flotilla_prefix_cache_hit_tokens_total", 0.0)
        prompt = totals.get("flotilla_finished_prompt_tokens_total", 0.0)
        yield from families
        yield from self.metrics.engine_collector.collect(hit_rate=cached / prompt if prompt else 0.0)
