"""The vision server's cache of recent encodings: a request whose every image it encoded recently, with the same
options (and, under ViR, the same neighbours), gets the same rows again without preprocessing or the ViT."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import dvd.content_cache
from dvd.content_cache import ByteLRU
from dvd.procs import free_port
from dvd.v2 import vision_pb2
from tests.conftest import start_vision
from tests.helpers.vision import encode, encode_sync, encode_with, noise_image, request

ON = {"DVD_VISION_EMBEDDING_CACHE_GB": "0.25"}


def test_byte_lru_keeps_the_recent_within_its_budget_and_age(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(dvd.content_cache.time, "monotonic", lambda: now[0])
    evicted: list[int] = []
    lru: ByteLRU[bytes] = ByteLRU(10, len, max_age_s=60, on_evict=lambda: evicted.append(1))
    lru.put("a", b"aaaa")
    lru.put("b", b"bbbb")
    assert lru.get("a") == b"aaaa"  # now the most recent
    lru.put("c", b"cccc")  # 12 bytes > 10: the least recent (b) goes
    assert (lru.get("b"), lru.get("a"), lru.bytes, len(evicted)) == (None, b"aaaa", 8, 1)
    lru.put("big", b"x" * 11)  # larger than the budget: not kept, nothing evicted for it
    assert lru.get("big") is None and len(lru) == 2
    now[0] += 61  # past the age limit: gone whether used or not, and not counted as evictions
    assert lru.get("a") is None
    lru.put("d", b"dd")
    assert (len(lru), lru.bytes, len(evicted)) == (1, 2, 1)


def lookups(metrics_url: str) -> dict[str, float]:
    families = text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text)
    return {s.labels["result"]: s.value for f in families if f.name == "dvd_vision_embedding_cache_lookups"
            for s in f.samples if s.name.endswith("_total")}


@pytest.fixture(scope="module")
def cached_vision(tiny_ckpt: Path) -> Iterator[tuple[str, str]]:
    port = free_port()
    svc, address = start_vision("vision-cache", tiny_ckpt, "--metrics-port", str(port), env=ON)
    yield address, f"http://127.0.0.1:{port}/metrics"
    svc.stop()


def test_a_recent_image_is_sent_again_without_the_vit(cached_vision: tuple[str, str]) -> None:
    address, metrics = cached_vision
    images = [encode(noise_image(896, 448, seed=41), "JPEG"), encode(noise_image(500, 700, seed=42), "PNG")]
    first = encode_sync(address, request(images, request_id="first"))
    assert first.summary is not None and first.summary.compute_seconds > 0
    assert lookups(metrics) == {"miss": 2.0}
    again = encode_sync(address, request(images, request_id="again"))
    assert again.fingerprint() == first.fingerprint()  # every tile's rows, byte for byte, in the same order
    assert again.summary is not None and again.summary.compute_seconds == 0 and again.summary.preprocess_seconds == 0
    assert list(again.summary.images) == list(first.summary.images)  # sizes, tiles, tokens
    assert lookups(metrics) == {"miss": 2.0, "hit": 2.0}
    # Other options make other rows: a tile cap is part of the key.
    capped = encode_sync(address, request(images, max_tiles=1, request_id="capped"))
    assert len(capped.tiles) == 2 and lookups(metrics)["miss"] == 4.0
    # One image of the two, on its own: it was encoded here (a request's images are kept one by one).
    alone = encode_sync(address, request(images[1:], request_id="alone"))
    assert alone.fingerprint() == [(0, *t[1:]) for t in first.fingerprint() if t[0] == 1]
    assert lookups(metrics)["hit"] == 3.0


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_cached_rows_reach_the_language_side_as_computed_ones(cached_vision: tuple[str, str], transport: str) -> None:
    """Through the language server's own pool: the second ask (another replica's, in a cluster) is served from the
    cache over the data plane, with the same embeddings."""
    address, metrics = cached_vision
    image = encode(noise_image(1000, 300, seed={"shm": 51, "tcp": 52}[transport]), "JPEG")
    before = lookups(metrics)
    computed = asyncio.run(encode_with(address, transport, [image]))
    cached = asyncio.run(encode_with(address, transport, [image]))
    after = lookups(metrics)
    assert (after["miss"] - before["miss"], after.get("hit", 0) - before.get("hit", 0)) == (1, 1)
    assert cached.tile_rows == computed.tile_rows and cached.bytes_received == computed.bytes_received
    assert torch.equal(cached.embeddings[0], computed.embeddings[0])
    assert set(cached.bytes_by_transport) == {transport}


def test_vir_decisions_come_back_with_the_rows_and_depend_on_the_neighbours(tiny_flash_ckpt: Path) -> None:
    """Flash: ViR compresses a share of the request's tiles, chosen over all of them; a cached request gets the
    same decisions, and an image sent with other neighbours is a new request."""
    port = free_port()
    svc, address = start_vision("vision-cache-flash", tiny_flash_ckpt, "--metrics-port", str(port), env=ON)
    try:
        metrics = f"http://127.0.0.1:{port}/metrics"
        images = [encode(noise_image(1344, 448, seed=61), "JPEG"), encode(noise_image(896, 896, seed=62), "JPEG")]
        first = encode_sync(address, request(images, vir=vision_pb2.VIR_MODE_AUTO))
        assert any(t.compressed for t in first.tiles) and not all(t.compressed for t in first.tiles)
        again = encode_sync(address, request(images, vir=vision_pb2.VIR_MODE_AUTO))
        assert again.fingerprint() == first.fingerprint()
        assert lookups(metrics) == {"miss": 2.0, "hit": 2.0}
        encode_sync(address, request(images[:1], vir=vision_pb2.VIR_MODE_AUTO))
        assert lookups(metrics)["miss"] == 3.0
    finally:
        svc.stop()
