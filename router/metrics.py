"""Prometheus metrics of the gateway, on a registry of its own (several apps may live in one process)."""

from __future__ import annotations

import logging
import time

from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from dvd.metrics import MODEL_LABEL, REQUEST_LATENCY_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, service_registry
from dvd.tracing import trace_id
from dvd.v2 import llm_pb2
from router.errors import APIError

log = logging.getLogger("router.requests")


class Metrics:
    """What clients see end to end (vision and gateway time included, unlike vLLM's own histograms on the language
    pods); request series carry `model_name` once the model is known to be served (no label per typo)."""

    def __init__(self) -> None:
        self.registry = r = service_registry()
        m = [MODEL_LABEL]
        self.requests = Counter("dvd_router_requests", "Chat completion requests by HTTP status", [*m, "status"],
                                registry=r)
        self.errors = Counter("dvd_router_errors", "Failed requests by error type and code", [*m, "type", "code"],
                              registry=r)
        self.ttft = Histogram("dvd_router_time_to_first_token_seconds", "Arrival to first generated token", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("dvd_router_time_per_output_token_seconds", "Decode time per token after the first",
                              m, buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("dvd_router_e2e_request_latency_seconds", "Arrival to last byte", m,
                             buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("dvd_router_requests_in_flight", "Admitted requests not finished", registry=r)
        self.waiting = Gauge("dvd_router_requests_waiting", "Requests queued for a slot", registry=r)
        self.prompt_tokens = Counter("dvd_router_prompt_tokens", "Prompt tokens, visual tokens included", m,
                                     registry=r)
        self.generation_tokens = Counter("dvd_router_generation_tokens", "Generated tokens", m, registry=r)
        self.routed = Counter("dvd_router_routed", "Requests by how their language server was chosen: owner (the "
                              "conversation's replica), spill (the next one: the owner was over the load bound or "
                              "down), none (no conversation key, or --routing least-load: least load)", ["choice"],
                              registry=r)
        self.backends_ready = Gauge("dvd_router_backends_ready", "Language servers passing health checks",
                                    registry=r)


class RequestTracker:
    """One request's timeline: feeds the histograms once, whichever way the request ends."""

    def __init__(self, metrics: Metrics, request_id: str, span: trace.Span | None = None) -> None:
        self._m = metrics
        self.request_id = request_id
        self.span = span or trace.INVALID_SPAN
        self.model_name = ""  # set once the request names a served model
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
        if response.tokens:
            now = time.perf_counter()
            if self._first is None:
                self._first = now
                self._m.ttft.labels(self.model_name).observe(now - self._start)
                self.span.add_event("first_token")
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
        self._m.requests.labels(model_name=self.model_name, status=str(status)).inc()
        usage = self.usage or llm_pb2.Usage()
        self._end_span(status, usage, error)
        log.info("request finished", extra={
            "request_id": self.request_id, "status": status, "code": error.code if error else "",
            "trace_id": trace_id(self.span),  # a stream ends outside the request's span context
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "ttft_s": round(self._first - self._start, 4) if self._first else "", "e2e_s": round(elapsed, 4)})
        if error is not None:
            self._m.errors.labels(model_name=self.model_name, type=error.type, code=error.code or "").inc()
        if status != 200:  # latency and token figures describe completed requests only
            return
        self._m.e2e.labels(self.model_name).observe(elapsed)
        if self.usage is not None:
            self._m.prompt_tokens.labels(self.model_name).inc(self.usage.prompt_tokens)
            self._m.generation_tokens.labels(self.model_name).inc(self.usage.completion_tokens)
            if self._first is not None and self._last is not None and self.usage.completion_tokens > 1:
                decode = (self._last - self._first) / (self.usage.completion_tokens - 1)
                self._m.tpot.labels(self.model_name).observe(decode)

    def _end_span(self, status: int, usage: llm_pb2.Usage, error: APIError | None) -> None:
        self.span.set_attributes({"http.response.status_code": status, "gen_ai.request.model": self.model_name,
                                  "gen_ai.usage.input_tokens": usage.prompt_tokens,
                                  "gen_ai.usage.output_tokens": usage.completion_tokens,
                                  "dvd.visual_tokens": usage.visual_tokens})
        if error is not None:
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, error.code or error.type))
        self.span.end()
