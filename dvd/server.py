"""How both gRPC servers start and wait: bound with the internal security settings, the standard health service
registered and NOT_SERVING until the caller says otherwise, a stop on SIGTERM/SIGINT, and the drain after it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from dvd.health import Health
from dvd.security import InternalAuth

DRAIN_POLL_S = 0.05  # how often a draining server looks whether its in-flight calls are done


async def start_server(auth: InternalAuth, host: str, port: int, register: Callable[[grpc.aio.Server], None],
                       service_name: str, load: Callable[[], float],
                       options: Sequence[tuple[str, Any]] = ()) -> tuple[grpc.aio.Server, Health, int]:
    """The started server, its health (NOT_SERVING: grpc.health.v1 would answer SERVING for "" until told; `load`
    goes with each reply), and the port it bound (port 0 = any free one)."""
    server = auth.server(options)
    register(server)
    health = Health(server, service_name, load)
    await health.set(False)
    bound = auth.add_port(server, f"{host}:{port}")
    if not bound:
        raise RuntimeError(f"could not bind {host}:{port}")
    await server.start()
    return server, health, bound


async def wait_for_stop() -> None:
    """Returns on the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def drain(server: grpc.aio.Server, health: Health, service: Any, grace: float) -> None:
    """Graceful stop: `service.ready` off (new calls are refused UNAVAILABLE, which callers retry elsewhere) and
    health NOT_SERVING, then in-flight calls (`service.inflight`) get up to `grace` seconds to finish, and only then
    does the server stop. Until then it keeps answering health checks, so probes and pools read NOT_SERVING rather
    than a refused connection; a server with nothing in flight stops at once."""
    service.ready = False
    await health.set(False)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while service.inflight > 0 and loop.time() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)
    await server.stop(max(deadline - loop.time(), 0.0))
