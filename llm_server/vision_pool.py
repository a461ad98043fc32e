"""Client side of the vision pool: pick the least-loaded vision server, stream one request's embeddings from it,
and move to another server when one fails or vanishes mid-stream."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from dvd.backend_pool import Backend, BackendPool
from dvd.errors import ServiceError
from dvd.health import VISION_SERVICE
from dvd.media import most_tiles, tiles_bound
from dvd.security import InternalAuth
from dvd.tensor_codec import DATATYPES, WIRE_DATATYPE
from dvd.tracing import outgoing_metadata
from dvd.v2 import vision_pb2
from llm_server.data_plane import BrokenStream, ShmSlots, TileReceiver, VisionStub, image_buffer

log = logging.getLogger("llm_server.vision_pool")

TRANSPORT_NAMES = {vision_pb2.TRANSPORT_SHM: "shm", vision_pb2.TRANSPORT_TCP: "tcp", vision_pb2.TRANSPORT_GRPC: "grpc"}
TILE_ROWS = 256  # embedding rows of an uncompressed InternVL3.5 tile: sizes the shared-memory offer


@dataclass
class EncodedImages:
    embeddings: list[torch.Tensor]  # one (tokens_i, hidden) bf16 tensor per image or video
    tile_rows: list[list[int]]  # per image or video, the rows of each of its tiles (a video's tiles are its frames)
    server: str
    seconds: float
    summary: vision_pb2.EncodeSummary
    bytes_by_transport: dict[str, int]  # where the tiles' bytes travelled: shm, tcp, grpc

    @property
    def bytes_received(self) -> int:
        return sum(self.bytes_by_transport.values())


VisionBackend = Backend[VisionStub]  # .metadata: its VisionMetadata
# A call in flight counts as this many queued tiles until the server's next health report shows its tiles: an
# InternVL3.5 image is at most 12 tiles plus a thumbnail, rounded up.
OUTSTANDING_TILES = 16


class VisionPool(BackendPool[VisionStub]):
    def __init__(self, targets: tuple[str, ...], hidden_size: int, timeout_s: float = 120.0,
                 health_interval_s: float = 2.0, health_timeout_s: float = 2.0, transport: str = "auto",
                 shm_budget_bytes: int = 2**30, data_threads: int = 8, auth: InternalAuth | None = None) -> None:
        self.hidden_size = hidden_size
        self.timeout_s = timeout_s
        self.transport = transport
        auth = auth or InternalAuth()
        self.tcp_allowed = transport in ("tcp", "auto")
        self.data_tls = auth.ssl_context(server_side=False)  # the TCP data plane under the same mutual TLS
        self.slots = ShmSlots(shm_budget_bytes if transport in ("auto", "shm") else 0)
        self.executor = ThreadPoolExecutor(max_workers=data_threads, thread_name_prefix="data-plane")
        super().__init__(targets, VisionStub, self._describe, VISION_SERVICE, "vision", auth=auth,
                         channel_options=[("grpc.max_receive_message_length", 64 * 2**20)],
                         health_interval=health_interval_s, health_timeout=health_timeout_s,
                         outstanding_weight=OUTSTANDING_TILES)

    async def close(self) -> None:
        await super().close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.slots.close()

    @property
    def ready_count(self) -> int:
        return len(self.ready_backends)

    async def _describe(self, b: VisionBackend) -> bool:
        meta = await b.stub.Metadata(vision_pb2.MetadataRequest(), timeout=self.health_timeout)
        if meta.hidden_size != self.hidden_size:
            log.error("vision server of another model; not using it", extra={
                "server": b.address, "error": f"hidden size {meta.hidden_size} != the language model's "
                                              f"{self.hidden_size}"})
            return False
        b.metadata = meta
        return True

    async def encode(self, request_id: str, media: Sequence[vision_pb2.Media], options: vision_pb2.EncodeOptions,
                     affinity: bytes | None = None) -> EncodedImages:
        """Embeddings for every image (or video), from one server; other servers are tried when one fails.

        `affinity`: the media's content key: the first try goes to the
        server that owns it (within the load bound), so that every language replica asks the same vision server for
        one image, and its cache of recent encodings serves the second."""
        deadline = time.monotonic() + self.timeout_s
        tried: set[str] = set()
        errors: list[str] = []
        busy = 0
        while (backend := self._next(tried, affinity)) is not None:
            tried.add(backend.address)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                encoded = await self._encode_on(backend, request_id, media, options, remaining)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    self.call_succeeded(backend)  # it answered, about the request
                    raise ServiceError.from_rpc(e) from e
                if e.code() == grpc.StatusCode.CANCELLED:
                    raise
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # the whole budget is spent: no retry
                    raise ServiceError(f"vision encoding took longer than {self.timeout_s:.0f}s", e.code()) from e
                busy += e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                unreachable = e.code() == grpc.StatusCode.UNAVAILABLE  # or says it is not ready
                # gRPC's own UNAVAILABLE details name the address: the log has them, the client does not.
                errors.append("UNAVAILABLE: a vision server is unreachable or not ready" if unreachable
                              else f"{e.code().name}: {e.details()}")
                if unreachable:
                    self.mark_down(backend, f"UNAVAILABLE: {e.details()}")
                elif e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # a full queue is load, not a fault
                    self.call_failed(backend, errors[-1])
            except BrokenStream as e:
                errors.append(str(e))
                self.call_failed(backend, errors[-1])
            else:
                self.call_succeeded(backend)
                return encoded
            # Addresses go to the log only: a client's error message says what failed, not where.
            log.warning("vision server failed; trying another", extra={"request_id": request_id,
                                                                          "server": backend.address,
                                                                          "error": errors[-1]})
        if time.monotonic() >= deadline:
            raise ServiceError(f"vision encoding took longer than {self.timeout_s:.0f}s",
                               grpc.StatusCode.DEADLINE_EXCEEDED)
        # The backends' own messages went to the log above: the client reads what failed, not how or where.
        if errors and busy == len(errors):
            raise ServiceError("every vision server is at capacity", grpc.StatusCode.RESOURCE_EXHAUSTED)
        raise ServiceError("no vision server could encode the images" if errors
                           else "no vision server is configured or reachable", grpc.StatusCode.FAILED_PRECONDITION)

    def _next(self, tried: set[str], affinity: bytes | None) -> VisionBackend | None:
        """The key's owner first; after a failure, or without a key, the least-loaded server not tried yet."""
        if affinity is not None and not tried:
            backend, _ = self.pick_for(affinity)
            if backend is not None:
                return backend
        return self.pick(tried, fallback_to_unready=True)

    async def _encode_on(self, b: VisionBackend, request_id: str, media: Sequence[vision_pb2.Media],
                         options: vision_pb2.EncodeOptions, timeout: float) -> EncodedImages:
        t0 = time.perf_counter()
        if b.metadata is None and not await self._describe(b):  # a last resort that was never ready
            raise BrokenStream("a vision server of another model")
        meta: vision_pb2.VisionMetadata = b.metadata
        # The shared-memory offer, by the worst case the server admits the request by (its own limits, as its
        # Metadata reports them): a tile beyond it would travel inline.
        most = most_tiles(media, options, meta.max_tiles, meta.video_num_frames, meta.max_video_frames)
        bound = tiles_bound(media, most) * TILE_ROWS * self.hidden_size * DATATYPES[WIRE_DATATYPE].itemsize
        receiver = await TileReceiver.open(self.transport, self.executor, self.slots, meta.shm_domain, b.host,
                                           meta.data_port if self.tcp_allowed else 0, bound, timeout, self.data_tls)
        request = vision_pb2.EncodeRequest(request_id=request_id, media=media, options=options,
                                           data_plane=receiver.offer())
        embs: list[torch.Tensor | None] = [None] * len(media)
        tile_rows: list[list[int]] = [[] for _ in media]
        filled = [0] * len(media)  # rows received per image
        counts = [0] * len(media)  # tiles received per image
        by_transport: dict[str, int] = {}
        b.outstanding += 1
        call = b.stub.Encode(request, timeout=timeout, metadata=outgoing_metadata())  # the trace goes on
        try:
            async for answer in call:
                if answer is None:  # read_response failed; gRPC logged why
                    raise BrokenStream("a message that is not an EncodeResponse")
                msg, inline = answer
                items = []
                for tile in msg.tiles:
                    self._check_tile(tile, embs, filled, counts)
                    i = tile.image_index
                    rows = tile.shape[0]
                    if embs[i] is None:  # one tensor per image: tiles land in place, never concatenated
                        embs[i] = image_buffer(tile.image_rows, self.hidden_size, DATATYPES[tile.datatype])
                    emb = embs[i]
                    assert emb is not None
                    items.append((tile, emb[filled[i]:filled[i] + rows]))
                    filled[i] += rows
                    counts[i] += 1
                    tile_rows[i].append(rows)
                    name = TRANSPORT_NAMES.get(tile.transport, "grpc")
                    by_transport[name] = by_transport.get(name, 0) + tile.nbytes
                await receiver.receive(items, inline)
                if msg.HasField("summary"):
                    receiver.complete = True
                    return EncodedImages(self._check_summary(embs, filled, counts, msg.summary), tile_rows,
                                         b.address, time.perf_counter() - t0, msg.summary, by_transport)
        finally:
            b.outstanding -= 1
            call.cancel()
            receiver.close()
        raise BrokenStream("the embedding stream ended without a summary")

    def _check_tile(self, tile: vision_pb2.TileEmbedding, embs: list[torch.Tensor | None], filled: list[int],
                    counts: list[int]) -> None:
        dtype = DATATYPES.get(tile.datatype)
        if dtype is None or len(tile.shape) != 2:
            raise BrokenStream(f"unsupported tile tensor: {tile.datatype or 'no datatype'} {list(tile.shape)}")
        rows, hidden = tile.shape
        if tile.image_index >= len(embs):
            raise BrokenStream(f"tile for image {tile.image_index}, but the request has {len(embs)} images")
        i = tile.image_index
        if tile.tile_index != counts[i]:
            raise BrokenStream(f"image {i}: tile {tile.tile_index} arrived out of order")
        if hidden != self.hidden_size:
            raise BrokenStream(f"embedding hidden size {hidden} != the language model's {self.hidden_size}")
        emb = embs[i]
        image_rows = tile.image_rows if emb is None else emb.shape[0]
        if rows == 0 or tile.image_rows != image_rows or filled[i] + rows > image_rows:
            raise BrokenStream(f"image {i}: tile {tile.tile_index} of {rows} rows does not fit the "
                               f"image's {tile.image_rows} rows ({filled[i]} received)")
        if emb is not None and emb.dtype != dtype:
            raise BrokenStream(f"image {i}: tile {tile.tile_index} is {tile.datatype}, its image's others are not")
        if tile.nbytes != rows * hidden * dtype.itemsize:
            raise BrokenStream(f"image {i}: tile {tile.tile_index} declares {tile.nbytes} bytes for "
                               f"{rows} x {hidden} {tile.datatype}")

    @staticmethod
    def _check_summary(embs: list[torch.Tensor | None], filled: list[int], counts: list[int],
                       summary: vision_pb2.EncodeSummary) -> list[torch.Tensor]:
        if len(summary.images) != len(embs):
            raise BrokenStream(f"summary covers {len(summary.images)} images, expected {len(embs)}")
        out = []
        for i, (emb, s) in enumerate(zip(embs, summary.images, strict=True)):
            if emb is None or counts[i] != s.num_tiles:
                raise BrokenStream(f"image {i}: got {counts[i]} tiles, summary says {s.num_tiles}")
            if filled[i] != emb.shape[0] or emb.shape[0] != s.num_tokens:
                raise BrokenStream(f"image {i}: got {filled[i]} of {emb.shape[0]} rows, summary says "
                                   f"{s.num_tokens}")
            out.append(emb)
        return out
