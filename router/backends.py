"""The pool of language servers: health-checked, cache-affine or least-load choice, retry before the first token.

A request is retried on another replica only when its failure proves no work reached the client (the replica was
unreachable before the first response); once a token went out, a retry would duplicate or contradict it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from dvd.backend_pool import AFFINITY_BALANCE
from dvd.backend_pool import Backend as PoolBackend
from dvd.backend_pool import BackendPool as GenericPool
from dvd.health import LANGUAGE_SERVICE
from dvd.security import InternalAuth
from dvd.v2 import llm_pb2, llm_pb2_grpc, vision_pb2
from router.errors import APIError

log = logging.getLogger("router.backends")

# Codes that say the replica did not serve the request, through no fault of the request (unreachable, stopping, or it
# cancelled the call as it stopped): worth another replica while no token has gone out.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# Images travel inside the request; keep the channel's own limits out of the way (the router enforces its own).
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


Backend = PoolBackend[llm_pb2_grpc.LanguageServiceStub]  # .metadata: its LanguageMetadata


class BackendPool(GenericPool[llm_pb2_grpc.LanguageServiceStub]):
    """The language servers: a request with a conversation key (`affinity_key`) goes to its replica on the hash
    ring within the load bound (`pick_for`); others to the one with the fewest requests, counting those other
    routers have running there (its last report less this router's calls at that time) and this router's calls
    now."""

    def __init__(self, targets: tuple[str, ...], health_interval: float = 2.0, health_timeout: float = 2.0,
                 auth: InternalAuth | None = None, affinity: bool = True, affinity_balance: float = AFFINITY_BALANCE,
                 on_route: Callable[[str], None] | None = None) -> None:
        self.affinity = affinity
        self.on_route = on_route  # told how each request's first replica was chosen ("owner", "spill", "none")
        super().__init__(targets, llm_pb2_grpc.LanguageServiceStub, self._describe, LANGUAGE_SERVICE, "language",
                         auth=auth or InternalAuth(), channel_options=CHANNEL_OPTIONS, health_interval=health_interval,
                         health_timeout=health_timeout, affinity_balance=affinity_balance)

    async def _describe(self, backend: Backend) -> bool:
        backend.metadata = await backend.stub.Metadata(vision_pb2.MetadataRequest(), timeout=self.health_timeout)
        return True

    def models(self) -> dict[str, llm_pb2.LanguageMetadata]:
        """Every served model name (aliases included) -> the metadata of a ready replica serving it."""
        return {name: b.metadata for b in self.ready_backends
                for name in (b.metadata.model_names or [b.metadata.model])}

    async def generate(self, request: llm_pb2.GenerateRequest, deadline: float,
                       metadata: list[tuple[str, str]] | None = None,
                       key: bytes | None = None) -> AsyncIterator[llm_pb2.GenerateResponse]:
        """Stream one request's responses until `deadline` (event-loop time); closing the iterator cancels the call.

        The deadline travels with the call, so the language server gives up at the same moment the router does;
        `metadata` carries the trace context; `key`, the request's conversation (translate.affinity_key).
        """
        loop = asyncio.get_running_loop()
        key = key if self.affinity else None
        tried: set[str] = set()
        while True:
            backend, choice = self.pick_for(key, tried)
            if backend is None:
                raise APIError.no_backend()
            if not tried and self.on_route is not None:
                self.on_route(choice)
            tried.add(backend.address)
            backend.outstanding += 1
            call = backend.stub.Generate(request, timeout=max(deadline - loop.time(), 0.001), metadata=metadata)
            sent_any = False
            try:
                async for response in call:
                    sent_any = True
                    yield response
                return
            except grpc.aio.AioRpcError as exc:
                if sent_any or exc.code() not in RETRYABLE or self.pick(tried) is None:
                    raise  # with nowhere else to go, the replica's own reason is the best answer
                self.mark_down(backend, f"{exc.code().name}: {exc.details()}")
                log.warning("retrying on another backend", extra={"backend": backend.address,
                                                                   "request_id": request.request_id})
            finally:
                backend.outstanding -= 1
                call.cancel()
