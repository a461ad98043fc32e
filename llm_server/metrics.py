"""Prometheus metrics of the language service (vLLM registers its own `vllm:*` metrics in the same registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("dvd_llm_requests_total", "Generate calls by outcome", ["status"])
VISION_WAIT = Histogram("dvd_llm_vision_wait_seconds", "Time a request waited for its image embeddings",
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
EMBEDDING_BYTES = Counter("dvd_llm_embedding_bytes_total", "Embedding bytes received from the vision pool, by the "
                          "data-plane transport they took (shm, tcp, grpc)", ["transport"])
VISUAL_TOKENS = Counter("dvd_llm_visual_tokens_total", "Image embedding rows submitted to vLLM")
INFLIGHT = Gauge("dvd_llm_inflight_requests", "Generate calls in progress")
VISION_SERVERS_READY = Gauge("dvd_llm_vision_servers_ready", "Vision servers passing health checks")
EMBEDDING_CACHE_LOOKUPS = Counter("dvd_llm_embedding_cache_lookups_total",
                                  "Images looked up in the embedding cache: hit, miss (encoded), shared (waited for "
                                  "another request's vision call)", ["result"])
EMBEDDING_CACHE_BYTES = Gauge("dvd_llm_embedding_cache_bytes", "Bytes of embeddings held by the cache")
EMBEDDING_CACHE_ENTRIES = Gauge("dvd_llm_embedding_cache_entries", "Images held by the embedding cache")
EMBEDDING_CACHE_EVICTIONS = Counter("dvd_llm_embedding_cache_evictions_total", "Images evicted to stay in budget")
