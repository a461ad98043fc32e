"""The language server's embedding cache: LRU within a byte budget, shared in-flight vision calls, exact keys."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dvd.content_cache import embedding_keys
from dvd.v2 import vision_pb2
from llm_server.embedding_cache import EmbeddingCache
from llm_server.embedding_cache import Encoder as Encoder_


class Encoder:
    """Stands in for the vision pool: records each call's indices, answers after `delay` (or raises)."""

    def __init__(self, rows: int = 4, delay: float = 0.0, fail: BaseException | None = None) -> None:
        self.calls: list[list[int]] = []
        self.rows, self.delay, self.fail = rows, delay, fail

    def for_images(self, images: list[int]) -> Encoder_:
        async def encode(indices: list[int]) -> list[torch.Tensor]:
            self.calls.append([images[i] for i in indices])
            await asyncio.sleep(self.delay)
            if self.fail is not None:
                raise self.fail
            return [torch.full((self.rows, 2), float(images[i]), dtype=torch.bfloat16) for i in indices]
        return encode


async def test_hits_skip_the_vision_call_and_survive_a_dead_pool() -> None:
    cache = EmbeddingCache(max_bytes=2**20)
    enc = Encoder()
    first = await cache.lookup(["a", "b"], enc.for_images([1, 2]))
    assert enc.calls == [[1, 2]] and [e[0, 0].item() for e in first] == [1.0, 2.0]
    dead = Encoder(fail=RuntimeError("vision pool down"))
    again = await cache.lookup(["b", "a"], dead.for_images([2, 1]))
    assert dead.calls == [] and [e[0, 0].item() for e in again] == [2.0, 1.0]
    assert again[0] is first[1]  # no copy: the cached tensor itself


async def test_only_missing_images_are_encoded() -> None:
    cache = EmbeddingCache(max_bytes=2**20)
    enc = Encoder()
    await cache.lookup(["a"], enc.for_images([1]))
    out = await cache.lookup(["x", "a", "y"], enc.for_images([7, 1, 8]))
    assert enc.calls == [[1], [7, 8]]
    assert [e[0, 0].item() for e in out] == [7.0, 1.0, 8.0]


async def test_lru_eviction_keeps_the_byte_budget() -> None:
    one = 4 * 2 * 2  # 4 rows x hidden 2 x bf16
    cache = EmbeddingCache(max_bytes=2 * one)
    enc = Encoder()
    await cache.lookup(["a"], enc.for_images([1]))
    await cache.lookup(["b"], enc.for_images([2]))
    await cache.lookup(["a"], enc.for_images([1]))  # a is now the most recent
    await cache.lookup(["c"], enc.for_images([3]))  # evicts b
    assert len(cache) == 2 and cache.bytes == 2 * one
    enc.calls.clear()
    await cache.lookup(["a", "c"], enc.for_images([1, 3]))
    assert enc.calls == []
    await cache.lookup(["b"], enc.for_images([2]))
    assert enc.calls == [[2]]


async def test_zero_budget_caches_nothing_but_still_shares_calls() -> None:
    cache = EmbeddingCache(max_bytes=0)
    enc = Encoder(delay=0.05)
    await asyncio.gather(*(cache.lookup(["a"], enc.for_images([1])) for _ in range(3)))
    assert enc.calls == [[1]] and len(cache) == 0
    await cache.lookup(["a"], enc.for_images([1]))
    assert enc.calls == [[1], [1]]


async def test_concurrent_requests_for_one_new_image_share_one_call() -> None:
    cache = EmbeddingCache(max_bytes=2**20)
    enc = Encoder(delay=0.05)
    outs = await asyncio.gather(*(cache.lookup(["a", k], enc.for_images([1, n]))
                                  for k, n in (("b", 2), ("c", 3), ("d", 4))))
    assert sorted(map(tuple, enc.calls)) == [(1, 2), (3,), (4,)]
    assert all(o[0][0, 0].item() == 1.0 for o in outs)


async def test_a_failed_owner_does_not_fail_the_waiters() -> None:
    """The first request's call is cancelled (its client went away): the second one encodes the image itself."""
    cache = EmbeddingCache(max_bytes=2**20)
    slow = Encoder(delay=10)
    owner = asyncio.create_task(cache.lookup(["a"], slow.for_images([1])))
    await asyncio.sleep(0.01)
    enc = Encoder()
    waiter = asyncio.create_task(cache.lookup(["a"], enc.for_images([1])))
    await asyncio.sleep(0.01)
    owner.cancel()
    out = await waiter
    assert out[0][0, 0].item() == 1.0 and enc.calls == [[1]]
    with pytest.raises(asyncio.CancelledError):
        await owner


async def test_the_same_image_twice_in_one_request_goes_to_the_vision_server_twice() -> None:
    """The ViR decision is over every tile of the request, so both copies must be there, as upstream."""
    cache = EmbeddingCache(max_bytes=2**20)
    enc = Encoder()
    out = await cache.lookup(["a", "a"], enc.for_images([1, 1]))
    assert enc.calls == [[1, 1]] and len(out) == 2 and len(cache) == 1


async def test_errors_reach_the_caller_and_nothing_is_cached() -> None:
    cache = EmbeddingCache(max_bytes=2**20)
    with pytest.raises(ValueError, match="bad image"):
        await cache.lookup(["a"], Encoder(fail=ValueError("bad image")).for_images([1]))
    enc = Encoder()
    await cache.lookup(["a"], enc.for_images([1]))
    assert enc.calls == [[1]]


def test_keys_depend_on_options_and_on_neighbours_only_under_request_wide_vir() -> None:
    a, b, c = (vision_pb2.Media(data=f) for f in (b"image-a", b"image-b", b"image-c"))
    auto = vision_pb2.EncodeOptions(vir=vision_pb2.VIR_MODE_AUTO)
    off = vision_pb2.EncodeOptions(vir=vision_pb2.VIR_MODE_OFF)
    assert embedding_keys([a], auto, True) == embedding_keys([a], auto, False)
    assert embedding_keys([a], auto, True) != embedding_keys([a], off, True)
    assert embedding_keys([a], auto, True) != embedding_keys([a], vision_pb2.EncodeOptions(max_tiles=2), True)
    assert embedding_keys([a, b], auto, True)[0] != embedding_keys([a, c], auto, True)[0]  # ViR: neighbours count
    assert embedding_keys([a, b], auto, False)[0] == embedding_keys([a, c], auto, False)[0]  # not Flash
    assert embedding_keys([a, b], off, True)[0] == embedding_keys([a, c], off, True)[0]  # ViR off
    assert len(set(embedding_keys([a, b, c], auto, False))) == 3
    # A per-image tile cap (image_url.detail) is part of that image's key; 0 is the request's budget.
    low = vision_pb2.Media(data=a.data, max_tiles=1)
    assert embedding_keys([low, b], auto, False)[0] != embedding_keys([a, b], auto, False)[0]
    assert embedding_keys([low, b], auto, False)[1] == embedding_keys([a, b], auto, False)[1]
    two = vision_pb2.EncodeOptions(max_tiles=2)
    assert embedding_keys([vision_pb2.Media(data=a.data, max_tiles=2)], two, False) == embedding_keys([a], two, False)
