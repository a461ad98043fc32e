"""A burst of simultaneous image requests: every one must be answered 200, or refused 429 with Retry-After.

    python benchmarks/burst.py                                   # dvd-local's stack on `tiny`, 200 one-image requests
    python benchmarks/burst.py --requests 120 --images 3 --size 896x672
    python benchmarks/burst.py --transport tcp                   # the language server's --vision-transport
    python benchmarks/burst.py --base-url http://127.0.0.1:8000  # a stack that is already running

All requests are sent at once (one connection each), as many users pressing enter in the same second; the stack
must then answer a normal request. Prints the outcome counts and exits 1 on any other outcome. `burst()` is what the
chaos suite's burst scenario runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from benchmarks.media import data_url, image_bytes, video_bytes

ACCEPTED = ("200", "429")  # an answer, or a refusal the client may retry when it is told to


@dataclass
class BurstResult:
    statuses: Counter[str] = field(default_factory=Counter)
    retry_after_missing: int = 0  # 429s without Retry-After
    errors: list[str] = field(default_factory=list)  # a few bodies of unacceptable answers, for the report
    seconds: float = 0.0
    after: str = ""  # the outcome of one normal request once the burst is over

    @property
    def ok(self) -> bool:
        return (set(self.statuses) <= set(ACCEPTED) and not self.retry_after_missing and self.after == "200")

    def figure(self) -> str:
        counts = ", ".join(f"{n} x {s}" for s, n in sorted(self.statuses.items()))
        return f"{counts}; then {self.after}" + (f"; {self.retry_after_missing} 429 without Retry-After"
                                                 if self.retry_after_missing else "")


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h)


def jpeg(width: int, height: int, seed: int) -> str:
    return data_url(image_bytes(width, height, seed=seed, fmt="JPEG"), "image/jpeg")


def body(model: str, parts: list[dict[str, Any]], max_tokens: int) -> bytes:
    return json.dumps({"model": model, "max_tokens": max_tokens, "temperature": 0, "messages": [
        {"role": "user", "content": [*parts, {"type": "text", "text": "Describe it."}]}]}).encode()


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def plain_bodies(model: str, n: int, images: int, sizes: list[tuple[int, int]], max_tokens: int,
                 seed: int = 0) -> list[bytes]:
    """`n` requests of `images` distinct JPEGs each, sizes drawn from `sizes` (no two requests share an image, so
    every one is a vision call: the embedding cache would otherwise answer most of them)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        parts = [image_part(jpeg(*rng.choice(sizes), seed=seed * 100_000 + i * 16 + k)) for k in range(images)]
        out.append(body(model, parts, max_tokens))
    return out


# (width, height) -> tiles at max_dynamic_patch 12: 448x448 -> 1, 896x448 -> 2 + thumbnail, 896x896 -> 4 + 1,
# 1344x896 -> 6 + 1, 1792x1344 -> 12 + 1 (InternVL's 448 px tiles)
MIX_SIZES = [(448, 448), (896, 448), (896, 896), (1344, 896), (1792, 1344)]


def mixed_bodies(model: str, n: int, max_tokens: int, seed: int = 0, weights: Sequence[float] = (1, 1, 1, 1, 1),
                 most_images: int = 3) -> list[bytes]:
    """The mixed burst: images of 1 to 13 tiles (MIX_SIZES, drawn with `weights`), one to `most_images` per
    request, and every fifth request a short video (4 frames); all distinct, so none is served from a cache."""
    rng = random.Random(seed)
    clip = video_bytes(64, 64, frames=4, fps=4.0, seed=seed)
    out = []
    for i in range(n):
        parts = [image_part(jpeg(*rng.choices(MIX_SIZES, weights)[0], seed=seed * 100_000 + i * 16 + k))
                 for k in range(rng.randint(1, most_images))]
        if i % 5 == 4:  # trailing bytes make each clip distinct; containers ignore them
            parts.append({"type": "video_url", "video_url": {"url": data_url(clip + i.to_bytes(4, "little"),
                                                                             "video/mp4")}})
        out.append(body(model, parts, max_tokens))
    return out


