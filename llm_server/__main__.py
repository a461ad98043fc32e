"""`python -m llm_server --model DIR --port P --vision ADDR[,ADDR...] [vLLM engine options]`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from dvd.logs import log_format, setup_logging

# Before vLLM is imported (it configures its logging then, in this process and in each one it starts): vLLM's lines
# in the services' JSON format, with the request and trace ids.
if log_format() == "json":
    os.environ.setdefault("VLLM_LOGGING_CONFIG_PATH", str(Path(__file__).with_name("vllm_logging.json")))

from vllm.v1.engine.async_llm import AsyncLLM

from dvd.health import LANGUAGE_SERVICE, Health
from dvd.runtime import freeze_heap, report_ports, tune_allocator
from dvd.server import drain, start_server, wait_for_stop
from dvd.shm_orphans import remove_orphans
from dvd.tracing import setup_tracing
from dvd.v2 import llm_pb2_grpc
from llm_server.config import parse_args
from llm_server.embedding_cache import EmbeddingCache
from llm_server.service import LanguageService
from llm_server.vir_pressure import VirPressure
from llm_server.vision_pool import VisionPool
from llm_server.vllm_patches.engine_parent import ENGINE_PARENT_ENV

log = logging.getLogger("llm_server")
async def vision_parameters(engine: AsyncLLM) -> int:
    """Vision parameters the engine built, summed over its workers; -1 when they cannot be asked."""
    try:
        return int(sum(await engine.collective_rpc("dvd_vision_parameters", timeout=30)))
    except Exception as e:  # informational only: never block serving on it (e.g. another worker extension is set)
        log.warning("could not count vision parameters in the engine", extra={"error": repr(e)})
        return -1


async def watch_health(health: Health, service: LanguageService, engine: AsyncLLM, every_s: float = 1.0) -> None:
    """grpc.health.v1 follows the engine: NOT_SERVING once vLLM's engine has died, though the port stays open."""
    while True:
        await health.set(service.ready and not engine.errored)
        await asyncio.sleep(every_s)


async def serve() -> None:
    config, engine_args = parse_args()
    logging.getLogger().setLevel(engine_args.log_level or os.environ.get("DVD_LOG_LEVEL", "INFO"))  # vLLM's flag
    tune_allocator()
    # A container restarted in its pod (or a host whose last engine was SIGKILLed) still has the dead engine's
    # queues and semaphores in /dev/shm: nothing else would ever remove them.
    remove_orphans()
    os.environ[ENGINE_PARENT_ENV] = str(os.getpid())  # vLLM's engine processes die with this one (engine_parent.py)
    engine = AsyncLLM.from_engine_args(engine_args)
    model_config = engine.model_config
    # As vLLM's server: every --served-model-name is accepted, the first names the model; none = the model id.
    names = engine_args.served_model_name
    served_names = ([names] if isinstance(names, str) else list(names or ())) or [model_config.model]
    served_name = served_names[0]
    n_vision = await vision_parameters(engine)
    log.info("engine ready", extra={"model": served_name, "max_model_len": model_config.max_model_len,
                                    "vision_parameters": n_vision})
    pool = VisionPool(config.vision, hidden_size=model_config.hf_text_config.hidden_size,
                      timeout_s=config.vision_timeout, health_interval_s=config.vision_health_interval,
                      health_timeout_s=config.vision_health_timeout, transport=config.vision_transport,
                      shm_budget_bytes=int(config.vision_shm_gb * 2**30), data_threads=config.vision_data_threads,
                      auth=config.internal)
    await pool.start()
    if config.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port)
    service = LanguageService(engine, pool, served_name, aliases=served_names[1:], vision_parameters=n_vision,
                              cache=EmbeddingCache(int(config.embedding_cache_gb * 2**30), served_name),
                              chat=config.chat, vir_pressure=VirPressure(config.vir_pressure_waiting))
    server, health, bound = await start_server(
        config.internal, config.host, config.port,
        lambda s: llm_pb2_grpc.add_LanguageServiceServicer_to_server(service, s), LANGUAGE_SERVICE,
        service.load, options=[("grpc.max_receive_message_length", 256 * 2**20)])
    freeze_heap()
    report_ports(grpc=bound)
    log.info("language service listening", extra={"address": f"{config.host}:{bound}",
                                                  "vision": ",".join(config.vision)})
    watch = asyncio.create_task(watch_health(health, service, engine), name="health")
    await wait_for_stop()
    watch.cancel()
    log.info("shutting down: finishing in-flight calls", extra={"grace_s": config.deadlines.drain_s})
    await drain(server, health, service, config.deadlines.drain_s)
    await pool.close()
    engine.shutdown()


def _stop_while_starting(signum: int, _frame: object) -> None:
    """A stop before serving begins: kill the engine processes with us. vLLM's EngineCore only notes a SIGTERM
    while it starts and keeps waiting for its frontend, so a plain exit here would leave it running, orphaned."""
    from vllm.utils.system_utils import kill_process_tree

    log.warning("stopped while starting: killing the engine processes", extra={"signal": signum})
    kill_process_tree(os.getpid())


def main() -> None:
    setup_logging()
    setup_tracing("dvd-llm")
    signal.signal(signal.SIGTERM, _stop_while_starting)  # serve() installs the graceful handler once it serves
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
