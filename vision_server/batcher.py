"""Dynamic batching of tiles from concurrent requests, without letting the batch change any tile's numbers.

Every forward runs on exactly `micro_batch` tiles (short groups are zero-padded), so each tile always meets the
same kernels with the same shapes whatever else is queued: BLAS/cuDNN pick algorithms (and summation orders) by
shape, and a fixed shape is what makes a request's bytes identical alone or inside a busy batch. Tiles never
interact inside the model (attention is per tile), so padding and neighbours cannot leak into a result.
The ViR decision is not taken here: it needs all tiles of a request, which may land in different batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from vision_server.model import VisionModel

log = logging.getLogger("vision_server.batcher")


@dataclass
class TileResult:
    emb256: torch.Tensor  # (256, H) bf16 on CPU
    emb64: torch.Tensor | None  # (64, H) bf16 on CPU
    p_compress: torch.Tensor | None  # 0-d, in the model dtype (the decision compares in that dtype, as upstream)
    compute_start: float
    compute_end: float


@dataclass
class TileJob:
    pixels: torch.Tensor  # (3, S, S) float32
    with_router: bool
    future: asyncio.Future[TileResult]
    enqueued_at: float = field(default_factory=time.monotonic)


class DeviceRunner:
    """One model copy on one device, fed fixed-shape micro-batches from a single thread."""

    def __init__(self, model: VisionModel, device: str, micro_batch: int) -> None:
        self.model = model
        self.device = device
        self.micro_batch = micro_batch
        self.dtype = next(model.parameters()).dtype
        side = model.cfg.image_size
        self._shape = (micro_batch, 3, side, side)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vision-{device}")

    def run(self, pixels: list[torch.Tensor], with_router: list[bool]) -> list[TileResult]:
        """Tiles in, per-tile results out, in order; runs on the runner's own thread."""
        out: list[TileResult] = []
        for lo in range(0, len(pixels), self.micro_batch):
            chunk = pixels[lo:lo + self.micro_batch]
            router = any(with_router[lo:lo + self.micro_batch])
            x = torch.zeros(self._shape, dtype=torch.float32)
            x[:len(chunk)] = torch.stack(chunk)
            start = time.monotonic()
            res = self.model(x.to(self.device, non_blocking=True), with_router=router, n_valid=len(chunk))
            e256 = res.emb256[:len(chunk)].to(torch.bfloat16).cpu()
            e64 = res.emb64[:len(chunk)].to(torch.bfloat16).cpu() if res.emb64 is not None else None
            p = res.p_compress[:len(chunk)].cpu() if res.p_compress is not None else None
            end = time.monotonic()
            for i in range(len(chunk)):
                out.append(TileResult(e256[i], e64[i] if e64 is not None else None,
                                      p[i] if p is not None else None, start, end))
        return out

    def warmup(self, with_router: bool) -> None:
        side = self.model.cfg.image_size
        self.run([torch.zeros(3, side, side)], [with_router])

    def close(self) -> None:
        self.executor.shutdown(wait=True)


BatchObserver = Callable[[int, float], None]


class Batcher:
    """A shared queue of tiles and one worker per device pulling batches of up to `max_batch` tiles."""

    def __init__(self, runners: list[DeviceRunner], max_batch: int, max_wait_s: float,
                 on_batch: BatchObserver | None = None, granularity: int = 1) -> None:
        self.runners = runners
        self.granularity = max(1, granularity)
        self.max_batch = max(max_batch, self.granularity)
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._pending: deque[TileJob] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._workers: list[asyncio.Task[None]] = []

    @property
    def queued_tiles(self) -> int:
        """Tiles still wanted: cancelled ones behind live ones are not work (they are dropped when reached)."""
        return sum(not job.future.done() for job in self._pending)

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(r), name=f"batcher-{r.device}") for r in self.runners]

    def submit(self, pixels: torch.Tensor, with_router: bool) -> list[asyncio.Future[TileResult]]:
        """Queue an image's tiles; the futures resolve in any order, each with its tile's result."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[TileResult]] = []
        for tile in pixels:
            fut: asyncio.Future[TileResult] = loop.create_future()
            self._pending.append(TileJob(tile, with_router, fut))
            futures.append(fut)
        self._wakeup.set()
        return futures

    async def _wait(self, timeout: float | None) -> None:
        self._wakeup.clear()
        if timeout is None:
            await self._wakeup.wait()
        else:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _live(self) -> None:
        """Drop tiles whose request went away (client cancelled): computing them would be wasted."""
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()

    async def _next_batch(self) -> list[TileJob] | None:
        while True:
            self._live()
            if self._pending:
                break
            if self._closed:
                return None
            await self._wait(None)
        # Wait for company up to max_wait after the oldest tile arrived; tiles that already waited go at once.
        while len(self._pending) < self.max_batch and not self._closed:
            remaining = self._pending[0].enqueued_at + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                break
            await self._wait(remaining)
            self._live()
            if not self._pending:
                return []
        # Padding wastes compute: with at least one full micro-batch waiting, take whole micro-batches only and
        # leave the rest at the head of the queue (it goes first next time, padded only once it is alone).
        take = min(len(self._pending), self.max_batch)
        if take >= self.granularity:
            take -= take % self.granularity
        batch: list[TileJob] = []
        while self._pending and len(batch) < take:
            job = self._pending.popleft()
            if not job.future.done():
                batch.append(job)
        return batch

    async def _work(self, runner: DeviceRunner) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            t0 = time.monotonic()
            try:
                results = await loop.run_in_executor(runner.executor, runner.run, [j.pixels for j in batch],
                                                     [j.with_router for j in batch])
            except Exception as e:
                log.exception("batch failed", extra={"device": runner.device, "tiles": len(batch)})
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            for job, res in zip(batch, results, strict=True):
                if not job.future.done():
                    job.future.set_result(res)
            if self.on_batch:
                self.on_batch(len(batch), time.monotonic() - t0)

    async def close(self) -> None:
        """Finish everything queued, then stop the workers and their threads."""
        self._closed = True
        self._wakeup.set()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for r in self.runners:
            r.close()
