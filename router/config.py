"""The gateway's settings, from the command line with environment fallbacks, as one frozen dataclass."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

MIB = 1024 * 1024


@dataclass(frozen=True)
class RouterConfig:
    llm: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: frozenset[str] = field(default_factory=frozenset)
    allow_private_image_urls: bool = False
    max_body_bytes: int = 32 * MIB
    max_concurrency: int = 256
    max_queue: int = 1024
    image_fetch_timeout: float = 10.0
    max_image_bytes: int = 20 * MIB
    max_image_redirects: int = 3
    max_images_per_request: int = 16
    max_image_total_bytes: int = 128 * MIB
    request_timeout: float = 600.0
    health_interval: float = 2.0


def _addresses(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(a.strip() for v in values for a in v.split(",") if a.strip())


def parse_args(argv: Sequence[str] | None = None) -> RouterConfig:
    p = argparse.ArgumentParser(prog="python -m router",
                                description="OpenAI-compatible gateway for DvD language servers")
    p.add_argument("--host", default=os.environ.get("DVD_ROUTER_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("DVD_ROUTER_PORT", "8000")))
    p.add_argument("--llm", action="append", default=[],
                   help="language server address host:port; comma-separated or repeated (env DVD_LLM)")
    p.add_argument("--api-key", action="append", default=[],
                   help="accepted Bearer key; repeatable (env DVD_API_KEY, comma-separated)")
    p.add_argument("--allow-private-image-urls", action="store_true",
                   default=os.environ.get("DVD_ALLOW_PRIVATE_IMAGE_URLS", "") == "1",
                   help="let image URLs reach loopback/private/link-local addresses (tests, trusted networks)")
    p.add_argument("--max-body-bytes", type=int, default=RouterConfig.max_body_bytes, help="413 above this")
    p.add_argument("--max-concurrency", type=int, default=RouterConfig.max_concurrency,
                   help="requests forwarded at once; more wait in the queue")
    p.add_argument("--max-queue", type=int, default=RouterConfig.max_queue,
                   help="requests waiting for a slot; beyond this, 429")
    p.add_argument("--image-fetch-timeout", type=float, default=RouterConfig.image_fetch_timeout,
                   help="seconds for one http(s) image, redirects included")
    p.add_argument("--max-image-bytes", type=int, default=RouterConfig.max_image_bytes)
    p.add_argument("--max-images-per-request", type=int, default=RouterConfig.max_images_per_request)
    p.add_argument("--max-image-total-bytes", type=int, default=RouterConfig.max_image_total_bytes,
                   help="all images of one request together")
    p.add_argument("--request-timeout", type=float, default=RouterConfig.request_timeout,
                   help="seconds from request to last token; 504 after")
    p.add_argument("--health-interval", type=float, default=RouterConfig.health_interval)
    a = p.parse_args(argv)
    llm = _addresses(a.llm or [os.environ.get("DVD_LLM", "")])
    if not llm:
        p.error("at least one --llm address is required (or DVD_LLM)")
    keys = frozenset(_addresses([*a.api_key, os.environ.get("DVD_API_KEY", "")]))
    return RouterConfig(llm=llm, host=a.host, port=a.port, api_keys=keys,
                        allow_private_image_urls=a.allow_private_image_urls, max_body_bytes=a.max_body_bytes,
                        max_concurrency=a.max_concurrency, max_queue=a.max_queue,
                        image_fetch_timeout=a.image_fetch_timeout, max_image_bytes=a.max_image_bytes,
                        max_images_per_request=a.max_images_per_request,
                        max_image_total_bytes=a.max_image_total_bytes,
                        request_timeout=a.request_timeout, health_interval=a.health_interval)
