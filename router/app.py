"""The FastAPI application: routes, API-key check, OpenAI-shaped errors, and the lifecycle of shared clients."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version as package_version

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.backends import BackendPool
from router.completions import Completions
from router.config import RouterConfig
from router.errors import APIError
from router.images import FetchLimits, ImageLoader
from router.limits import Limiter
from router.metrics import Metrics
from router.schemas import ModelCard, ModelList

log = logging.getLogger("router.app")
VERSION = package_version("dvd-internvl")


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def create_app(config: RouterConfig, internal_port: int | None = None) -> FastAPI:
    """`internal_port`: requests arriving on that local port (the operators' --metrics-port) may read /metrics
    and the detailed /ready; on the API port /metrics needs the API key and /ready says only ready or not."""
    metrics = Metrics()
    pool = BackendPool(config.llm, health_interval=config.health_interval, auth=config.internal,
                       affinity=config.routing == "affinity", affinity_balance=config.affinity_balance,
                       on_route=lambda choice: metrics.routed.labels(choice).inc())
    limiter = Limiter(config.max_concurrency, config.max_queue)
    images = ImageLoader(FetchLimits(media=config.media, timeout=config.image_fetch_timeout,
                                     max_redirects=config.max_image_redirects,
                                     allow_private=config.allow_private_image_urls,
                                     max_total_bytes=config.max_image_total_bytes))
    completions = Completions(pool, images, limiter, metrics, max_body_bytes=config.max_body_bytes,
                              request_timeout=config.deadlines.request_timeout)
    metrics.waiting.set_function(lambda: limiter.waiting)
    metrics.backends_ready.set_function(lambda: len(pool.ready_backends))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        log.info("router started", extra={"backends": ",".join(config.llm), "ready": len(pool.ready_backends),
                                          "auth": bool(config.api_keys)})
        try:
            yield
        finally:
            await images.aclose()
            await pool.close()

    def authorize(request: Request) -> None:
        """Bearer keys, compared in constant time; no keys configured means an open server."""
        if not config.api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip(), k) for k in config.api_keys):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="DvD router", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.pool = pool

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(APIError(400, str(exc.errors()[0].get("msg")), code="invalid_request"))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        return await completions.handle(request)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, root=meta.model_root or name,
                                         max_model_len=meta.max_model_len or None)
                               for name, meta in sorted(pool.models().items())])

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": VERSION}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def internal(request: Request) -> bool:
        server = request.scope.get("server")
        return internal_port is not None and bool(server) and server[1] == internal_port

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        status = 200 if pool.ready_backends else 503
        body: dict[str, object] = {"ready": status == 200}
        if internal(request):  # backend addresses and their errors: for operators only
            body["backends"] = {b.address: ("ready" if b.ready else b.last_error) for b in pool.backends}
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if not internal(request):
            authorize(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