async def _send(session: aiohttp.ClientSession, base: str, payload: bytes, timeout: float,
                result: BurstResult) -> str:
    try:
        async with session.post(f"{base}/v1/chat/completions", data=payload,
                                headers={"content-type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            text = await r.text()
            status = str(r.status)
            if status == "429" and not r.headers.get("retry-after"):
                result.retry_after_missing += 1
            if status not in ACCEPTED and len(result.errors) < 5:
                result.errors.append(f"{status}: {text[:300]}")
    except TimeoutError:
        status = "hung"
    except aiohttp.ClientError as e:
        status = f"transport error ({type(e).__name__})"
    return status


async def burst(base: str, bodies: list[bytes], after: bytes, timeout: float = 300.0) -> BurstResult:
    """Send every body at once, then `after` alone; `base` is the router's http://host:port."""
    result = BurstResult()
    # One connection per request: the burst reaches the router as simultaneous connections, not a client queue.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.monotonic()
        statuses = await asyncio.gather(*(_send(session, base, b, timeout, result) for b in bodies))
        result.seconds = time.monotonic() - t0
        result.statuses = Counter(statuses)
        result.after = await _send(session, base, after, timeout, result)
    return result


def body_media(payload: bytes) -> list[Any]:
    """The files of one burst body (data URLs), as the language server hands them on (vision_pb2.Media)."""
    from dvd.v2 import vision_pb2

    return [vision_pb2.Media(kind=vision_pb2.MEDIA_KIND_VIDEO if part["type"] == "video_url"
                             else vision_pb2.MEDIA_KIND_IMAGE,
                             data=base64.b64decode(part[part["type"]]["url"].split(",", 1)[1]))
            for part in json.loads(payload)["messages"][0]["content"] if part["type"] in ("image_url", "video_url")]


async def pool_burst(vision: str, transport: str, bodies: list[bytes], after: bytes,
                     shm_bytes: int = 64 * 2**20) -> BurstResult:
    """The same burst one step further in: every body's files at once through the language server's own vision
    client (`VisionPool`, one channel, `transport` as its --vision-transport), without a language model. An answer
    counts as 200, a refusal the language server turns into 429 + Retry-After (RESOURCE_EXHAUSTED) as 429."""
    import grpc

    from dvd.errors import ServiceError
    from dvd.v2 import vision_pb2, vision_pb2_grpc
    from llm_server.vision_pool import VisionPool

    async with grpc.aio.insecure_channel(vision) as channel:
        hidden = (await vision_pb2_grpc.VisionServiceStub(channel).Metadata(vision_pb2.MetadataRequest(),
                                                                             timeout=10)).hidden_size
    pool = VisionPool((vision,), hidden_size=hidden, timeout_s=300, transport=transport, shm_budget_bytes=shm_bytes)
    result = BurstResult()

    async def one(k: int, payload: bytes) -> str:
        try:
            await pool.encode(f"burst-{transport}-{k}", body_media(payload), vision_pb2.EncodeOptions())
            return "200"
        except ServiceError as e:
            if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return "429"
            if len(result.errors) < 5:
                result.errors.append(f"{e.code.name}: {e}")
            return e.code.name

    await pool.start()
    try:
        t0 = time.monotonic()
        result.statuses = Counter(await asyncio.gather(*(one(k, b) for k, b in enumerate(bodies))))
        result.seconds = time.monotonic() - t0
        result.after = await one(-1, after)
    finally:
        await pool.close()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/burst.py", description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="", help="a running router (http://host:port); default: start dvd-local's "
                                                  "stack on --model")
    p.add_argument("--model", default="tiny")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--size", default="300x400,600x400,450x400",
                   help="image sizes WxH, comma-separated (each request draws from them); 'mixed' for 1-13 tiles, "
                        "1-3 images and videos")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--transport", default="auto", choices=("auto", "shm", "tcp", "grpc"),
                   help="the language server's --vision-transport, when this starts the stack")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model = args.model
    if args.size == "mixed":
        bodies = mixed_bodies(model, args.requests, args.max_tokens, args.seed)
    else:
        bodies = plain_bodies(model, args.requests, args.images, [parse_size(s) for s in args.size.split(",")],
                              args.max_tokens, args.seed)
    after = body(model, [image_part(jpeg(448, 448, seed=7))], args.max_tokens)
    if args.base_url:
        result = asyncio.run(burst(args.base_url.rstrip("/").removesuffix("/v1"), bodies, after))
    else:
        from router.local import start_stack

        with start_stack(model, 0, llm_args=["--vision-transport", args.transport]) as stack:
            result = asyncio.run(burst(stack.base_url.removesuffix("/v1"), bodies, after))
    from benchmarks.machine import machine

    print(f"{args.requests} simultaneous requests ({args.size}, {args.images} image(s) each, transport "
          f"{args.transport}) on {machine()['cpu_model']}: {result.figure()} in {result.seconds:.1f} s")
    for e in result.errors:
        print("  " + e)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
