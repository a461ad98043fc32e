"""OpenTelemetry tracing: one trace per request across the router, the language server and the vision server.

Off unless `OTEL_TRACES_EXPORTER` names an exporter (`otlp` or `console`); the standard variables configure the rest
(`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL` = grpc or http/protobuf, `OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, ...). The W3C trace context comes into the router in the `traceparent` header and goes
on in gRPC metadata; the language server hands it to vLLM (`trace_headers`), so vLLM's own spans
(`--otlp-traces-endpoint`) join the same trace. Off, every span is the API's no-op one: a context lookup, no export.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context

tracer = trace.get_tracer("dvd")
EXPORTERS = ("otlp", "console", "none")


def setup_tracing(service: str) -> bool:
    """Install the SDK's tracer provider for `service` if an exporter is asked for; True when tracing is on."""
    name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower() or "none"
    if name not in EXPORTERS:
        raise SystemExit(f"error: OTEL_TRACES_EXPORTER={name!r} is not supported (one of {', '.join(EXPORTERS)})")
    if name == "none":
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporter: SpanExporter
    if name == "console":
        exporter = ConsoleSpanExporter()
    elif (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
          or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        exporter = HttpExporter()
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service})
    provider = TracerProvider(resource=resource)  # flushes its spans at interpreter exit
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return True


def outgoing_metadata() -> list[tuple[str, str]]:
    """The current trace context as gRPC metadata (`traceparent`, `tracestate`); empty outside any trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def incoming_context(metadata: Iterable[tuple[str, Any]] | Mapping[str, str] | None) -> Context:
    """The caller's trace context from gRPC metadata or HTTP headers."""
    items = metadata.items() if isinstance(metadata, Mapping) else metadata or ()
    return propagate.extract({k: v.decode() if isinstance(v, bytes) else v for k, v in items})


def trace_id(span: trace.Span | None = None) -> str:
    """The trace id of `span` (default: the current one) in hex, what log lines carry; "" outside a trace."""
    ctx = (span or trace.get_current_span()).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def stage_span(name: str, start: float, end: float, **attributes: Any) -> None:
    """A finished child span of the current one for a stage measured with time.monotonic() (a batch computed in
    another thread, a queue wait): the stage is timed where it runs and reported where the request is."""
    if not trace.get_current_span().is_recording():
        return
    now_ns, now = time.time_ns(), time.monotonic()
    span = tracer.start_span(name, start_time=now_ns - int((now - start) * 1e9), attributes=attributes)
    span.end(end_time=now_ns - int((now - end) * 1e9))
