"""Prometheus metrics of the vision service, on a private registry so several servers can share a process."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tiles = Counter("vision_tiles", "Tiles encoded (rate() gives tiles/s)", registry=r)
        self.batch_tiles = Histogram("vision_batch_tiles", "Tiles per batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("vision_batch_seconds", "Compute time per batch", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.queue_tiles = Gauge("vision_queue_tiles", "Tiles waiting for a batch slot", registry=r)
        self.inflight = Gauge("vision_inflight_requests", "Encode calls in progress", registry=r)
        self.requests = Counter("vision_requests", "Encode calls by outcome", ["status"], registry=r)
        self.request_seconds = Histogram("vision_request_seconds", "Encode call latency", buckets=LATENCY_BUCKETS,
                                         registry=r)
        self.vir_tiles = Counter("vision_vir_tiles", "Tiles the ViR router decided on", ["compressed"], registry=r)
        self.vir_share = Gauge("vision_vir_compressed_share", "Share of router-decided tiles compressed so far",
                               registry=r)
        self._vir_decided = 0
        self._vir_compressed = 0

    def bind_queue(self, depth: Callable[[], int]) -> None:
        """The queue gauge reads the live depth at scrape time instead of being pushed on every change."""
        self.queue_tiles.set_function(depth)

    def observe_batch(self, tiles: int, seconds: float) -> None:
        self.tiles.inc(tiles)
        self.batch_tiles.observe(tiles)
        self.batch_seconds.observe(seconds)

    def observe_vir(self, decisions: list[bool]) -> None:
        n = sum(decisions)
        self.vir_tiles.labels(compressed="true").inc(n)
        self.vir_tiles.labels(compressed="false").inc(len(decisions) - n)
        self._vir_decided += len(decisions)
        self._vir_compressed += n
        if self._vir_decided:
            self.vir_share.set(self._vir_compressed / self._vir_decided)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)
