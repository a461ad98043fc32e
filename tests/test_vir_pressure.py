"""ViR under pressure (Flash): more tiles keep 64 rows while too many requests wait for a first token, never for
requests with vir "off", and the level steps back to the checkpoint's own rule once the queue is short."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import pytest

from dvd.v2 import llm_pb2_grpc, vision_pb2
from llm_server.vir_pressure import VirPressure
from tests.conftest import METRICS_URLS
from tests.helpers.llm import chat_request, image, text
from tests.helpers.media import image_bytes
from tests.helpers.vision import encode_sync, request
from vision_server.service import VirSettings

# 6+1 and 4+1 tiles the tiny Flash router splits (tests/test_llm_server.py's ViR test)
IMAGES = [image_bytes(1344, 896, seed=81), image_bytes(896, 896, seed=82)]
TILES = 12


def test_the_level_climbs_a_step_a_second_under_pressure_and_steps_back_without_it() -> None:
    v = VirPressure(waiting=4, interval_s=1.0)
    # A step at once when more than 4 wait, then one per whole second they still do, up to 1.
    assert [v.observe(n, t) for n, t in [(3, 10.0), (5, 10.0), (6, 10.5), (6, 11.0), (6, 12.1), (9, 13.2),
                                         (9, 14.3)]] == [0.0, 0.25, 0.25, 0.5, 0.75, 1.0, 1.0]
    # 4 or fewer from 14.5: a step down per whole second of that, read by the gauge between changes.
    assert v.observe(2, 14.5) == 1.0
    assert [v.level_at(t) for t in (15.0, 15.5, 16.5, 17.5, 18.5, 60.0)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert v.observe(1, 16.6) == 0.5
    assert v.observe(5, 16.7) == 0.75  # pressure again: a step at once (the last step up was long ago)
    assert v.observe(3, 16.9) == 0.75 and v.observe(5, 17.0) == 0.75  # a dip under a second: no step either way
    assert v.level_at(18.0) == 1.0
    off = VirPressure(waiting=0)
    assert off.observe(1000, 1.0) == 0.0 and off.level_at(2.0) == 0.0


def test_pressure_moves_the_thresholds_toward_the_floor_and_zero() -> None:
    vir = VirSettings(relative=0.5, absolute=0.3, floor=0.1)
    assert [tuple(round(t, 3) for t in vir.under(p)) for p in (0.0, 0.5, 1.0)] == [(0.5, 0.3), (0.3, 0.15),
                                                                                    (0.1, 0.0)]
    assert VirSettings(relative=0.05, absolute=0.0, floor=0.1).under(1.0) == (0.05, 0.0)  # never raised


def compressed(got) -> int:  # type: ignore[no-untyped-def]
    return sum(t.compressed for t in got.tiles)


def test_the_vision_server_compresses_more_tiles_under_pressure(vision_tiny_flash: str) -> None:
    def encoded(vir: int, pressure: float):  # type: ignore[no-untyped-def]
        req = request(IMAGES, vir=vir)
        req.options.vir_pressure = pressure
        return encode_sync(vision_tiny_flash, req)

    shares = [compressed(encoded(vision_pb2.VIR_MODE_AUTO, p)) for p in (0.0, 0.5, 1.0)]
    assert 0 < shares[0] < shares[1] < shares[2] <= TILES, shares
    assert compressed(encoded(vision_pb2.VIR_MODE_OFF, 1.0)) == 0  # "off" is never compressed
    with pytest.raises(grpc.RpcError) as err:
        encoded(vision_pb2.VIR_MODE_AUTO, 1.5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "vir_pressure" in err.value.details()


VIR_NAMES = {vision_pb2.VIR_MODE_AUTO: "auto", vision_pb2.VIR_MODE_OFF: "off"}


async def visual_tokens(address: str, vir: int, max_tokens: int = 2) -> int:
    req = chat_request([*(image(b) for b in IMAGES), text("Describe.")], max_tokens=max_tokens, temperature=0.0,
                       vir=VIR_NAMES[vir])
    async with grpc.aio.insecure_channel(address) as channel:
        msgs = [m async for m in llm_pb2_grpc.LanguageServiceStub(channel).Generate(req)]
    return msgs[-1].usage.visual_tokens


def gauge(address: str, name: str) -> float:
    for line in httpx.get(METRICS_URLS[address], timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


async def test_a_burst_bends_vir_and_the_quiet_after_it_restores_the_requests_own_rule(llm_tiny_flash: str) -> None:
    own = await visual_tokens(llm_tiny_flash, vision_pb2.VIR_MODE_AUTO)
    assert own < TILES * 256 and gauge(llm_tiny_flash, "dvd_llm_vir_pressure") == 0.0
    levels: list[float] = []

    async def watch() -> None:
        while True:
            levels.append(await asyncio.to_thread(gauge, llm_tiny_flash, "dvd_llm_vir_pressure"))
            await asyncio.sleep(0.05)

    watching = asyncio.create_task(watch())
    # 16 at once: from the third on, more than 2 wait for a first token (--vir-pressure-waiting 2 in the fixture).
    burst = await asyncio.gather(*(visual_tokens(llm_tiny_flash, vision_pb2.VIR_MODE_AUTO, 16) for _ in range(15)),
                                 visual_tokens(llm_tiny_flash, vision_pb2.VIR_MODE_OFF, 16))
    watching.cancel()
    assert burst[-1] == TILES * 256  # vir "off": never compressed, pressure or not
    assert min(burst[:-1]) < own and max(burst[:-1]) <= own, burst  # some took more 64-row tiles, none fewer
    assert max(levels) > 0, levels  # the metric showed the level
    deadline = time.monotonic() + 10
    while gauge(llm_tiny_flash, "dvd_llm_vir_pressure") > 0:
        assert time.monotonic() < deadline, "the level did not return to 0"
        await asyncio.sleep(0.25)
    assert await visual_tokens(llm_tiny_flash, vision_pb2.VIR_MODE_AUTO) == own
    assert gauge(llm_tiny_flash, "dvd_llm_first_token_pending") == 0
