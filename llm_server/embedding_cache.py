"""Content-addressed image and video embeddings: a resent image or video (every turn of a chat resends it) costs no
vision call.

An LRU within a byte budget, keyed by what shapes an embedding (dvd/content_cache.py). Concurrent requests for
one new image share one vision call: the first one encodes it, the others wait for its result and, if that call
fails (its client went away, the pool refused it), try again on their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import torch

from dvd.content_cache import ByteLRU
from llm_server.metrics import Metrics

# An image's rows, or a video's frames (each its own rows: ViR may compress some).
Embedding = torch.Tensor | tuple[torch.Tensor, ...]
Encoder = Callable[[list[int]], Awaitable[list[Embedding]]]


def nbytes(emb: Embedding) -> int:
    return sum(t.numel() * t.element_size() for t in (emb if isinstance(emb, tuple) else (emb,)))


class EmbeddingCache:
    def __init__(self, max_bytes: int, model_name: str = "") -> None:
        self.max_bytes = max_bytes
        self.metrics = Metrics(model_name)
        self._entries: ByteLRU[Embedding] = ByteLRU(max_bytes, nbytes, on_evict=self.metrics.cache_evictions.inc)
        self._inflight: dict[str, asyncio.Future[Embedding | None]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._entries.bytes

    def _get(self, key: str) -> Embedding | None:
        return self._entries.get(key)

    def _put(self, key: str, emb: Embedding) -> None:
        self._entries.put(key, emb)
        self.metrics.cache_bytes.set(self._entries.bytes)
        self.metrics.cache_entries.set(len(self._entries))

    async def lookup(self, keys: Sequence[str], encode: Encoder) -> list[Embedding]:
        """Embeddings for every key: cached ones at once, the missing ones through one `encode(indices)` call."""
        out: list[Embedding | None] = [None] * len(keys)
        while True:
            missing: list[int] = []
            owned: dict[str, asyncio.Future[Embedding | None]] = {}
            waits: dict[int, asyncio.Future[Embedding | None]] = {}
            for i, key in enumerate(keys):
                if out[i] is not None:
                    continue
                if (emb := self._get(key)) is not None:
                    out[i] = emb
                    self.metrics.cache_lookup("hit")
                elif key in owned:  # the same image twice in one request: the vision server sees both
                    missing.append(i)
                elif key in self._inflight:
                    waits[i] = self._inflight[key]
                    self.metrics.cache_lookup("shared")
                else:
                    owned[key] = self._inflight[key] = asyncio.get_running_loop().create_future()
                    missing.append(i)
                    self.metrics.cache_lookup("miss")
            if missing:
                await self._encode_owned(keys, missing, owned, encode, out)
            for i, fut in waits.items():
                out[i] = await asyncio.shield(fut)  # None: the owner's call failed, so ask again below
            if all(e is not None for e in out):
                return out  # type: ignore[return-value]

    async def _encode_owned(self, keys: Sequence[str], missing: list[int],
                            owned: dict[str, asyncio.Future[Embedding | None]], encode: Encoder,
                            out: list[Embedding | None]) -> None:
        try:
            embs = await encode(missing)
            for i, emb in zip(missing, embs, strict=True):
                out[i] = emb
                if keys[i] in owned and self.max_bytes > 0:
                    self._put(keys[i], emb)
                fut = owned.get(keys[i])
                if fut is not None and not fut.done():
                    fut.set_result(emb)
        finally:
            for key, fut in owned.items():
                self._inflight.pop(key, None)
                if not fut.done():
                    fut.set_result(None)
