"""The gRPC servicer: admit, preprocess, batch, decide (ViR), stream per-tile embeddings, summarise (the
request's own checks: vision_server/validation.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import grpc
import torch
from opentelemetry import trace

from dvd.content_cache import ByteLRU, embedding_keys
from dvd.data_plane import shm_domain
from dvd.errors import ServiceError
from dvd.health import VISION_SERVICE
from dvd.logs import request_context
from dvd.media import tiles_bound
from dvd.tensor_codec import WIRE_DATATYPE
from dvd.tracing import incoming_context, stage_span, tracer
from dvd.v2 import vision_pb2, vision_pb2_grpc
from vision_server.batcher import Batcher, TileResult
from vision_server.config import ModelConfig, ServerConfig
from vision_server.data_plane import DataListener, ShmMaps, TileSender, serialize_response
from vision_server.metrics import Metrics
from vision_server.preprocess import Tiled, preprocess
from vision_server.validation import VIDEO_PARAM, Checked, check, item_name
from vision_server.video import VideoLimits, preprocess_video
from vision_server.vir import decide_compression

log = logging.getLogger("vision_server.service")

MAX_TILES_PER_MESSAGE = 8  # descriptors (and, on the gRPC fallback, bytes: 16 MiB at hidden 4096) per message
# A request is admitted only if the queue ahead of it and its own tiles should be computed within this share of
# its deadline (the rest: preprocessing, ViR, the transfer, and the estimate's error). Without it, a burst of
# large requests was admitted by queue size alone (4096 tiles), and half of them hit the language server's 120 s
# deadline in the queue: a 504 after two minutes instead of a 429 at once.
DEADLINE_SHARE = 0.75


def too_late(seconds: float | None, ahead: int, remaining: float) -> bool:
    """Whether `seconds` of vision work (the queue ahead and the request's own tiles) overrun DEADLINE_SHARE of the
    `remaining` deadline because of a queue. A request too large for its deadline on an empty queue is not refused:
    the queue is not why, and a 429 would tell its client to retry what can never fit (it ends as a timeout)."""
    return seconds is not None and ahead > 0 and seconds > DEADLINE_SHARE * remaining


BUSY = grpc.StatusCode.RESOURCE_EXHAUSTED  # back-pressure: the client may retry, here or elsewhere


@dataclass(frozen=True)
class EncodedItem:
    """One image or video as this server last sent it: its tiles' rows, which of them ViR compressed, its size."""

    tiles: tuple[torch.Tensor, ...]
    compressed: tuple[bool, ...]
    width: int
    height: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tiles)


