"""Command line of `python -m llm_server`: our few options plus every vLLM engine option, passed through."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser

from dvd.data_plane import TRANSPORTS


@dataclass(frozen=True)
class LlmServerConfig:
    host: str
    port: int
    vision: tuple[str, ...]
    vision_timeout_s: float
    vision_health_interval_s: float
    metrics_port: int
    grace_s: float
    embedding_cache_bytes: int
    vision_transport: str
    vision_shm_bytes: int


def build_parser() -> FlexibleArgumentParser:
    parser = FlexibleArgumentParser(
        prog="python -m llm_server",
        description="DvD language service: vLLM with the language model only; image embeddings come from the "
        "vision pool. All vLLM engine options (--max-model-len, --tensor-parallel-size, --dtype, ...) apply.",
    )
    group = parser.add_argument_group("dvd")
    group.add_argument("--host", default="0.0.0.0")
    group.add_argument("--port", type=int, default=50061, help="gRPC port (0 = any free port, reported to a launcher)")
    group.add_argument("--vision", default="", help="comma-separated vision server addresses (host:port)")
    group.add_argument("--vision-timeout", type=float, default=120.0, help="deadline of one Encode call, seconds")
    group.add_argument("--vision-health-interval", type=float, default=2.0)
    group.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0 = off)")
    group.add_argument("--embedding-cache-gb", type=float, default=2.0,
                       help="host memory for embeddings of recently seen images (0 = off): a resent image costs "
                            "no vision call and no transfer")
    group.add_argument("--vision-transport", choices=TRANSPORTS, default="auto",
                       help="how embedding bytes travel from the vision servers: shm (shared memory, same host), "
                            "tcp (the vision server's data port), grpc (inline, the fallback); auto = shm where the "
                            "server shares this host's /dev/shm, else tcp where it has a data port, else grpc")
    group.add_argument("--vision-shm-gb", type=float, default=1.0,
                       help="shared memory for embeddings in flight from vision servers on this host")
    group.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get on shutdown")
    AsyncEngineArgs.add_cli_args(parser)
    parser.set_defaults(trust_remote_code=True)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[LlmServerConfig, AsyncEngineArgs]:
    args = build_parser().parse_args(argv)
    config = LlmServerConfig(
        host=args.host,
        port=args.port,
        vision=tuple(a.strip() for a in args.vision.split(",") if a.strip()),
        vision_timeout_s=args.vision_timeout,
        vision_health_interval_s=args.vision_health_interval,
        metrics_port=args.metrics_port,
        grace_s=args.grace,
        embedding_cache_bytes=int(args.embedding_cache_gb * 2**30),
        vision_transport=args.vision_transport,
        vision_shm_bytes=int(args.vision_shm_gb * 2**30),
    )
    return config, engine_args_for_dvd(args)


def engine_args_for_dvd(args: argparse.Namespace) -> AsyncEngineArgs:
    """vLLM's engine args, forced to skip the vision tower while still accepting image embeddings."""
    engine_args = AsyncEngineArgs.from_cli_args(args)
    engine_args.enable_mm_embeds = True
    # InternVL's tower serves images and videos: vLLM skips building it only when both limits are 0.
    engine_args.limit_mm_per_prompt = {"image": 0, "video": 0}
    return engine_args
