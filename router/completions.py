"""One chat completion from admission to last byte: limits, images, the gRPC stream, cancellation, metrics.

Errors that happen before the first token (bad image, no replica, deadline) still get their own HTTP status even
when streaming: the response starts only once the language server has produced its first output. A client that
goes away at any point cancels the gRPC call, which aborts the request in the language server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TypeVar

import grpc
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from opentelemetry import context as otel_context
from opentelemetry import trace
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from dvd.logs import request_context
from dvd.tracing import incoming_context, outgoing_metadata, tracer
from dvd.v2 import llm_pb2
from router.backends import BackendPool
from router.errors import APIError
from router.images import ImageLoader
from router.limits import Limiter, read_capped
from router.metrics import Metrics, RequestTracker
from router.schemas import parse_chat_request
from router.translate import affinity_key, to_generate_request

log = logging.getLogger("router.completions")
T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client disconnected; nobody is left to answer."""


def as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError):
        return APIError.from_grpc(exc)
    log.exception("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has been read, so receive() only reports the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def guarded(request: Request, work: Awaitable[T], deadline: float) -> T:
    """Await `work` unless the client leaves (ClientGone) or the deadline passes (504); either cancels it."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        timeout = max(deadline - asyncio.get_running_loop().time(), 0.0)
        await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if not task.cancelled():  # it finished, even if only just: its outcome (e.g. a taken slot) must not be lost
        return task.result()
    if watcher.done() and not watcher.cancelled():
        raise ClientGone
    raise APIError(504, "request timed out", code="timeout")


class Completions:
    def __init__(self, pool: BackendPool, images: ImageLoader, limiter: Limiter, metrics: Metrics,
                 *, max_body_bytes: int, request_timeout: float) -> None:
        self.pool, self.images, self.limiter, self.metrics = pool, images, limiter, metrics
        self.max_body_bytes, self.request_timeout = max_body_bytes, request_timeout

    def _check_model(self, model: str) -> None:
        served = self.pool.models()
        if not served:
            raise APIError.no_backend()
        if model not in served:
            raise APIError(404, f"model {model!r} does not exist; served: {', '.join(sorted(served))}",
                           code="model_not_found", param="model")

    async def handle(self, request: Request) -> Response:
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        # The request's span ends with its tracker, however the request ends (a stream ends after this returns).
        span = tracer.start_span("POST /v1/chat/completions", context=incoming_context(request.headers),
                                 kind=trace.SpanKind.SERVER, attributes={"dvd.request_id": request_id})
        in_span = otel_context.attach(trace.set_span_in_context(span))
        request_context(request_id)
        held = _Held(self.limiter, RequestTracker(self.metrics, request_id, span))
        handed_over = False  # a streaming response releases `held` once its last byte is out (or the client left)
        try:
            self.limiter.refuse_if_full()
            req = parse_chat_request(await read_capped(
                request.stream(), request.headers.get("content-length", ""), self.max_body_bytes,
                APIError(413, f"request body larger than {self.max_body_bytes} bytes", code="request_too_large")))
            self._check_model(req.model)
            held.tracker.model_name = req.model
            held.reserve()
            urls = list(req.media())
            with tracer.start_as_current_span("router.fetch_media", attributes={"dvd.media": len(urls)}):
                media = await guarded(request, self.images.load_all(urls), deadline)
            with tracer.start_as_current_span("router.queue"):
                held.admitted(await guarded(request, self.limiter.take(), deadline))
            held.stream = self.pool.generate(to_generate_request(req, media, request_id), deadline,
                                             outgoing_metadata(), key=affinity_key(req, media))
            first = await guarded(request, anext(held.stream, None), deadline)
            if first is None:
                raise APIError(502, "the language server closed the stream without a response", code="empty_stream")
            held.tracker.observe(first)
            if req.stream:
                handed_over = True
                return _EventStream(self._sse(first, held), held, request_id)
            body = [first.body]
            await guarded(request, self._drain(held.stream, body, held.tracker), deadline)
            held.tracker.finish(200)
            return Response(b"".join(body), media_type="application/json", headers={"X-Request-Id": request_id})
        except (ClientGone, ClientDisconnect):  # the client left (possibly mid-upload): nobody to answer
            held.tracker.finish(499)
            return Response(status_code=499)
        except Exception as exc:
            error = as_api_error(exc)
            held.tracker.finish(error.status, error)
            raise error from exc
        finally:
            otel_context.detach(in_span)
            if not handed_over:
                await held.release()

    @staticmethod
    async def _drain(stream: AsyncIterator[llm_pb2.GenerateResponse], body: list[bytes],
                     tracker: RequestTracker) -> None:
        async for response in stream:
            tracker.observe(response)
            body.append(response.body)

    @staticmethod
    async def _sse(first: llm_pb2.GenerateResponse, held: _Held) -> AsyncIterator[bytes]:
        """The language server's events as they come. Starlette cancels this generator when the client
        disconnects; _EventStream cleans up."""
        assert held.stream is not None
        try:
            response: llm_pb2.GenerateResponse | None = first
            while response is not None:
                if response.body:
                    yield response.body
                response = await anext(held.stream, None)
                if response is not None:
                    held.tracker.observe(response)
            held.tracker.finish(200)
        except (grpc.aio.AioRpcError, APIError) as exc:
            # Headers are gone; OpenAI clients raise on an `error` event.
            error = as_api_error(exc)
            held.tracker.finish(error.status, error)
            yield f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()


class _Held:
    """What an admitted request holds (a limiter slot, the gRPC stream), released exactly once on any path."""

    def __init__(self, limiter: Limiter, tracker: RequestTracker) -> None:
        self.limiter, self.tracker = limiter, tracker
        self.stream: AsyncGenerator[llm_pb2.GenerateResponse, None] | None = None
        self._reserved = False  # holds a queue place (its images load meanwhile), no slot yet
        self._granted_at: float | None = None  # when the limiter gave this request its slot

    def reserve(self) -> None:
        self.limiter.reserve()
        self._reserved = True

    def admitted(self, granted_at: float) -> None:
        self._reserved = False  # take() turned the queue place into the slot
        self._granted_at = granted_at
        self.tracker.admitted()

    async def release(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            await stream.aclose()  # cancels the gRPC call if it is still running
        if self._reserved:
            self._reserved = False
            self.limiter.unreserve()
        if self._granted_at is not None:
            granted_at, self._granted_at = self._granted_at, None
            self.limiter.release(granted_at)


class _EventStream(StreamingResponse):
    """An SSE response that releases its request's resources however it ends: Starlette may cancel the body
    before it even starts (client already gone), in which case the body's own cleanup would never run."""

    def __init__(self, body: AsyncIterator[bytes], held: _Held, request_id: str) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})
        self._held = held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._held.tracker.finish(499)  # no-op when the body already recorded how it ended
            await self._held.release()
