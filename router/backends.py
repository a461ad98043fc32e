"""The pool of language servers: health-checked, least-outstanding-requests choice, retry before the first token.

A request is retried on another replica only when its failure proves no work reached the client (the replica was
unreachable before the first response); once a token went out, a retry would duplicate or contradict it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from dvd.security import InternalAuth
from dvd.v1 import llm_pb2, llm_pb2_grpc

log = logging.getLogger("router.backends")

# Codes that say the replica never took the request (not the request's fault): worth another replica.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
# Images travel inside the request; keep the channel's own limits out of the way (the router enforces its own).
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


class NoBackendError(Exception):
    """No replica is ready (or every ready one refused the request as unreachable)."""


@dataclass
class Backend:
    address: str
    channel: grpc.aio.Channel
    stub: llm_pb2_grpc.LanguageServiceStub
    ready: bool = False
    model: str = ""
    max_model_len: int = 0
    running_requests: int = 0
    outstanding: int = 0  # requests this router has in flight on it
    last_error: str = field(default="not checked yet")


class BackendPool:
    def __init__(self, addresses: tuple[str, ...], health_interval: float = 2.0, health_timeout: float = 2.0,
                 auth: InternalAuth | None = None) -> None:
        self._addresses = addresses
        self._auth = auth or InternalAuth()
        self._interval = health_interval
        self._timeout = health_timeout
        self.backends: list[Backend] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Channels must be created on the serving event loop, hence not in __init__."""
        for address in self._addresses:
            channel = self._auth.aio_channel(address, CHANNEL_OPTIONS)
            self.backends.append(Backend(address, channel, llm_pb2_grpc.LanguageServiceStub(channel)))
        await self.check_all()
        self._task = asyncio.create_task(self._health_loop(), name="backend-health")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(b.channel.close() for b in self.backends))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(b) for b in self.backends))

    async def _check(self, backend: Backend) -> None:
        try:
            health = await backend.stub.Health(llm_pb2.LanguageHealthRequest(), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            self._set_down(backend, f"{exc.code().name}: {exc.details()}")
            return
        if health.ready != backend.ready:
            log.info("backend %s", "ready" if health.ready else "not ready",
                     extra={"backend": backend.address, "model": health.model})
        backend.ready, backend.model = health.ready, health.model
        backend.max_model_len, backend.running_requests = health.max_model_len, health.running_requests
        backend.last_error = "" if health.ready else "reports not ready"

    @staticmethod
    def _set_down(backend: Backend, why: str) -> None:
        if backend.ready:
            log.warning("backend down", extra={"backend": backend.address, "error": why})
        backend.ready, backend.last_error = False, why

    def ready_backends(self) -> list[Backend]:
        return [b for b in self.backends if b.ready]

    def models(self) -> dict[str, int]:
        """Served model name -> max_model_len, over ready replicas."""
        return {b.model: b.max_model_len for b in self.ready_backends()}

    def pick(self, exclude: set[str] | frozenset[str] = frozenset()) -> Backend | None:
        candidates = [b for b in self.ready_backends() if b.address not in exclude]
        return min(candidates, key=lambda b: (b.outstanding, b.running_requests), default=None)

    async def generate(self, request: llm_pb2.GenerateRequest,
                       deadline: float) -> AsyncIterator[llm_pb2.GenerateResponse]:
        """Stream one request's responses until `deadline` (event-loop time); closing the iterator cancels the call.

        The deadline travels with the call, so the language server gives up at the same moment the router does.
        """
        loop = asyncio.get_running_loop()
        tried: set[str] = set()
        while True:
            backend = self.pick(tried)
            if backend is None:
                raise NoBackendError("no language server is ready")
            tried.add(backend.address)
            backend.outstanding += 1
            call = backend.stub.Generate(request, timeout=max(deadline - loop.time(), 0.001))
            sent_any = False
            try:
                async for response in call:
                    sent_any = True
                    yield response
                return
            except grpc.aio.AioRpcError as exc:
                if sent_any or exc.code() not in RETRYABLE or self.pick(tried) is None:
                    raise  # with nowhere else to go, the replica's own reason is the best answer
                self._set_down(backend, f"{exc.code().name}: {exc.details()}")
                log.warning("retrying on another backend", extra={"backend": backend.address,
                                                                   "request_id": request.request_id})
            finally:
                backend.outstanding -= 1
                call.cancel()
