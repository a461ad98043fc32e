"""Client side of the vision pool: pick the least-loaded vision server, stream one request's embeddings from it,
and move to another server when one fails or vanishes mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc
import torch

from dvd.tensor_codec import decode_bf16
from dvd.v1 import vision_pb2, vision_pb2_grpc

log = logging.getLogger("llm_server.vision_pool")


class VisionInputError(ValueError):
    """The vision service rejected the images (bad input): the client's fault, never retried."""


class VisionUnavailableError(RuntimeError):
    """No vision server could encode the request."""


class VisionBusyError(VisionUnavailableError):
    """Every vision server refused the request because its queue is full (back-pressure, retry later)."""


class VisionTimeoutError(TimeoutError):
    """The vision pool did not finish the request within its deadline."""


class VisionProtocolError(RuntimeError):
    """A vision server sent a stream that does not add up (wrong sizes, order, counts)."""


@dataclass
class EncodedImages:
    embeddings: list[torch.Tensor]  # one (tokens_i, hidden) bf16 tensor per image
    server: str
    bytes_received: int
    seconds: float
    summary: vision_pb2.EncodeSummary


@dataclass
class VisionBackend:
    address: str
    channel: grpc.aio.Channel
    stub: vision_pb2_grpc.VisionServiceStub
    healthy: bool = False
    queued_tiles: int = 0
    outstanding: int = 0

    @property
    def load(self) -> float:
        return self.queued_tiles + 16 * self.outstanding


class VisionPool:
    def __init__(self, addresses: tuple[str, ...], hidden_size: int, timeout_s: float = 120.0,
                 health_interval_s: float = 2.0) -> None:
        self.hidden_size = hidden_size
        self.timeout_s = timeout_s
        self.health_interval_s = health_interval_s
        options = [("grpc.max_receive_message_length", 64 * 2**20)]
        self.backends = [
            VisionBackend(a, ch := grpc.aio.insecure_channel(a, options=options), vision_pb2_grpc.VisionServiceStub(ch))
            for a in addresses
        ]
        self._health_task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop(), name="vision-health")

    async def close(self) -> None:
        if self._health_task:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        for b in self.backends:
            await b.channel.close()

    @property
    def ready_count(self) -> int:
        return sum(b.healthy for b in self.backends)

    async def check_health(self) -> None:
        await asyncio.gather(*(self._probe(b) for b in self.backends))

    async def _probe(self, b: VisionBackend) -> None:
        try:
            h = await b.stub.Health(vision_pb2.VisionHealthRequest(), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            if b.healthy:
                log.warning("vision server unhealthy", extra={"server": b.address, "code": e.code().name})
            b.healthy = False
            return
        if h.hidden_size and h.hidden_size != self.hidden_size:
            log.error("vision server has the wrong hidden size; not using it",
                      extra={"server": b.address, "hidden": h.hidden_size, "expected": self.hidden_size})
            b.healthy = False
            return
        if not b.healthy and h.ready:
            log.info("vision server ready", extra={"server": b.address, "model": h.model, "flash": h.flash})
        b.healthy, b.queued_tiles = h.ready, h.queued_tiles

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_health()

    def _pick(self, exclude: set[str]) -> VisionBackend | None:
        candidates = [b for b in self.backends if b.address not in exclude and b.healthy]
        if not candidates:  # health may be stale: try the ones not yet tried before giving up
            candidates = [b for b in self.backends if b.address not in exclude]
        return min(candidates, key=lambda b: b.load, default=None)

    async def encode(self, request_id: str, images: list[bytes], options: vision_pb2.EncodeOptions) -> EncodedImages:
        """Embeddings for every image, from one server; other servers are tried when one fails."""
        deadline = time.monotonic() + self.timeout_s
        tried: set[str] = set()
        errors: list[str] = []
        busy = 0
        while (backend := self._pick(tried)) is not None:
            tried.add(backend.address)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return await self._encode_on(backend, request_id, images, options, remaining)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise VisionInputError(e.details() or "invalid image") from e
                if e.code() == grpc.StatusCode.CANCELLED:
                    raise
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # the whole budget is spent: no retry
                    raise VisionTimeoutError(f"vision encoding took longer than {self.timeout_s:.0f}s") from e
                busy += e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                backend.healthy = e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
                errors.append(f"{backend.address}: {e.code().name} {e.details()}")
            except VisionProtocolError as e:
                backend.healthy = False
                errors.append(f"{backend.address}: {e}")
            log.warning("vision server failed; trying another", extra={"request_id": request_id,
                                                                          "error": errors[-1]})
        if time.monotonic() >= deadline:
            raise VisionTimeoutError(f"vision encoding took longer than {self.timeout_s:.0f}s")
        detail = "; ".join(errors) if errors else "no vision server configured or reachable"
        if errors and busy == len(errors):
            raise VisionBusyError(f"every vision server is at capacity ({detail})")
        raise VisionUnavailableError(f"no vision server could encode the images ({detail})")

    async def _encode_on(self, b: VisionBackend, request_id: str, images: list[bytes],
                         options: vision_pb2.EncodeOptions, timeout: float) -> EncodedImages:
        t0 = time.perf_counter()
        request = vision_pb2.EncodeRequest(request_id=request_id, images=images, options=options)
        tiles: list[list[torch.Tensor]] = [[] for _ in images]
        received = 0
        b.outstanding += 1
        call = b.stub.Encode(request, timeout=timeout)
        try:
            async for msg in call:
                if msg.HasField("summary"):
                    return EncodedImages(self._check_summary(tiles, msg.summary), b.address, received,
                                         time.perf_counter() - t0, msg.summary)
                tile = msg.tile
                self._check_tile(tile, tiles)
                tiles[tile.image_index].append(decode_bf16(tile.data, tile.rows, tile.hidden_size))
                received += len(tile.data)
        except ValueError as e:
            raise VisionProtocolError(str(e)) from e
        finally:
            b.outstanding -= 1
            call.cancel()
        raise VisionProtocolError("the embedding stream ended without a summary")

    def _check_tile(self, tile: vision_pb2.TileEmbedding, tiles: list[list[torch.Tensor]]) -> None:
        if tile.dtype != vision_pb2.DTYPE_BF16:
            raise VisionProtocolError(f"unsupported embedding dtype {tile.dtype}")
        if tile.image_index >= len(tiles):
            raise VisionProtocolError(f"tile for image {tile.image_index}, but the request has {len(tiles)} images")
        if tile.tile_index != len(tiles[tile.image_index]):
            raise VisionProtocolError(f"image {tile.image_index}: tile {tile.tile_index} arrived out of order")
        if tile.hidden_size != self.hidden_size:
            raise VisionProtocolError(
                f"embedding hidden size {tile.hidden_size} != the language model's {self.hidden_size}")

    @staticmethod
    def _check_summary(tiles: list[list[torch.Tensor]], summary: vision_pb2.EncodeSummary) -> list[torch.Tensor]:
        if len(summary.images) != len(tiles):
            raise VisionProtocolError(f"summary covers {len(summary.images)} images, expected {len(tiles)}")
        out = []
        for i, (img_tiles, s) in enumerate(zip(tiles, summary.images, strict=True)):
            if not img_tiles or len(img_tiles) != s.num_tiles:
                raise VisionProtocolError(f"image {i}: got {len(img_tiles)} tiles, summary says {s.num_tiles}")
            emb = torch.cat(img_tiles)
            if emb.shape[0] != s.num_tokens:
                raise VisionProtocolError(f"image {i}: got {emb.shape[0]} rows, summary says {s.num_tokens}")
            out.append(emb)
        return out
