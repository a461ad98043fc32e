"""Content-addressed image and video embeddings: a resent image or video (every turn of a chat resends it) costs no
vision call.

An LRU within a byte budget, keyed by what shapes an embedding (see `embedding_keys`). Concurrent requests for
one new image share one vision call: the first one encodes it, the others wait for its result and, if that call
fails (its client went away, the pool refused it), try again on their own.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

import torch

from dvd.v1 import vision_pb2
from llm_server.metrics import Metrics

# An image's rows, or a video's frames (each its own rows: ViR may compress some).
Embedding = torch.Tensor | tuple[torch.Tensor, ...]
Encoder = Callable[[list[int]], Awaitable[list[Embedding]]]


def nbytes(emb: Embedding) -> int:
    return sum(t.numel() * t.element_size() for t in (emb if isinstance(emb, tuple) else (emb,)))


def embedding_keys(images: Sequence[bytes], options: vision_pb2.EncodeOptions, request_wide: bool,
                   image_max_tiles: Sequence[int] = (), kinds: Sequence[int] = ()) -> list[str]:
    """One key per image or video: its content hash plus the options that shape its embedding (an image's own tile
    cap, a video's frame sampling).

    With ViR the compression decision is a quantile over every tile of the request, so on Flash checkpoints an
    image's rows also depend on the other images it came with: then their hashes are part of the key. The keys
    are also vLLM's multi-modal UUIDs, so its prefix cache never mixes two different embeddings of one image.
    """
    video = f"video:{options.video.num_frames}:{options.video.fps!r}"
    digests = [hashlib.sha256(b).hexdigest() + (video if kind == vision_pb2.MEDIA_KIND_VIDEO else "")
               for b, kind in zip(images, kinds or [vision_pb2.MEDIA_KIND_IMAGE] * len(images), strict=True)]
    caps = list(image_max_tiles) or [0] * len(images)
    suffix = f"|vir={options.vir}"
    if request_wide and options.vir != vision_pb2.VIR_MODE_OFF and len(images) > 1:
        # Neighbours shape the quantile with their own tile counts.
        suffix += "|with=" + ",".join(f"{d}:{c or options.max_tiles}" for d, c in zip(digests, caps, strict=True))
    return [hashlib.sha256(f"{d}|tiles={c or options.max_tiles}{suffix}".encode()).hexdigest()
            for d, c in zip(digests, caps, strict=True)]


class EmbeddingCache:
    def __init__(self, max_bytes: int, model_name: str = "") -> None:
        self.max_bytes = max_bytes
        self.metrics = Metrics(model_name)
        self._entries: OrderedDict[str, Embedding] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Embedding | None]] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _get(self, key: str) -> Embedding | None:
        emb = self._entries.get(key)
        if emb is not None:
            self._entries.move_to_end(key)
        return emb

    def _put(self, key: str, emb: Embedding) -> None:
        size = nbytes(emb)
        if size > self.max_bytes or key in self._entries:
            return
        while self.bytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= nbytes(old)
            self.metrics.cache_evictions.inc()
        self._entries[key] = emb
        self.bytes += size
        self.metrics.cache_bytes.set(self.bytes)
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
