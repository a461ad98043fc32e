"""Prometheus metrics of the vision service (`dvd_vision_*`, labelled `model_name`: dvd/metrics.py), on a private
registry so several servers can share a process."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from dvd.metrics import MODEL_LABEL, REQUEST_LATENCY_BUCKETS, STAGE_BUCKETS, service_registry

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = r = service_registry()
        m = {MODEL_LABEL: model_name}
        by_model = [MODEL_LABEL]
        self.tiles = Counter("dvd_vision_tiles", "Tiles encoded (rate() gives tiles/s)", by_model,
                             registry=r).labels(**m)
        self.batch_tiles = Histogram("dvd_vision_batch_tiles", "Tiles per batch", by_model, buckets=BATCH_BUCKETS,
                                     registry=r).labels(**m)
        self.batch_seconds = Histogram("dvd_vision_batch_seconds", "Compute time per batch", by_model,
                                       buckets=STAGE_BUCKETS, registry=r).labels(**m)
        self.queue_tiles = Gauge("dvd_vision_queue_tiles", "Tiles waiting for a batch slot (the autoscaling signal)",
                                 by_model, registry=r).labels(**m)
        self.inflight = Gauge("dvd_vision_inflight_requests", "Encode calls in progress", by_model,
                              registry=r).labels(**m)
        self._requests = Counter("dvd_vision_requests", "Encode calls by outcome (a gRPC status name)",
                                 [MODEL_LABEL, "status"], registry=r)
        self.request_seconds = Histogram("dvd_vision_request_seconds", "Encode call latency", by_model,
                                         buckets=REQUEST_LATENCY_BUCKETS, registry=r).labels(**m)
        self._vir_tiles = Counter("dvd_vision_vir_tiles", "Tiles the ViR router decided on",
                                  [MODEL_LABEL, "compressed"], registry=r)
        self.vir_share = Gauge("dvd_vision_vir_compressed_share", "Share of router-decided tiles compressed so far",
                               by_model, registry=r).labels(**m)
        self._cache_lookups = Counter(
            "dvd_vision_embedding_cache_lookups", "Images and videos looked up in the cache of recent encodings: hit "
            "(sent again without preprocessing or ViT) or miss (encoded)", [MODEL_LABEL, "result"], registry=r)
        self.cache_bytes = Gauge("dvd_vision_embedding_cache_bytes", "Bytes of recent encodings held", by_model,
                                 registry=r).labels(**m)
        self.cache_evictions = Counter("dvd_vision_embedding_cache_evictions", "Recent encodings evicted to stay in "
                                       "budget", by_model, registry=r).labels(**m)
        self.model_name = model_name
        self._vir_decided = 0
        self._vir_compressed = 0

    def request_done(self, status: str, seconds: float) -> None:
        self._requests.labels(model_name=self.model_name, status=status).inc()
        self.request_seconds.observe(seconds)

    def cache_lookups(self, result: str, n: int) -> None:
        self._cache_lookups.labels(model_name=self.model_name, result=result).inc(n)

    def bind_queue(self, depth: Callable[[], int]) -> None:
        """The queue gauge reads the live depth at scrape time instead of being pushed on every change."""
        self.queue_tiles.set_function(depth)

    def observe_batch(self, tiles: int, seconds: float) -> None:
        self.tiles.inc(tiles)
        self.batch_tiles.observe(tiles)
        self.batch_seconds.observe(seconds)

    def observe_vir(self, decisions: list[bool]) -> None:
        n = sum(decisions)
        self._vir_tiles.labels(model_name=self.model_name, compressed="true").inc(n)
        self._vir_tiles.labels(model_name=self.model_name, compressed="false").inc(len(decisions) - n)
        self._vir_decided += len(decisions)
        self._vir_compressed += n
        if self._vir_decided:
            self.vir_share.set(self._vir_compressed / self._vir_decided)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)
