"""The batcher's scheduling (with a fake device) and the runner's batch invariance (with the tiny model)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from prometheus_client import generate_latest

from vision_server.batcher import Batcher, DeviceRunner, TileResult
from vision_server.metrics import Metrics


class FakeRunner:
    """Records batch sizes; each tile's result is its own pixel value, so mix-ups show."""

    def __init__(self, delay: float = 0.0) -> None:
        self.device = "fake"
        self.delay = delay
        self.batches: list[int] = []
        self.executor = ThreadPoolExecutor(max_workers=1)

    def run(self, pixels: list[torch.Tensor], with_vir: list[bool]) -> list[TileResult]:
        self.batches.append(len(pixels))
        time.sleep(self.delay)
        now = time.monotonic()
        return [TileResult(p.flatten()[:1].clone(), None, now, now) for p in pixels]

    def close(self) -> None:
        self.executor.shutdown()


def _tiles(n: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()


async def test_batches_respect_max_batch_and_keep_tiles_apart() -> None:
    runner = FakeRunner(delay=0.05)
    batcher = Batcher([runner], max_batch=4, max_wait_s=0.01)  # type: ignore[list-item]
    batcher.start()
    futs = [batcher.submit(_tiles(n, 100 * k), False) for k, n in enumerate((3, 5, 2))]
    results = [[(await f).emb256.item() for f in fs] for fs in futs]
    await batcher.close()
    assert results == [[0, 1, 2], [100, 101, 102, 103, 104], [200, 201]]
    assert max(runner.batches) <= 4 and sum(runner.batches) == 10


async def test_waits_for_company_but_not_longer_than_max_wait() -> None:
    runner = FakeRunner()
    batcher = Batcher([runner], max_batch=8, max_wait_s=0.2)  # type: ignore[list-item]
    batcher.start()
    first = batcher.submit(_tiles(1), False)
    await asyncio.sleep(0.05)
    second = batcher.submit(_tiles(2, 10), False)
    t0 = time.monotonic()
    await asyncio.gather(*first, *second)
    assert runner.batches == [3]  # the late tiles joined the waiting one
    assert time.monotonic() - t0 < 0.5
    await batcher.close()


async def test_whole_micro_batches_first_remainder_next() -> None:
    runner = FakeRunner(delay=0.05)
    batcher = Batcher([runner], max_batch=8, max_wait_s=0.01, granularity=4)  # type: ignore[list-item]
    batcher.start()
    futs = batcher.submit(_tiles(6), False)
    assert [(await f).emb256.item() for f in futs] == [0, 1, 2, 3, 4, 5]
    await batcher.close()
    assert runner.batches == [4, 2]  # the two extra tiles did not pad a second micro-batch in the first batch


async def test_cancelled_tiles_are_skipped() -> None:
    runner = FakeRunner(delay=0.1)
    batcher = Batcher([runner], max_batch=2, max_wait_s=0.0)  # type: ignore[list-item]
    batcher.start()
    keep = batcher.submit(_tiles(2), False)
    drop = batcher.submit(_tiles(4, 50), False)
    await asyncio.sleep(0.02)  # the first batch is running
    for f in drop:
        f.cancel()
    await asyncio.gather(*keep)
    await batcher.close()
    assert runner.batches == [2]


async def test_close_finishes_queued_work() -> None:
    runner = FakeRunner(delay=0.02)
    batcher = Batcher([runner], max_batch=2, max_wait_s=0.0)  # type: ignore[list-item]
    batcher.start()
    futs = batcher.submit(_tiles(5), False)
    await batcher.close()
    assert all(f.done() and not f.cancelled() for f in futs)


def _tiny_flash_runner(ckpt: Path, micro_batch: int = 0) -> DeviceRunner:
    from vision_server.config import ModelConfig
    from vision_server.model import build_model
    from vision_server.weights import load_vision_weights

    cfg = ModelConfig.from_checkpoint(ckpt)
    return DeviceRunner(build_model(cfg, load_vision_weights(ckpt, True), "cpu", torch.float32), "cpu", micro_batch)


@pytest.mark.parametrize("micro_batch", [0, 4], ids=["variable", "padded"])
def test_runner_is_invariant_to_batch_neighbours_and_position(tiny_flash_ckpt: Path, micro_batch: int) -> None:
    """Same tile alone, first or last among others, with or without router neighbours: identical bytes and
    probability, and both projectors after the decision give the reference model's rows."""
    runner = _tiny_flash_runner(tiny_flash_ckpt, micro_batch)
    tiles = list(torch.randn(6, 3, 448, 448, generator=torch.Generator().manual_seed(3)))
    alone = runner.run(tiles[:1], [True])[0]
    crowd = runner.run(tiles[1:4] + tiles[:1] + tiles[4:], [False, True, False, True, True, False])
    assert alone.emb256 is None and alone.grid is not None and crowd[3].grid is not None
    assert torch.equal(crowd[3].p_compress, alone.p_compress)
    for compressed in (False, True):
        one = runner.project([alone.grid], compressed)[0]
        several = runner.project([crowd[1].grid, crowd[3].grid, crowd[4].grid], compressed)[1]
        assert torch.equal(several, one)
    plain_alone = runner.run(tiles[:1], [False])[0]
    plain_crowd = runner.run(tiles[1:4] + tiles[:1] + tiles[4:], [True, False, False, False, True, False])[3]
    assert plain_alone.emb256 is not None and torch.equal(plain_crowd.emb256, plain_alone.emb256)
    ref = runner.model(torch.stack(tiles[:1]), with_vir=True)
    assert torch.equal(plain_alone.emb256, ref.emb256[0].to(torch.bfloat16))
    assert torch.equal(runner.project([alone.grid], True)[0], ref.emb64[0].to(torch.bfloat16))
    assert torch.equal(alone.p_compress, ref.p_compress[0])
    runner.close()


def test_startup_check_proves_variable_groups_and_catches_batch_dependence(tiny_flash_ckpt: Path) -> None:
    """`--batching auto` relies on this check: true for the real kernels here, false when a tile's result
    depends on how many tiles share its forward."""
    runner = _tiny_flash_runner(tiny_flash_ckpt)
    assert runner.batch_invariant(4)
    features = runner.model.features
    runner.model.features = lambda x: features(x) * (1 + 1e-3 * (x.shape[0] > 2))  # type: ignore[method-assign]
    assert not runner.batch_invariant(4)
    runner.close()


def test_metrics_exposition() -> None:
    m = Metrics("tiny")
    m.bind_queue(lambda: 7)
    m.observe_batch(4, 0.1)
    m.observe_vir([True, False, False, True])
    m.request_done("ok", 0.2)
    text = generate_latest(m.registry).decode()
    assert 'dvd_vision_tiles_total{model_name="tiny"} 4.0' in text
    assert 'dvd_vision_queue_tiles{model_name="tiny"} 7.0' in text
    assert 'dvd_vision_vir_compressed_share{model_name="tiny"} 0.5' in text
    assert 'dvd_vision_vir_tiles_total{compressed="true",model_name="tiny"} 2.0' in text
    assert 'dvd_vision_batch_tiles_bucket{le="4.0",model_name="tiny"} 1.0' in text
    assert 'dvd_vision_requests_total{model_name="tiny",status="ok"} 1.0' in text
    assert "process_resident_memory_bytes" in text  # process metrics on the private registry too


async def test_one_worker_per_device_shares_the_queue() -> None:
    """`--devices cuda:0,cuda:1`: both devices pull from one queue, and every tile still gets its own result."""
    runners = [FakeRunner(delay=0.05), FakeRunner(delay=0.05)]
    batcher = Batcher(runners, max_batch=2, max_wait_s=0.0)  # type: ignore[arg-type]
    batcher.start()
    futs = [batcher.submit(_tiles(n, 100 * k), False) for k, n in enumerate((4, 3, 5))]
    results = [[(await f).emb256.item() for f in fs] for fs in futs]
    await batcher.close()
    for r in runners:
        r.close()
    assert results == [[0, 1, 2, 3], [100, 101, 102], [200, 201, 202, 203, 204]]
    assert all(r.batches for r in runners), f"a device sat idle: {[r.batches for r in runners]}"
    assert sum(sum(r.batches) for r in runners) == 12


async def test_queue_depth_ignores_cancelled_tiles() -> None:
    """Balancers and the queue-full check see only wanted work, even when cancelled tiles sit mid-queue."""
    batcher = Batcher([FakeRunner()], max_batch=4, max_wait_s=0.0)  # type: ignore[list-item]
    batcher.submit(_tiles(2), False)
    cancelled = batcher.submit(_tiles(3, 10), False)
    batcher.submit(_tiles(1, 20), False)
    assert batcher.queued_tiles == 6
    for f in cancelled:
        f.cancel()
    assert batcher.queued_tiles == 3


async def test_the_queue_knows_how_long_it_takes_to_drain() -> None:
    """Admission's clock: the batches' measured seconds per tile, shared by the runners pulling from the queue; a
    request is refused when the queue ahead of it would make it miss its deadline, never for its own size."""
    from vision_server.service import DEADLINE_SHARE, too_late

    runners = [FakeRunner(delay=0.05), FakeRunner(delay=0.05)]
    batcher = Batcher(runners, max_batch=2, max_wait_s=0.0)  # type: ignore[arg-type]
    assert batcher.drain_seconds(10) is None  # nothing measured: bound by the queue's size only
    batcher.start()
    try:
        futures = batcher.submit(torch.zeros(8, 1, 1, 1), False)
        await asyncio.gather(*futures)
    finally:
        await batcher.close()
    per_tile = batcher.tile_seconds
    assert per_tile is not None and 0.02 <= per_tile <= 0.5  # 0.05 s per batch of 2 on this machine's clock
    assert batcher.drain_seconds(100) == pytest.approx(100 * per_tile / 2)
    assert too_late(10.0, ahead=50, remaining=10.0)  # the queue ahead would make it miss
    assert not too_late(DEADLINE_SHARE * 10.0 - 0.1, ahead=50, remaining=10.0)
    assert not too_late(10.0, ahead=0, remaining=1.0)  # too big for its deadline alone: a timeout, not a 429
    assert not too_late(None, ahead=50, remaining=1.0)
