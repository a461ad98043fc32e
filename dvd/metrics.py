"""The metric conventions every service follows, so that dashboards built for vLLM read ours too.

One prefix per service (`dvd_router_`, `dvd_llm_`, `dvd_vision_`); every series labelled `model_name`, as vLLM's
`vllm:*` are; process metrics (CPU, memory, file descriptors) on every registry; request latency histograms with
vLLM's bucket boundaries (vllm/v1/metrics/buckets.py, copied: the gateway does not import vLLM; a test compares
them with the installed vLLM's).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

MODEL_LABEL = "model_name"

# vLLM's TIME_TO_FIRST_TOKEN_BUCKETS, INTER_TOKEN_LATENCY_BUCKETS and REQUEST_LATENCY_BUCKETS.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
# Stages inside a request (a vision batch, a transfer): milliseconds to a minute.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def service_registry() -> CollectorRegistry:
    """A private registry (several servers may share a test process) with the process collectors the default
    registry would have had."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
