"""The standard gRPC health service (`grpc.health.v1.Health`) for both gRPC servers: readiness, and load.

Compose healthchecks, Kubernetes' native gRPC probes and `grpc_health_probe` all speak it. A server is SERVING only
while it can really do its work: not while its model or engine is still loading, not while it drains, not once
vLLM's engine has died (its port would stay open and a TCP probe would call it healthy). Each reply carries the
server's load in its trailing metadata (`LOAD_KEY`), which the pools balance by, and which server process answered
(`INSTANCE_KEY`); what a server is (model, limits, data port) comes from its Metadata call, read again whenever a
new process answers at the address.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import NamedTuple

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dvd.security import InternalAuth
from dvd.v2 import llm_pb2, vision_pb2

# The services' full names, as their servers register them and as readiness is asked for them.
LANGUAGE_SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LanguageService"].full_name
VISION_SERVICE = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name
LOAD_KEY = "dvd-load"  # a health reply's trailer: the server's load, in its own unit (requests, queued tiles)
INSTANCE_KEY = "dvd-instance"  # ... and the server process's own id: a restart between two probes still shows


class Reply(NamedTuple):
    ready: bool  # SERVING
    load: float
    instance: str = ""


class _LoadReportingServicer(health.aio.HealthServicer):
    def __init__(self, load: Callable[[], float]) -> None:
        super().__init__()
        self.load = load
        self.instance = uuid.uuid4().hex

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        reply = await super().Check(request, context)
        context.set_trailing_metadata(((LOAD_KEY, f"{self.load():g}"), (INSTANCE_KEY, self.instance)))
        return reply


class Health:
    def __init__(self, server: grpc.aio.Server, service_name: str, load: Callable[[], float] = lambda: 0.0) -> None:
        self.service_name = service_name
        self.servicer = _LoadReportingServicer(load)
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        self.serving: bool | None = None

    async def set(self, serving: bool) -> None:
        """Report the whole server ("") and its service by name; a no-op when nothing changed."""
        if serving == self.serving:
            return
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", self.service_name):
            await self.servicer.set(name, status)


async def probe(stub: health_pb2_grpc.HealthStub, service: str, timeout: float) -> Reply:
    """One Check: whether `service` is SERVING, and what its reply's trailers reported."""
    call = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    ready = (await call).status == health_pb2.HealthCheckResponse.SERVING
    trailers = dict(await call.trailing_metadata() or ())
    return Reply(ready, float(trailers.get(LOAD_KEY) or 0.0), str(trailers.get(INSTANCE_KEY) or ""))


def check(address: str, service: str = "", timeout: float = 2.0, auth: InternalAuth | None = None) -> bool:
    """One blocking probe, as a healthcheck command runs it: True when `address` reports SERVING. TLS settings
    come from the environment the service shares with its healthcheck (dvd.security)."""
    with (auth or InternalAuth.from_env()).channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=timeout)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    """`python3 -m dvd.health HOST:PORT [SERVICE]`: exit 0 when SERVING (a healthcheck command for compose)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    try:
        return 0 if check(args[0], args[1] if len(args) > 1 else "") else 1
    except grpc.RpcError:
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
