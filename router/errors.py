"""One exception type for every error the gateway reports, so that every path ends in OpenAI's error JSON."""

from __future__ import annotations

import logging

import grpc
from pydantic import BaseModel

from dvd.errors import ServiceError

log = logging.getLogger("router.errors")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# OpenAI's `type` for each status we emit; `code` refines it.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}

# How the language service's gRPC status becomes an HTTP status (the contract in llm.proto's service).
GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.FAILED_PRECONDITION: 503,  # the vision pool cannot serve right now
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    # The backend cancelled the call (it stopped before finishing it): a client that left itself gets no answer.
    grpc.StatusCode.CANCELLED: 503,
}


# What a client reads for a server-side failure: nothing about the inside.
SERVER_MESSAGES = {
    500: "internal error in the language service",
    503: "the service is temporarily unavailable; retry",
    504: "request timed out",
}


class APIError(Exception):
    """An error with an HTTP status, rendered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, dict[str, str | None]]:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()

    @classmethod
    def no_backend(cls) -> APIError:
        return cls(503, "no language server is ready", code="no_backend", headers={"Retry-After": "1"})

    @classmethod
    def from_grpc(cls, error: grpc.aio.AioRpcError) -> APIError:
        """The language service's 4xx messages are about the request and written for clients (llm.proto); a
        server-side failure's details are gRPC's or a backend's own (they name hosts and ports), so the client
        gets a fixed message and the log keeps the details."""
        refused = ServiceError.from_rpc(error)
        status = GRPC_TO_HTTP.get(refused.code, 500)
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        message = refused.message
        if status >= 500:
            log.warning("language service error", extra={"code": refused.code.name, "details": message})
            message = SERVER_MESSAGES.get(status, SERVER_MESSAGES[500])
        return cls(status, message, code=refused.code.name.lower(), headers=headers, param=refused.param)
