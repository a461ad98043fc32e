"""The gateway's settings: one frozen dataclass that is also its command line (dvd.config)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dvd.backend_pool import AFFINITY_BALANCE
from dvd.config import MIB, ROUTER_PORT, Deadlines, LogOptions, MediaLimits, option, parse
from dvd.security import InternalAuth


@dataclass(frozen=True)
class RouterConfig:
    llm: tuple[str, ...] = option((), "language server addresses host:port; comma-separated or repeated",
                                  env="DVD_LLM")
    host: str = option("127.0.0.1", "address the HTTP API listens on", env="DVD_ROUTER_HOST")
    port: int = option(ROUTER_PORT, "HTTP port (0 = any free port, reported to a launcher)", env="DVD_ROUTER_PORT")
    metrics_port: int | None = option(
        None, "an internal port for /metrics and the detailed /ready (backend addresses and errors), to keep off "
        "the public one (0 = any free port, reported to a launcher); unset: /metrics on the API port, behind the "
        "API key, and no detailed /ready", env="DVD_ROUTER_METRICS_PORT")
    api_keys: tuple[str, ...] = option((), "accepted Bearer keys; comma-separated or repeated (none = no auth)",
                                       env=("DVD_API_KEY", "VLLM_API_KEY"), flag="--api-key")
    allow_private_image_urls: bool = option(
        False, "let image and video URLs reach loopback/private/link-local addresses (tests, trusted networks)",
        env="DVD_ALLOW_PRIVATE_IMAGE_URLS")
    max_body_bytes: int = option(32 * MIB, "413 above this")
    max_concurrency: int = option(256, "requests forwarded at once; more wait in the queue")
    max_queue: int = option(1024, "requests waiting for a slot; beyond this, 429")
    image_fetch_timeout: float = option(10.0, "seconds for one http(s) image or video, redirects included")
    max_image_redirects: int = option(3, "redirects followed for one image URL")
    max_image_total_bytes: int = option(128 * MIB, "all images and videos of one request together")
    health_interval: float = option(2.0, "seconds between health checks of each language server")
    routing: str = option("affinity", "how a request picks its language server: affinity (a conversation's "
                          "requests go to the replica holding its first image's embeddings and its prompt prefix, "
                          "while that replica's load stays within the bound; others by least load) or least-load",
                          env="DVD_ROUTING", choices=("affinity", "least-load"))
    affinity_balance: float = option(
        AFFINITY_BALANCE, "affinity's load bound: a conversation's replica keeps it while its requests stay within "
        "(1 + this) x the mean per replica, else it spills to the next replica on the hash ring")
    # Longer than clients and load balancers keep idle connections (nginx 75 s, AWS ALB 60 s, httpx 5 s): the side
    # that closes first must be the client, or a request sent as the server closes is lost (a reset: most likely the
    # one client ReadError the chaos suite saw under overload with uvicorn's 5 s default).
    keep_alive: float = option(75.0, "seconds an idle HTTP keep-alive connection stays open")
    media: MediaLimits = field(default_factory=MediaLimits)
    deadlines: Deadlines = field(default_factory=Deadlines)
    logs: LogOptions = field(default_factory=LogOptions)
    internal: InternalAuth = field(default_factory=InternalAuth)


def parse_args(argv: Sequence[str] | None = None) -> RouterConfig:
    config = parse(RouterConfig, argv, prog="python -m router",
                   description="OpenAI-compatible gateway for DvD language servers")
    if not config.llm:
        raise SystemExit("python -m router: error: at least one --llm address is required (or DVD_LLM)")
    return config
