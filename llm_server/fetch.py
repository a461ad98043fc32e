"""A request's embeddings, fetched: from the embedding cache, else from the vision pool, checked once on arrival,
and handed over as vLLM takes them (prompt.py says why a video arrives as its frames)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dvd.content_cache import embedding_keys
from dvd.errors import ServiceError
from dvd.tracing import tracer
from dvd.v2 import vision_pb2
from llm_server.embedding_cache import Embedding, EmbeddingCache
from llm_server.metrics import Metrics
from llm_server.request import Conversation
from llm_server.vision_pool import VisionPool


def validate_embeddings(embeddings: list[torch.Tensor], placeholders: int, numbers: list[int] | None = None) -> None:
    """What vLLM would otherwise discover inside the EngineCore, where one bad request kills all, and the tiles'
    checks on arrival (vision_pool.py) cannot see: the count, and values that are not numbers. Shape, datatype and
    hidden size hold by construction: an image is received into a tensor of its declared rows x the language
    model's hidden size. `numbers` names the images by their place in the request."""
    if len(embeddings) != placeholders:
        raise ServiceError(f"{len(embeddings)} image embeddings for {placeholders} <image> placeholders")
    for i, e in zip(numbers or range(placeholders), embeddings, strict=True):
        if not torch.isfinite(e).all():
            raise ServiceError(f"image {i}: embeddings contain NaN or infinity")


@dataclass
class Fetched:
    embeddings: list[torch.Tensor] = field(default_factory=list)  # vLLM's images: an image's rows, or a frame's
    uuids: list[str] = field(default_factory=list)  # their content keys, vLLM's multi-modal UUIDs
    frames: list[int] = field(default_factory=list)  # per video, in order: its frames
    bytes_received: int = 0  # from the vision pool (0 when the cache had everything)
    summary: vision_pb2.EncodeSummary = field(default_factory=vision_pb2.EncodeSummary)


@dataclass
class EmbeddingFetcher:
    pool: VisionPool
    cache: EmbeddingCache
    metrics: Metrics
    dtype: torch.dtype  # the language model's
    request_wide_vir: bool  # Flash: an image's rows depend on the images beside it (part of its key)

    async def fetch(self, request_id: str, conversation: Conversation,
                    options: vision_pb2.EncodeOptions) -> Fetched:
        out = Fetched()
        if not conversation.media:
            return out
        media = conversation.media
        keys = embedding_keys(media, options, self.request_wide_vir)

        async def encode(indices: list[int]) -> list[Embedding]:
            try:
                with tracer.start_as_current_span("llm.vision", attributes={"dvd.media": len(indices)}) as span:
                    encoded = await self.pool.encode(request_id, [media[i] for i in indices], options,
                                                     affinity=keys[indices[0]].encode())
                    span.set_attributes({f"dvd.bytes.{t}": n for t, n in encoded.bytes_by_transport.items()})
            except ServiceError as e:  # one bad file: name it as the client did
                if e.item is not None and e.item < len(indices):
                    e.param = conversation.paths[indices[e.item]]
                e.item = None  # an index in this vision call, not in the client's request
                raise
            out.bytes_received, out.summary = encoded.bytes_received, encoded.summary
            self.metrics.vision_wait.observe(encoded.seconds)
            for transport, n in encoded.bytes_by_transport.items():
                self.metrics.embedding_bytes(transport, n)
            # Once, before the cache keeps them; cached embeddings are not checked again.
            validate_embeddings(encoded.embeddings, len(indices), indices)
            return [tuple(emb.to(self.dtype).split(rows)) if media[i].kind == vision_pb2.MEDIA_KIND_VIDEO
                    else emb.to(self.dtype)
                    for i, emb, rows in zip(indices, encoded.embeddings, encoded.tile_rows, strict=True)]

        for key, value in zip(keys, await self.cache.lookup(keys, encode), strict=True):
            if isinstance(value, tuple):
                out.embeddings += value
                out.uuids += [f"{key}:frame{f}" for f in range(len(value))]
                out.frames.append(len(value))
            else:
                out.embeddings.append(value)
                out.uuids.append(key)
        return out
