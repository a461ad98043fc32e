"""Prometheus metrics of the gateway, on a registry of its own (several apps may live in one process)."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dvd.v1 import llm_pb2
from router.errors import APIError

log = logging.getLogger("router.requests")

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dvd_router_requests", "Chat completion requests by HTTP status", ["status"],
                                registry=r)
        self.errors = Counter("dvd_router_errors", "Failed requests by error type and code", ["type", "code"],
                              registry=r)
        self.ttft = Histogram("dvd_router_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("dvd_router_time_per_output_token_seconds", "Decode time per token after the first",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("dvd_router_e2e_request_latency_seconds", "Arrival to last byte",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("dvd_router_requests_in_flight", "Admitted requests not finished", registry=r)
        self.waiting = Gauge("dvd_router_requests_waiting", "Requests queued for a slot", registry=r)
        self.prompt_tokens = Counter("dvd_router_prompt_tokens", "Prompt tokens, visual tokens included", registry=r)
        self.generation_tokens = Counter("dvd_router_generation_tokens", "Generated tokens", registry=r)
        self.backends_ready = Gauge("dvd_router_backends_ready", "Language servers passing health checks",
                                    registry=r)


class RequestTracker:
    """One request's timeline: feeds the histograms once, whichever way the request ends."""

    def __init__(self, metrics: Metrics, request_id: str) -> None:
        self._m = metrics
        self.request_id = request_id
        self._start = time.perf_counter()
        self._first: float | None = None
        self._last: float | None = None
        self._admitted = False
        self._done = False
        self.usage: llm_pb2.Usage | None = None

    def admitted(self) -> None:
        self._admitted = True
        self._m.in_flight.inc()

    def observe(self, response: llm_pb2.GenerateResponse) -> None:
        if any(c.text or c.token_ids for c in response.choices):
            now = time.perf_counter()
            if self._first is None:
                self._first = now
                self._m.ttft.observe(now - self._start)
            self._last = now
        if response.HasField("usage"):
            self.usage = response.usage

    def finish(self, status: int, error: APIError | None = None) -> None:
        if self._done:
            return
        self._done = True
        elapsed = time.perf_counter() - self._start
        if self._admitted:
            self._m.in_flight.dec()
        self._m.requests.labels(status=str(status)).inc()
        usage = self.usage or llm_pb2.Usage()
        log.info("request finished", extra={
            "request_id": self.request_id, "status": status, "code": error.code if error else "",
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "ttft_s": round(self._first - self._start, 4) if self._first else "", "e2e_s": round(elapsed, 4)})
        if error is not None:
            self._m.errors.labels(type=error.type, code=error.code or "").inc()
        if status != 200:  # latency and token figures describe completed requests only
            return
        self._m.e2e.observe(elapsed)
        if self.usage is not None:
            self._m.prompt_tokens.inc(self.usage.prompt_tokens)
            self._m.generation_tokens.inc(self.usage.completion_tokens)
            if self._first is not None and self._last is not None and self.usage.completion_tokens > 1:
                self._m.tpot.observe((self._last - self._first) / (self.usage.completion_tokens - 1))
