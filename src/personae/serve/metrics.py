"""Prometheus text-format metrics for GET /metrics, without a client library.

Counters and histograms are kept here (thread-safe: routes run on the event loop and worker
threads); the scheduler's own counters and gauges (queue depth, running rows, batch sizes,
adapters resident) are read when /metrics is scraped. The exposition format is Prometheus's
text format 0.0.4: ``# HELP``, ``# TYPE``, then ``name{label="value"} number`` lines.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from personae.serve.adapters import ServerAdapters
from personae.serve.scheduler import Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/characters", "/tokenize", "/detokenize",
          "/health", "/metrics", "/stats")  # a request's `route` label; any other path is "other"


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{key}="{str(value).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for key, value in sorted(labels.items()))
    return "{" + ",".join(escaped) + "}"


class Histogram:
    """Cumulative buckets, sum and count of observed values (one label set)."""

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: Mapping[str, str]) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f"{name}_bucket{_labels({**labels, 'le': le})} {running}")
        return out + [f"{name}_sum{_labels(labels)} {self.sum}", f"{name}_count{_labels(labels)} {self.count}"]


class Metrics:
    """The server's counters and histograms, by name and label set, rendered in Prometheus's text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self._histograms: dict[str, dict[tuple[tuple[str, str], ...], Histogram]] = {}
        self._help: dict[str, str] = {}

    def describe(self, name: str, text: str) -> None:
        self._help[name] = text

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            series = self._counters.setdefault(name, {})
            key = tuple(sorted(labels.items()))
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._histograms.setdefault(name, {}).setdefault(tuple(sorted(labels.items())), Histogram()).observe(value)

    def counter(self, name: str, **labels: str) -> float:
        """The value of one counter (0 when never incremented)."""
        with self._lock:
            return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def render(self, gauges: Mapping[str, tuple[str, float]] = {}, counters: Mapping[str, tuple[str, float]] = {}) \
            -> str:
        """The exposition text: kept series, plus read-at-scrape `gauges` / `counters` (name -> (help, value))."""
        lines: list[str] = []
        with self._lock:
            for name, series in sorted(self._counters.items()):
                lines += [f"# HELP {name} {self._help.get(name, name)}", f"# TYPE {name} counter"]
                lines += [f"{name}{_labels(dict(key))} {value}" for key, value in sorted(series.items())]
            for name, series in sorted(self._histograms.items()):
                lines += [f"# HELP {name} {self._help.get(name, name)}", f"# TYPE {name} histogram"]
                for key, histogram in sorted(series.items()):
                    lines += histogram.lines(name, dict(key))
        for kind, values in (("counter", counters), ("gauge", gauges)):
            for name, (text, value) in values.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Counts every HTTP request by route, method and status, and observes how long it took."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = route_label(scope["path"])
            self.metrics.inc("personae_http_requests_total", route=route, method=scope["method"], status=str(status))
            self.metrics.observe("personae_http_request_duration_seconds", time.perf_counter() - started, route=route)


def scrape(metrics: Metrics, scheduler: Scheduler, adapters: ServerAdapters, characters: int, started: float) -> str:
    """The /metrics text: the kept series, then the scheduler's and the adapters' numbers read now."""
    s, bank = scheduler.stats, adapters.bank
    counters = {
        "personae_scheduler_requests_total": ("generation requests admitted to the scheduler", s.requests),
        "personae_scheduler_rejected_total": ("requests refused with a 503 because the queue was full", s.rejected),
        "personae_scheduler_cancelled_total": ("requests cancelled (client gone)", s.cancelled),
        "personae_scheduler_failed_total": ("requests whose generation failed", s.failed),
        "personae_completion_tokens_total": ("tokens generated, every choice", s.tokens),
        "personae_decode_steps_total": ("batched forward passes of the decoder", s.steps),
        "personae_decode_row_steps_total": ("rows decoded, summed over steps (/ steps = mean batch size)",
                                            s.row_steps),
        "personae_prefix_cache_hits_total": ("prompt heads found in the prefix cache", scheduler.batch.prefixes.hits),
        "personae_prefix_cache_misses_total": ("prompt heads not in the prefix cache",
                                               scheduler.batch.prefixes.misses),
    }
    gauges = {
        "personae_queue_depth": ("requests waiting for a place in the batch", scheduler.queued),
        "personae_batch_size": ("rows in the running batch now", len(scheduler.rows)),
        "personae_batch_size_max": ("the largest batch decoded so far", s.max_batch_seen),
        "personae_adapters_resident": ("character adapters loaded in memory", len(bank) if bank is not None else 0),
        "personae_characters": ("characters the server knows", characters),
        "personae_uptime_seconds": ("seconds since the server started", round(time.time() - started, 3)),
    }
    return metrics.render(gauges=gauges, counters=counters)



async def first_token_timed(chunks: AsyncIterator[str], metrics: Metrics) -> AsyncIterator[str]:
    """The chunks as they come; the time to the second one (the first after the role chunk) is observed."""
    started = time.perf_counter()
    count = 0
    async for chunk in chunks:
        count += 1
        if count == 2:
            metrics.observe("personae_time_to_first_token_seconds", time.perf_counter() - started)
        yield chunk


def route_label(path: str) -> str:
    """A bounded label for a request path: the known route it starts with, else "other"."""
    for route in ROUTES:
        if path == route or path.startswith(route + "/"):
            return route
    return "other"


__all__ = ["CONTENT_TYPE", "Histogram", "Metrics", "MetricsMiddleware", "first_token_timed", "route_label", "scrape"]
