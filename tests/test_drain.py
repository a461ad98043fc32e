"""Rollouts cut no stream: SIGTERM, as Kubernetes and compose send it (to the container's main process only), to a
router, a vision server and a language server, each while 8 streaming requests of 20 s or more run through a
router. Every stream must end with all its tokens; requests that arrive during a drain go to another replica or get
a 503 with Retry-After; each drained process exits 0 once its work is done.

One stack of its own (two vision servers, one language server, two routers), since these tests stop its parts."""

from __future__ import annotations

import asyncio
import math
import signal
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from benchmarks.media import data_url, image_bytes
from dvd.procs import Service, router
from tests.conftest import start_llm, start_vision
from tests.helpers.router import user_message

STREAMS = 8
MIN_STREAM_S = 20.0
MAX_TOKENS_CAP = 15_000  # the test engines' context is 16384 tokens
EXIT_AFTER_DRAIN_S = 30.0


@dataclass
class Stack:
    visions: list[Service]
    llm: Service
    routers: list[Service]
    urls: list[str]  # the routers' base URLs (http://host:port/v1)
    max_tokens: int = 0  # tokens that take a stream MIN_STREAM_S or more here (measured once)


@dataclass
class Outcome:
    seconds: float
    steady_rate: float  # content chunks (tokens) per second over the stream's second half
    finish_reason: str | None
    completion_tokens: int


@pytest.fixture(scope="module")
def stack(tiny_ckpt: Path) -> Iterator[Stack]:
    started: list[Service] = []
    try:
        v1, a1 = start_vision("drain-vision-1", tiny_ckpt)
        started.append(v1)
        v2, a2 = start_vision("drain-vision-2", tiny_ckpt)
        started.append(v2)
        llm, address = start_llm("drain-llm", tiny_ckpt, f"{a1},{a2}", "--served-model-name", "tiny",
                                 "--vision-health-interval", "0.5")
        started.append(llm)
        routers = [router(address, "--health-interval", "0.5", name=f"drain-router-{k}") for k in (1, 2)]
        started += routers
        yield Stack([v1, v2], llm, routers, [f"{r.wait_http()}/v1" for r in routers])
    finally:
        for svc in started:
            svc.stop()


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)


async def stream(url: str, image_seed: int, max_tokens: int, started: asyncio.Queue[int]) -> Outcome:
    """One greedy stream that must run to `max_tokens` (EOS ignored); puts its seed on `started` at its first
    token."""
    t0 = time.monotonic()
    finish, usage, arrivals = None, 0, []
    async with client(url) as c:
        chunks = await c.chat.completions.create(
            model="tiny", messages=[user_message("Describe this image.",
                                                 images=(data_url(image_bytes(96, 64, seed=image_seed)),))],
            stream=True, max_tokens=max_tokens, temperature=0, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
                if len(arrivals) == 1:
                    started.put_nowait(image_seed)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                usage = chunk.usage.completion_tokens
    half = arrivals[len(arrivals) // 2:]
    rate = (len(half) - 1) / (half[-1] - half[0]) if len(half) > 1 and half[-1] > half[0] else 0.0
    return Outcome(time.monotonic() - t0, rate, finish, usage)


async def streams_then(url: str, seeds: range, max_tokens: int, during: object) -> list[Outcome]:
    """Start one stream per seed; once every one has its first token, await `during()` (the drain under test)."""
    started: asyncio.Queue[int] = asyncio.Queue()
    tasks = [asyncio.create_task(stream(url, s, max_tokens, started)) for s in seeds]
    for _ in seeds:
        waiter = asyncio.create_task(started.get())
        done, _pending = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED, timeout=120)
        if waiter not in done:  # a stream failed before its first token: report it
            waiter.cancel()
            for t in tasks:
                if t.done():
                    t.result()
            raise AssertionError("the streams did not start")
    await during()  # type: ignore[operator]
    return await asyncio.gather(*tasks)


def assert_complete(outcomes: list[Outcome], max_tokens: int) -> None:
    for o in outcomes:
        assert o.finish_reason == "length" and o.completion_tokens == max_tokens, o  # not cut, not truncated
        assert o.seconds >= MIN_STREAM_S, o


def wait_exit(svc: Service) -> int:
    return svc.proc.wait(EXIT_AFTER_DRAIN_S)


@pytest.fixture(scope="module")
def max_tokens(stack: Stack) -> int:
    """Tokens per stream so that 8 streams together last MIN_STREAM_S or more on this machine (with a margin): 8
    shorter streams measure the decode rate first."""
    if stack.max_tokens:
        return stack.max_tokens
    probe = 256

    async def rate() -> float:
        outcomes = await asyncio.gather(*(stream(stack.urls[0], 1000 + k, probe, asyncio.Queue())
                                          for k in range(STREAMS)))
        assert all(o.completion_tokens == probe for o in outcomes)
        return statistics.median(o.steady_rate for o in outcomes)

    stack.max_tokens = min(MAX_TOKENS_CAP, math.ceil(1.3 * MIN_STREAM_S * asyncio.run(rate())))
    return stack.max_tokens


def test_a_router_and_a_vision_server_drain_under_streams(stack: Stack, max_tokens: int) -> None:
    """Both at once (the engine is the slow part to share): 8 streams with images through the router that gets
    SIGTERM, while the first vision server gets SIGTERM too."""
    front, vision = stack.routers[1], stack.visions[0]

    async def during() -> None:
        # New images sent as the vision server's signal arrives: the ones it already holds finish there, the rest go
        # to the other vision server; none fails.
        async def ask(seed: int) -> str | None:
            async with client(stack.urls[0]) as c:
                answer = await c.chat.completions.create(
                    model="tiny", max_tokens=4,
                    messages=[user_message("What is it?", images=(data_url(image_bytes(640, 480, seed=seed)),))])
            return answer.choices[0].message.content

        asks = [asyncio.create_task(ask(2000 + k)) for k in range(6)]
        await asyncio.sleep(0.05)
        vision.proc.send_signal(signal.SIGTERM)  # the main process only, as a container runtime signals
        front.proc.send_signal(signal.SIGTERM)
        assert all(a is not None for a in await asyncio.gather(*asks))
        with pytest.raises(openai.APIConnectionError):  # its socket is closed: the Service sends clients elsewhere
            async with client(stack.urls[1]) as c:
                await c.models.list()
        assert front.alive()  # still draining: its streams run on

    outcomes = asyncio.run(streams_then(stack.urls[1], range(STREAMS), max_tokens, during))
    assert_complete(outcomes, max_tokens)
    assert wait_exit(vision) == 0
    # uvicorn re-raises the signal it caught once its graceful shutdown is over, so the exit status says SIGTERM.
    assert wait_exit(front) in (0, -signal.SIGTERM)


def test_a_language_server_drains_its_streams_and_new_requests_get_503(stack: Stack, max_tokens: int) -> None:
    draining = stack.llm

    async def during() -> None:
        draining.proc.send_signal(signal.SIGTERM)  # the main process only, as a container runtime signals
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(timeout=60) as http:  # no other language replica: 503 and when to retry
            reply = await http.post(f"{stack.urls[0]}/chat/completions",
                                    json={"model": "tiny", "max_tokens": 4, "messages": [user_message("Hi")]})
        assert reply.status_code == 503 and int(reply.headers["retry-after"]) >= 1, reply.text
        assert draining.alive()

    outcomes = asyncio.run(streams_then(stack.urls[0], range(200, 200 + STREAMS), max_tokens, during))
    assert_complete(outcomes, max_tokens)
    assert wait_exit(draining) == 0
