"""Command line of `python -m llm_server`: our few options plus every vLLM engine option, passed through."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser

from dvd.config import EMPTY_MODEL, LLM_PORT, Deadlines, add_options, from_namespace, option
from dvd.data_plane import TRANSPORTS
from dvd.security import InternalAuth
from llm_server.answer import ChatOptions
from llm_server.worker_extension import QUALNAME as WORKER_EXTENSION


@dataclass(frozen=True)
class LlmServerConfig:
    """Our options; vLLM's engine options come through AsyncEngineArgs beside them."""

    host: str = option("0.0.0.0", "address gRPC and metrics listen on")
    port: int = option(LLM_PORT, "gRPC port (0 = any free port, reported to a launcher)")
    vision: tuple[str, ...] = option((), "vision server addresses host:port; comma-separated or repeated")
    vision_timeout: float = option(120.0, "deadline of one Encode call, seconds")
    vision_health_interval: float = option(2.0, "seconds between health checks of each vision server")
    vision_health_timeout: float = option(2.0, "seconds one health check of a vision server may take (three late "
                                               "in a row take it out of rotation)")
    vision_data_threads: int = option(8, "threads that copy embedding bytes off shared memory and TCP into the "
                                         "images' tensors")
    vision_transport: str = option(
        "auto", "how embedding bytes travel from the vision servers: shm (shared memory, same host), tcp (the "
        "vision server's data port), grpc (inline, the fallback); auto = shm where the server shares this host's "
        "/dev/shm, else tcp where it has a data port, else grpc", choices=TRANSPORTS)
    vision_shm_gb: float = option(1.0, "shared memory for embeddings in flight from vision servers on this host")
    embedding_cache_gb: float = option(2.0, "host memory for embeddings of recently seen images (0 = off): a "
                                            "resent image costs no vision call and no transfer")
    vir_pressure_waiting: int = option(
        0, "Flash checkpoints: above this many requests waiting for their first token, ask the vision side to "
        "compress more tiles to 64 rows, one step a second, and step back once fewer wait (0 = off; the vision "
        "server's --vir-pressure-floor bounds it; requests with vir \"off\" are never compressed)",
        env="DVD_VIR_PRESSURE_WAITING")
    chat: ChatOptions = field(default_factory=ChatOptions)
    metrics_port: int = option(0, "Prometheus port (0 = off)")
    deadlines: Deadlines = field(default_factory=Deadlines)
    internal: InternalAuth = field(default_factory=InternalAuth)


def build_parser() -> FlexibleArgumentParser:
    parser = FlexibleArgumentParser(
        prog="python -m llm_server",
        description="DvD language service: vLLM with the language model only; image embeddings come from the "
        "vision pool. All vLLM engine options (--max-model-len, --tensor-parallel-size, --dtype, ...) apply.",
    )
    add_options(parser.add_argument_group("dvd"), LlmServerConfig)
    AsyncEngineArgs.add_cli_args(parser)
    parser.set_defaults(trust_remote_code=True)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[LlmServerConfig, AsyncEngineArgs]:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = from_namespace(LlmServerConfig, args)
    if not args.model.strip():  # compose passes "${MODEL:-}": refused here, where the service starts
        parser.error(EMPTY_MODEL)
    if args.vision is not None and not config.vision:  # given but empty ("${VISION_ADDRS:-}")
        parser.error("no vision server: set VISION_ADDRS (--vision host:port[,host:port])")
    if config.chat.enable_auto_tool_choice and not config.chat.tool_call_parser:
        parser.error("--enable-auto-tool-choice requires --tool-call-parser")  # as vLLM's server says
    return config, engine_args_for_dvd(args)


def engine_args_for_dvd(args: argparse.Namespace) -> AsyncEngineArgs:
    """vLLM's engine args, forced to skip the vision tower while still accepting image embeddings."""
    engine_args = AsyncEngineArgs.from_cli_args(args)
    engine_args.enable_mm_embeds = True
    # InternVL's tower serves images and videos: vLLM skips building it only when both limits are 0.
    engine_args.limit_mm_per_prompt = {"image": 0, "video": 0}
    if not engine_args.worker_extension_cls:  # lets the server ask the workers what they built, by name
        engine_args.worker_extension_cls = WORKER_EXTENSION
    return engine_args
