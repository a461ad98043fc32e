"""Prometheus metrics of the language service (`dvd_llm_*`, labelled `model_name` as vLLM's `vllm:*` beside them in
the same default registry, which also carries the process metrics; dvd/metrics.py)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from dvd.metrics import MODEL_LABEL, STAGE_BUCKETS

_M = [MODEL_LABEL]
_REQUESTS = Counter("dvd_llm_requests_total", "Generate calls by outcome", [*_M, "status"])
_VISION_WAIT = Histogram("dvd_llm_vision_wait_seconds", "Time a request waited for its image embeddings", _M,
                         buckets=STAGE_BUCKETS)
_EMBEDDING_BYTES = Counter("dvd_llm_embedding_bytes_total", "Embedding bytes received from the vision pool, by the "
                           "data-plane transport they took (shm, tcp, grpc)", [*_M, "transport"])
_VISUAL_TOKENS = Counter("dvd_llm_visual_tokens_total", "Image embedding rows submitted to vLLM", _M)
_INFLIGHT = Gauge("dvd_llm_inflight_requests", "Generate calls in progress", _M)
_VISION_SERVERS_READY = Gauge("dvd_llm_vision_servers_ready", "Vision servers passing health checks", _M)
_CACHE_LOOKUPS = Counter("dvd_llm_embedding_cache_lookups_total", "Images looked up in the embedding cache: hit, "
                         "miss (encoded), shared (waited for another request's vision call)", [*_M, "result"])
_CACHE_BYTES = Gauge("dvd_llm_embedding_cache_bytes", "Bytes of embeddings held by the cache", _M)
_CACHE_ENTRIES = Gauge("dvd_llm_embedding_cache_entries", "Images held by the embedding cache", _M)
_VIR_PRESSURE = Gauge("dvd_llm_vir_pressure", "ViR under pressure: 0 = the checkpoint's rule, 1 = the vision "
                     "servers' floor (--vir-pressure-waiting)", _M)
_FIRST_TOKEN_PENDING = Gauge("dvd_llm_first_token_pending", "Generate calls waiting for their first token (vision, "
                             "engine queue, prefill): what drives ViR under pressure", _M)
_CACHE_EVICTIONS = Counter("dvd_llm_embedding_cache_evictions_total", "Images evicted to stay in budget", _M)


class Metrics:
    """The series of one served model (a process serves one; tests build several)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        m = {MODEL_LABEL: model_name}
        self.vision_wait = _VISION_WAIT.labels(**m)
        self.visual_tokens = _VISUAL_TOKENS.labels(**m)
        self.inflight = _INFLIGHT.labels(**m)
        self.vision_servers_ready = _VISION_SERVERS_READY.labels(**m)
        self.cache_bytes = _CACHE_BYTES.labels(**m)
        self.cache_entries = _CACHE_ENTRIES.labels(**m)
        self.cache_evictions = _CACHE_EVICTIONS.labels(**m)
        self.vir_pressure = _VIR_PRESSURE.labels(**m)
        self.first_token_pending = _FIRST_TOKEN_PENDING.labels(**m)

    def request_done(self, status: str) -> None:
        _REQUESTS.labels(model_name=self.model_name, status=status).inc()

    def embedding_bytes(self, transport: str, n: int) -> None:
        _EMBEDDING_BYTES.labels(model_name=self.model_name, transport=transport).inc(n)

    def cache_lookup(self, result: str) -> None:
        _CACHE_LOOKUPS.labels(model_name=self.model_name, result=result).inc()
