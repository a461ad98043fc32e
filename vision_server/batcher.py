"""Dynamic batching of tiles from concurrent requests, without letting the batch change any tile's numbers.

Tiles never interact inside the model (attention is per tile), so a batch can only change a tile's bytes through
the kernels it meets: BLAS/oneDNN/cuBLAS pick algorithms (and summation orders) by shape. Two ways to keep a
request's bytes identical alone or inside a busy batch:

- `variable` groups: a forward runs on exactly the tiles that are waiting, no padding. Every batched op works on
  rows of at least one whole tile (1025 ViT tokens, 256 or 64 projector rows) and a tile's rows meet the same
  reduction whatever the row count; the ops with one row per tile (the ViR router's query and gating) run one
  tile at a time. `auto` proves this on the device at start-up (every group size up to the largest batch, every
  position, bit for bit) and falls back to `padded` where it does not hold.
- `padded` micro-batches: every forward runs on exactly `micro_batch` tiles (short groups are zero-padded), so
  shapes never change; it computes padding whenever fewer tiles wait.

The ViR decision is not taken here: it needs all tiles of a request, which may land in different batches. Router
tiles therefore come back as ViT features plus the router's probability, and are projected later by `project()`
with only the projector the decision picked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from dvd.core_budget import CoreBudget
from vision_server.model import VisionModel

log = logging.getLogger("vision_server.batcher")


@dataclass
class TileResult:
    emb256: torch.Tensor | None  # (256, H) bf16 on CPU; None for router tiles (projected after the decision)
    p_compress: torch.Tensor | None  # 0-d, in the model dtype (the decision compares in that dtype, as upstream)
    compute_start: float
    compute_end: float
    grid: torch.Tensor | None = None  # router tiles: (side, side, D) ViT features, on the device
    runner: DeviceRunner | None = None  # where `grid` lives


@dataclass
class TileJob:
    pixels: torch.Tensor  # (3, S, S) float32
    with_vir: bool
    future: asyncio.Future[TileResult]
    enqueued_at: float = field(default_factory=time.monotonic)


class DeviceRunner:
    """One model copy on one device, fed from a single thread; `micro_batch` > 0 pads every forward to that shape."""

    def __init__(self, model: VisionModel, device: str, micro_batch: int = 0) -> None:
        self.model = model
        self.device = device
        self.micro_batch = micro_batch
        self.dtype = next(model.parameters()).dtype
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vision-{device}")
        # CPU hosts shared with a language engine (dvd/core_budget.py); only set where thread_invariant() holds.
        self.budget: CoreBudget | None = None
        self._threads = torch.get_num_threads()

    @contextlib.contextmanager
    def _cores(self) -> Iterator[None]:
        """A batch's cores under the core budget: the runner's thread is pinned to them, and the OpenMP pool
        shrinks to their number (its threads float; they idle while it is 1)."""
        budget = self.budget
        if budget is None:
            yield
            return
        budget.set_vision_busy(True)
        cpus = budget.vision_cpus()
        try:
            os.sched_setaffinity(0, cpus)  # the calling thread only
            torch.set_num_threads(min(self._threads, len(cpus)))
            yield
        finally:
            budget.set_vision_busy(False)
            os.sched_setaffinity(0, budget.cpus)
            torch.set_num_threads(self._threads)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """`fn` over the leading dimension: in one call, or in zero-padded fixed micro-batches."""
        mb = self.micro_batch
        if mb <= 0:
            return fn(x)
        outs = []
        for lo in range(0, x.shape[0], mb):
            part = x[lo:lo + mb]
            k = part.shape[0]
            if k < mb:
                part = torch.cat([part, part.new_zeros((mb - k, *part.shape[1:]))])
            outs.append(fn(part)[:k])
        return torch.cat(outs)

    @torch.inference_mode()
    def run(self, pixels: list[torch.Tensor], with_vir: list[bool]) -> list[TileResult]:
        """Tiles in, per-tile results out, in order; runs on the runner's own thread."""
        with self._cores():
            return self._run(pixels, with_vir)

    def _run(self, pixels: list[torch.Tensor], with_vir: list[bool]) -> list[TileResult]:
        start = time.monotonic()
        model = self.model
        grid = self._apply(model.features, torch.stack(pixels).to(self.device, non_blocking=True))
        plain = [i for i, r in enumerate(with_vir) if not r]
        emb = self._to_host(self._apply(lambda g: model.project(g, compressed=False), grid[plain])) if plain else []
        out: list[TileResult] = []
        k = 0
        for i, router in enumerate(with_vir):
            if router:  # one tile per router call: its GEMMs have one row per tile (see VisionModel.route)
                g = grid[i:i + 1]
                out.append(TileResult(None, model.route(g, 1)[0].cpu(), start, 0.0, grid=g, runner=self))
            else:
                out.append(TileResult(emb[k], None, start, 0.0))
                k += 1
        end = time.monotonic()
        for r in out:
            r.compute_end = end
        return out

    @torch.inference_mode()
    def project(self, grids: list[torch.Tensor], compressed: bool) -> list[torch.Tensor]:
        """Router tiles after the decision: (1, side, side, D) features -> bf16 rows on the host, one per tile."""
        with self._cores():
            return self._project(grids, compressed)

    def _project(self, grids: list[torch.Tensor], compressed: bool) -> list[torch.Tensor]:
        x = torch.cat(grids)
        return list(self._to_host(self._apply(lambda g: self.model.project(g, compressed=compressed), x)))

    @staticmethod
    def _to_host(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16).cpu()

    def measure_tile_seconds(self, tiles: int) -> float:
        """Seconds per tile of one warm batch of `tiles`: the queue's first estimate, before any request ran."""
        side = self.model.cfg.image_size
        t0 = time.monotonic()
        self.run([torch.zeros(3, side, side)] * tiles, [False] * tiles)
        return (time.monotonic() - t0) / tiles

    def warmup(self, with_vir: bool) -> None:
        side = self.model.cfg.image_size
        res = self.run([torch.zeros(3, side, side)] * 2, [with_vir, False])
        if res[0].grid is not None:
            self.project([res[0].grid], compressed=True)
            self.project([res[0].grid], compressed=False)

    @torch.inference_mode()
    def _tile_outputs(self, group: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """Every output the server sends for each tile of `group`, in one forward: its 256-token rows, and on Flash
        checkpoints also the router's probability and the compressed projector's rows."""
        plain = self._run(group, [False] * len(group))
        rows: list[tuple[torch.Tensor, ...]] = [(r.emb256,) for r in plain]  # type: ignore[misc]
        if self.model.cfg.flash:
            routed = self._run(group, [True] * len(group))
            emb64 = self._project([r.grid for r in routed], True)  # type: ignore[misc]
            rows = [(*row, r.p_compress, e) for row, r, e in zip(rows, routed, emb64, strict=True)]  # type: ignore
        return rows

    @staticmethod
    def _same(got: list[tuple[torch.Tensor, ...]], ref: list[tuple[torch.Tensor, ...]]) -> bool:
        return all(torch.equal(a, b) for g, r in zip(got, ref, strict=False) for a, b in zip(g, r, strict=True))

    def batch_invariant(self, max_batch: int) -> bool:
        """Whether unpadded groups of every size up to `max_batch` give each tile, at every position, the same
        bytes as a forward of that tile alone (both projectors on Flash checkpoints)."""
        side = self.model.cfg.image_size
        tiles = list(torch.randn(max_batch, 3, side, side, generator=torch.Generator().manual_seed(0)))
        alone = [self._tile_outputs([t])[0] for t in tiles]
        return all(self._same(self._tile_outputs(tiles[:n]), alone) for n in range(2, max_batch + 1))

    def thread_invariant(self, threads: int) -> bool:
        """Whether a tile's bytes are the same computed with `threads` OpenMP threads as with the runner's own
        count (the core budget changes it with the language engine's load)."""
        side = self.model.cfg.image_size
        tiles = list(torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1)))
        ref = self._tile_outputs(tiles)
        torch.set_num_threads(threads)
        try:
            return self._same(self._tile_outputs(tiles), ref)
        finally:
            torch.set_num_threads(self._threads)

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
        # Wall seconds per tile of a batch on one runner, a moving average (contention with whatever shares the
        # device included): what admission uses to tell how long the queue takes to drain. None: not measured.
        self.tile_seconds: float | None = None
        self._pending: deque[TileJob] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._workers: list[asyncio.Task[None]] = []

    @property
    def queued_tiles(self) -> int:
        """Tiles still wanted: cancelled ones behind live ones are not work (they are dropped when reached)."""
        return sum(not job.future.done() for job in self._pending)

    def drain_seconds(self, tiles: int) -> float | None:
        """About how long `tiles` queued tiles take to compute, every runner pulling from the queue."""
        return None if self.tile_seconds is None else tiles * self.tile_seconds / len(self.runners)

    def _observe(self, tiles: int, seconds: float) -> None:
        per_tile = seconds / tiles
        self.tile_seconds = per_tile if self.tile_seconds is None else 0.8 * self.tile_seconds + 0.2 * per_tile

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(r), name=f"batcher-{r.device}") for r in self.runners]

    def submit(self, pixels: torch.Tensor, with_vir: bool) -> list[asyncio.Future[TileResult]]:
        """Queue an image's tiles; the futures resolve in any order, each with its tile's result."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[TileResult]] = []
        for tile in pixels:
            fut: asyncio.Future[TileResult] = loop.create_future()
            self._pending.append(TileJob(tile, with_vir, fut))
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
                                                     [j.with_vir for j in batch])
            except Exception as e:
                log.exception("batch failed", extra={"device": runner.device, "tiles": len(batch)})
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            for job, res in zip(batch, results, strict=True):
                if not job.future.done():
                    job.future.set_result(res)
            seconds = time.monotonic() - t0
            self._observe(len(batch), seconds)
            if self.on_batch:
                self.on_batch(len(batch), seconds)

    async def close(self) -> None:
        """Finish everything queued, then stop the workers and their threads."""
        self._closed = True
        self._wakeup.set()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for r in self.runners:
            r.close()