def compact(t: torch.Tensor) -> torch.Tensor:
    """`t` on its own storage: a tile's rows are a view of its whole batch, which the cache must not keep alive."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


@dataclass(frozen=True)
class VirSettings:
    relative: float
    absolute: float
    floor: float = 0.1  # the relative threshold at full pressure (llm_server/vir_pressure.py)

    def under(self, pressure: float) -> tuple[float, float]:
        """Both thresholds at a pressure level (0..1), lower so that more tiles are compressed: the request-wide
        quantile's toward the floor (never raised where the checkpoint's own value is below it), the absolute one
        toward 0 (it would otherwise keep the valve shut wherever few tiles score above it)."""
        return self.relative - pressure * max(0.0, self.relative - self.floor), self.absolute * (1.0 - pressure)


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    def __init__(self, cfg: ServerConfig, model_cfg: ModelConfig, batcher: Batcher, metrics: Metrics,
                 vir: VirSettings, listener: DataListener | None = None) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.batcher = batcher
        self.metrics = metrics
        self.vir = vir
        self.preprocess_executor = ThreadPoolExecutor(max_workers=cfg.preprocess_threads,
                                                      thread_name_prefix="preprocess")
        self.data_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="data-plane")
        self.listener = listener
        self.shm_maps = ShmMaps()
        self.shm_domain = shm_domain()
        self.ready = False
        self.inflight = 0
        self.preprocessing_tiles = 0  # worst-case tiles of requests still being decoded
        self.recent: ByteLRU[EncodedItem] = ByteLRU(int(cfg.embedding_cache_gb * 2**30), lambda e: e.nbytes,
                                                     cfg.embedding_cache_ttl, metrics.cache_evictions.inc)
        # Read at scrape time: entries past their age also leave on a lookup, not only when rows are kept.
        metrics.cache_bytes.set_function(lambda: self.recent.bytes)

    def _admit_in_time(self, ahead: int, own: int, context: grpc.aio.ServicerContext) -> None:
        """Refuse now (back-pressure: the client may retry) a request that the `ahead` tiles queued before it would
        keep from finishing within its call's deadline; a call without a deadline is bound by the queue's size."""
        remaining = context.time_remaining()
        seconds = self.batcher.drain_seconds(ahead + own)
        if remaining is not None and too_late(seconds, ahead, remaining):
            raise ServiceError(f"vision queue is full (about {seconds:.0f} s of work for {ahead} queued tiles and "
                               f"this request's {own}, the call has {remaining:.0f} s left)", BUSY)

    async def _preprocess(self, request: vision_pb2.EncodeRequest, checked: Checked) -> list[Tiled]:
        m = self.model_cfg
        least = m.min_dynamic_patch if m.dynamic_image_size else 1
        image = partial(preprocess, image_size=m.image_size, use_thumbnail=m.use_thumbnail,
                        max_pixels=self.cfg.max_image_pixels)
        limits = VideoLimits(max_frames=self.cfg.max_video_frames, max_seconds=self.cfg.max_video_seconds,
                             max_pixels=self.cfg.max_image_pixels)
        video = partial(preprocess_video, image_size=m.image_size, sampling=checked.sampling, limits=limits)
        kinds = [m.kind for m in request.media]
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(self.preprocess_executor,
                                   partial(video, m.data) if m.kind == vision_pb2.MEDIA_KIND_VIDEO
                                   else partial(image, m.data, min_num=min(least, k), max_num=k))
              for m, k in zip(request.media, checked.max_tiles, strict=True)),
            return_exceptions=True)
        out: list[Tiled] = []
        for i, (r, kind) in enumerate(zip(results, kinds, strict=True)):
            if isinstance(r, ServiceError):
                raise ServiceError(f"{item_name(kind, i)}: {r}", item=i)
            if isinstance(r, BaseException):
                raise r
            out.append(r)
        frames = sum(t.pixels.shape[0] for t, kind in zip(out, kinds, strict=True)
                     if kind == vision_pb2.MEDIA_KIND_VIDEO)
        if frames > self.cfg.max_video_frames:
            raise ServiceError(f"the request's videos have {frames} sampled frames together, above the limit of "
                               f"{self.cfg.max_video_frames}", param=f"{VIDEO_PARAM}.num_frames")
        return out

    # -- the RPCs -----------------------------------------------------------------------------------------------
    async def Encode(self, request: vision_pb2.EncodeRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[vision_pb2.EncodeResponse | bytes]:
        request_context(request.request_id)
        with tracer.start_as_current_span("vision.encode", context=incoming_context(context.invocation_metadata()),
                                          kind=trace.SpanKind.SERVER,
                                          attributes={"dvd.request_id": request.request_id,
                                                      "dvd.media": len(request.media)}):
            async for msg in self._encode(request, context):
                yield msg

    async def _encode(self, request: vision_pb2.EncodeRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[vision_pb2.EncodeResponse | bytes]:
        """Encode's outcomes: each refusal aborts the call with its status, once, and is counted."""
        t0 = time.monotonic()
        self.inflight += 1
        self.metrics.inflight.inc()
        futures: list[asyncio.Future[TileResult]] = []
        sender: TileSender | None = None
        status = "ok"
        try:
            if not self.ready:
                raise ServiceError("vision server is not ready (starting or stopping)", grpc.StatusCode.UNAVAILABLE)
            checked = check(request, self.cfg, self.model_cfg)
            keys = embedding_keys(request.media, request.options, self.model_cfg.flash) if self.recent.max_bytes else []
            if keys and all(items := [self.recent.get(k) for k in keys]):
                # Every item was encoded here recently, with these options and (under ViR) these neighbours: the
                # same rows again, without the queue, preprocessing or the ViT.
                self.metrics.cache_lookups("hit", len(keys))
                sender = await TileSender.open(request.data_plane, self.data_executor, self.listener, self.shm_maps)
                async for msg in self._stream_cached(request.request_id, items, t0, sender):  # type: ignore[arg-type]
                    yield msg
                return
            self.metrics.cache_lookups("miss", len(keys))
            # Reserve the worst case before decoding, so that many large requests cannot all hold their decoded
            # pixels at once while the queue-full check below waits for preprocessing to finish.
            bound = tiles_bound(request.media, checked.max_tiles)
            if self.batcher.queued_tiles + self.preprocessing_tiles + bound > self.cfg.max_queue_tiles:
                raise ServiceError(f"vision queue is full ({self.batcher.queued_tiles} tiles waiting, "
                                   f"{self.preprocessing_tiles} being decoded)", BUSY)
            # Before decoding, only the hopeless are refused: the queue as it is and at least a tile per file (the
            # worst cases reserved above, 13 per image and 32 per video, made a burst refuse 4 requests in 5).
            self._admit_in_time(self.batcher.queued_tiles, len(request.media), context)
            self.preprocessing_tiles += bound
            try:
                tiled = await self._preprocess(request, checked)
            finally:
                self.preprocessing_tiles -= bound
            t_pre = time.monotonic() - t0
            n_tiles = sum(t.pixels.shape[0] for t in tiled)
            if self.batcher.queued_tiles + n_tiles > self.cfg.max_queue_tiles:
                raise ServiceError(f"vision queue is full ({self.batcher.queued_tiles} tiles waiting)", BUSY)
            self._admit_in_time(self.batcher.queued_tiles, n_tiles, context)
            # A single tile is never compressed (the quantile of one value is itself): skip ViR for it.
            with_vir = (self.model_cfg.flash and request.options.vir != vision_pb2.VIR_MODE_OFF and n_tiles > 1)
            per_image = [self.batcher.submit(t.pixels, with_vir) for t in tiled]
            futures = [f for fs in per_image for f in fs]
            sender = await TileSender.open(request.data_plane, self.data_executor, self.listener, self.shm_maps)
            trace.get_current_span().set_attributes({
                "dvd.tiles": n_tiles, "dvd.transport": "shm" if sender.shm else "tcp" if sender.conn else "grpc"})
            async for msg in self._stream(request.request_id, [(t.width, t.height) for t in tiled], per_image,
                                          with_vir, t_pre, t0, sender, keys=keys,
                                          thresholds=self.vir.under(request.options.vir_pressure)):
                yield msg
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as e:
            if isinstance(e, ServiceError):
                error, status = e, e.code.name.lower()
                log.info("encode refused", extra={"request_id": request.request_id, "code": e.code.name,
                                                  "reason": e.message})
            else:
                error, status = ServiceError("vision server error while encoding", grpc.StatusCode.INTERNAL), "error"
                log.exception("encode failed", extra={"request_id": request.request_id})
            await error.abort(context)
        finally:
            for f in futures:
                f.cancel()  # no-op for finished tiles; queued ones are skipped by the batcher
            if sender is not None:
                sender.close()
            self.inflight -= 1
            self.metrics.inflight.dec()
            self.metrics.request_done(status, time.monotonic() - t0)

    def _stream_cached(self, request_id: str, items: list[EncodedItem], t0: float,
                       sender: TileSender) -> AsyncIterator[vision_pb2.EncodeResponse | bytes]:
        """A request every item of which is in the cache: its rows as they were sent the first time."""
        trace.get_current_span().set_attributes({"dvd.cached": True, "dvd.tiles": sum(len(e.tiles) for e in items)})
        now = time.monotonic()
        per_image: list[list[asyncio.Future[TileResult]]] = []
        for item in items:
            per_image.append([])
            for emb in item.tiles:
                done: asyncio.Future[TileResult] = asyncio.get_running_loop().create_future()
                done.set_result(TileResult(emb, None, now, now))
                per_image[-1].append(done)
        return self._stream(request_id, [(e.width, e.height) for e in items], per_image, False, 0.0, t0, sender,
                            compress=[c for e in items for c in e.compressed])

    async def _stream(self, request_id: str, sizes: list[tuple[int, int]],
                      per_image: list[list[asyncio.Future[TileResult]]], with_vir: bool, t_pre: float, t0: float,
                      sender: TileSender, *, compress: list[bool] | None = None, keys: list[str] | None = None,
                      thresholds: tuple[float, float] = (0.0, 0.0)) -> AsyncIterator[vision_pb2.EncodeResponse | bytes]:
        """Tiles in order as soon as they are ready; with ViR on, only after the request-wide decision.
        `compress`: decisions already known (a cached request's); `keys`: where to keep the rows once all are sent;
        `thresholds`: ViR's relative and absolute thresholds for this request (its pressure level applied)."""
        flat = [f for fs in per_image for f in fs]
        compress = compress or [False] * len(flat)
        sent: list[torch.Tensor] = []
        projected: list[torch.Tensor] = []
        proj_end = 0.0
        vir_start = 0.0
        if with_vir:
            results = await asyncio.gather(*flat)
            vir_start = time.monotonic()
            p = torch.stack([r.p_compress for r in results if r.p_compress is not None])
            compress = decide_compression(p, *thresholds)
            self.metrics.observe_vir(compress)
            projected = await self._project(results, compress)
            proj_end = time.monotonic()
        summaries = [vision_pb2.ImageSummary(num_tiles=len(fs), width=w, height=h)
                     for (w, h), fs in zip(sizes, per_image, strict=True)]
        rows = self._image_rows(per_image, compress)
        flat_tiles = [(img, tile_index, len(fs)) for img, fs in enumerate(per_image) for tile_index in range(len(fs))]
        first_start, last_end, k = float("inf"), proj_end, 0
        while k < len(flat):
            await flat[k]
            msg = vision_pb2.EncodeResponse()
            embs: list[torch.Tensor] = []
            # Every tile already finished goes in this message (a batch finishes together): fewer messages.
            while k < len(flat) and flat[k].done() and len(embs) < MAX_TILES_PER_MESSAGE:
                res = flat[k].result()
                first_start, last_end = min(first_start, res.compute_start), max(last_end, res.compute_end)
                img, tile_index, num_tiles = flat_tiles[k]
                emb = projected[k] if with_vir else res.emb256
                assert emb is not None
                summaries[img].num_tokens += emb.shape[0]
                summaries[img].num_compressed_tiles += int(compress[k])
                msg.tiles.add(image_index=img, tile_index=tile_index, num_tiles=num_tiles, datatype=WIRE_DATATYPE,
                              shape=emb.shape, compressed=compress[k], image_rows=rows[img])
                embs.append(emb)
                if keys:
                    sent.append(emb)
                k += 1
            wire = await sender.place(msg.tiles, embs)  # fills the descriptors in place: no message copies
            if k == len(flat):
                queue_s = max(0.0, first_start - (t0 + t_pre))
                stage_span("vision.preprocess", t0, t0 + t_pre, **{"dvd.images": len(sizes), "dvd.tiles": len(flat)})
                stage_span("vision.queue", t0 + t_pre, max(first_start, t0 + t_pre))
                stage_span("vision.vit", first_start, last_end, **{"dvd.tiles": len(flat), "dvd.vir": with_vir,
                                                                   "dvd.compressed_tiles": sum(compress)})
                if with_vir:
                    stage_span("vision.vir_projector", vir_start, proj_end)
                msg.summary.CopyFrom(vision_pb2.EncodeSummary(
                    images=summaries, preprocess_seconds=t_pre, queue_seconds=queue_s,
                    compute_seconds=max(0.0, last_end - first_start)))
                # Logged before the last message: the client may close the stream once it has the summary.
                log.info("encoded", extra={"request_id": request_id, "tiles": len(flat),
                                           "compressed": sum(compress), "images": len(sizes),
                                           "seconds": round(time.monotonic() - t0, 4)})
                if keys:  # now: the client closes the call once it has the summary
                    self._keep(keys, sizes, per_image, sent, compress)
            yield await sender.outgoing(msg)
            await sender.follow(msg.tiles, wire)

    def _keep(self, keys: list[str], sizes: list[tuple[int, int]], per_image: list[list[asyncio.Future[TileResult]]],
              sent: list[torch.Tensor], compress: list[bool]) -> None:
        k = 0
        for key, (w, h), fs in zip(keys, sizes, per_image, strict=True):
            tiles = tuple(compact(t) for t in sent[k:k + len(fs)])
            self.recent.put(key, EncodedItem(tiles, tuple(compress[k:k + len(fs)]), w, h))
            k += len(fs)

    def _image_rows(self, per_image: list[list[asyncio.Future[TileResult]]], compress: list[bool]) -> list[int]:
        """Rows of each image, known before its first tile is sent (the ViR decision is request-wide)."""
        full, small = self.model_cfg.tokens_per_tile, self.model_cfg.compressed_tokens_per_tile
        out, k = [], 0
        for fs in per_image:
            out.append(sum(small if c else full for c in compress[k:k + len(fs)]))
            k += len(fs)
        return out

    async def _project(self, results: list[TileResult], compress: list[bool]) -> list[torch.Tensor]:
        """Each ViR tile through the one projector its decision needs, on the device that holds its features."""
        loop = asyncio.get_running_loop()
        out: list[torch.Tensor | None] = [None] * len(results)
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, (r, small) in enumerate(zip(results, compress, strict=True)):
            groups.setdefault((id(r.runner), small), []).append(i)
        max_batch = self.batcher.max_batch
        for (_, small), idx in groups.items():
            runner = results[idx[0]].runner
            assert runner is not None
            for lo in range(0, len(idx), max_batch):
                part = idx[lo:lo + max_batch]
                grids = [results[i].grid for i in part]
                embs = await loop.run_in_executor(runner.executor, runner.project, grids, small)
                for i, e in zip(part, embs, strict=True):
                    out[i] = e
                    results[i].grid = None  # device memory goes back as soon as the rows are on the host
        return [e for e in out if e is not None]

    async def Metadata(self, request: vision_pb2.MetadataRequest,
                       context: grpc.aio.ServicerContext) -> vision_pb2.VisionMetadata:
        return vision_pb2.VisionMetadata(
            model=self.model_cfg.name, hidden_size=self.model_cfg.llm_hidden, flash=self.model_cfg.flash,
            devices=[r.device for r in self.batcher.runners], max_tiles=self.model_cfg.max_tiles,
            data_port=self.listener.port if self.listener else 0, shm_domain=self.shm_domain,
            max_video_frames=self.cfg.max_video_frames, video_num_frames=self.cfg.video_num_frames)

    def load(self) -> float:
        """What the pools balance by (the health reply's `dvd-load`): tiles waiting for a batch slot."""
        return float(self.batcher.queued_tiles)

    def close(self) -> None:
        self.preprocess_executor.shutdown(wait=False, cancel_futures=True)
        self.data_executor.shutdown(wait=False, cancel_futures=True)
        self.shm_maps.close()


def add_to_server(servicer: vision_pb2_grpc.VisionServiceServicer, server: grpc.aio.Server) -> None:
    """The generated `add_VisionServiceServicer_to_server`, but Encode's answers go out through
    `serialize_response`, which sends the bytes `TileSender.outgoing` built as they are."""
    handlers = {
        "Encode": grpc.unary_stream_rpc_method_handler(
            servicer.Encode, request_deserializer=vision_pb2.EncodeRequest.FromString,
            response_serializer=serialize_response),
        "Metadata": grpc.unary_unary_rpc_method_handler(
            servicer.Metadata, request_deserializer=vision_pb2.MetadataRequest.FromString,
            response_serializer=vision_pb2.VisionMetadata.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(VISION_SERVICE, handlers),))
    server.add_registered_method_handlers(VISION_SERVICE, handlers)
