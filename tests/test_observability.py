"""Operators' eyes: one trace per request across the three services (and vLLM's own span under it), JSON log lines
that carry the request and trace ids, and dashboards and alerts that query metrics the services really export."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import httpx
import openai
import pytest

from benchmarks.media import data_url, image_bytes
from tests.conftest import SERVICES
from tests.span_collector import SpanCollector

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "deploy" / "k8s" / "components" / "monitoring"
STAGES = {"POST /v1/chat/completions", "router.fetch_media", "router.queue", "llm.generate", "llm.vision",
          "llm.engine", "vision.encode", "vision.preprocess", "vision.queue", "vision.vit", "llm_request"}


def test_one_trace_across_the_three_services(router_tiny: str, span_collector: SpanCollector) -> None:
    """A client's W3C trace context comes back as one trace: router -> language server -> vision server, vLLM's
    request span under the language server's engine span, every parent link intact."""
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    client = openai.OpenAI(base_url=router_tiny, api_key="-", max_retries=0)
    reply = client.chat.completions.create(
        model="tiny", max_tokens=4, temperature=0, extra_headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(image_bytes(700, 500, seed=2811))}},
            {"type": "text", "text": "What is in the picture?"}]}])
    assert reply.choices[0].message.content is not None
    spans = span_collector.trace(trace_id, STAGES)
    by_name = {s.name: s for s in spans}
    assert set(by_name) >= STAGES, sorted(by_name)
    assert {s.service for s in spans} >= {"dvd-router", "dvd-llm", "dvd-vision"}
    ids = {s.span_id for s in spans}
    assert all(s.parent_id in ids or s.parent_id == client_span for s in spans), "a span whose parent is unknown"

    def parent(name: str) -> str:
        return next(s.name for s in spans if s.span_id == by_name[name].parent_id)

    assert by_name["POST /v1/chat/completions"].parent_id == client_span
    assert parent("llm.generate") == "POST /v1/chat/completions"
    assert parent("vision.encode") == "llm.vision"
    assert parent("vision.vit") == "vision.encode" and parent("llm_request") == "llm.engine"
    assert by_name["vision.vit"].attributes["dvd.tiles"] >= 2
    assert by_name["vision.encode"].attributes["dvd.transport"] == "shm"
    assert by_name["POST /v1/chat/completions"].attributes["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
    assert "first_token" in by_name["llm.engine"].events

    # Every service's log lines about the request are JSON and carry its trace id.
    for name in ("router-tiny", "llm-tiny", "vision-tiny"):
        mine = [json.loads(line) for line in list(SERVICES[name].tail) if trace_id in line]
        assert mine and all(r["trace_id"] == trace_id and r["request_id"] == reply.id for r in mine), name


def _series_names(text: str) -> set[str]:
    """Every series name a scrape offers, also those of labelled families with no sample yet (no error so far)."""
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names |= {name} | ({f"{name}_bucket", f"{name}_count", f"{name}_sum"} if kind == "histogram" else set())
    return names


def _queried_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (identifiers that are neither functions, keywords nor labels)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {n for n in names if n.startswith(("dvd_", "vllm:", "process_"))}


def _dashboard_exprs() -> list[str]:
    board = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def _alert_exprs() -> list[str]:
    import yaml

    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_dashboard_and_alerts_query_metrics_a_live_stack_exports(router_tiny: str, llm_tiny_metrics: str,
                                                                  vision_tiny_metrics: str) -> None:
    client = openai.OpenAI(base_url=router_tiny, api_key="-", max_retries=0)
    client.chat.completions.create(model="tiny", max_tokens=3, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image_bytes(448, 448, seed=2812))}},
        {"type": "text", "text": "Hi"}]}])
    exported = set()
    for url in (router_tiny.removesuffix("/v1") + "/metrics", llm_tiny_metrics, vision_tiny_metrics):
        exported |= _series_names(httpx.get(url, timeout=10).text)
    # Histograms and counters are queried by their series names (_bucket, _total, _count, _sum).
    exprs = _dashboard_exprs() + _alert_exprs()
    assert len(exprs) >= 12
    queried = set().union(*(_queried_names(e) for e in exprs))
    missing = sorted(queried - exported)
    assert not missing, missing
    for needed in ("dvd_vision_queue_tiles", "vllm:num_requests_waiting", "dvd_router_requests_total",
                   "dvd_llm_embedding_cache_lookups_total", "dvd_llm_embedding_bytes_total",
                   "dvd_vision_tiles_total", "dvd_router_time_to_first_token_seconds_bucket"):
        assert needed in queried, needed


@pytest.mark.parametrize("path", ["/ready", "/health"])
def test_public_probes_name_nothing_inside(router_tiny: str, llm_tiny: str, path: str) -> None:
    body = httpx.get(router_tiny.removesuffix("/v1") + path, timeout=10).text
    assert llm_tiny not in body and llm_tiny.rsplit(":", 1)[1] not in body
