"""The one error a service answers a call with, and what the gateway reads from it beyond the gRPC status code."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from pydantic import ValidationError

# Trailing metadata key naming the request field an INVALID_ARGUMENT is about: the gateway reports it as the
# OpenAI error's `param`.
PARAM_KEY = "dvd-param"

# On a vision server's INVALID_ARGUMENT about one file of an EncodeRequest: that file's index in `images`. The
# language server turns it into the conversation part it came from (e.g. "messages[0].content[1].video_url.url").
ITEM_KEY = "dvd-item"


class ServiceError(Exception):
    """A request a service refuses or cannot serve: the gRPC status to answer with, a message written for the
    client (never an internal address), and what it is about: `param`, the request field as the client named it,
    or `item`, the file's index in the call's list. The servicer's one abort point sends it (`abort`)."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT, *,
                 param: str | None = None, item: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.item = item

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.item is not None:
            return ((ITEM_KEY, str(self.item)),)
        return ((PARAM_KEY, self.param),) if self.param else ()

    async def abort(self, context: grpc.aio.ServicerContext) -> NoReturn:
        await context.abort(self.code, self.message, self.metadata())
        raise AssertionError("unreachable: context.abort raises")

    @classmethod
    def from_rpc(cls, error: grpc.aio.AioRpcError) -> ServiceError:
        """A backend's refusal, carried on with its status, param and item."""
        trailers = dict(error.trailing_metadata() or ())
        item = str(trailers.get(ITEM_KEY, ""))
        param = trailers.get(PARAM_KEY)
        return cls(error.details() or error.code().name, error.code(), param=param if isinstance(param, str) else None,
                   item=int(item) if item.isdigit() else None)

    @classmethod
    def from_validation(cls, error: ValidationError) -> ServiceError:
        """A request that failed its schema: the first problem, its field's path as OpenAI's `param`
        ("messages[0].content"); a check that names its own field (vLLM's VLLMValidationError has `parameter`, ours a
        `param` in the error's context) adds it to the path."""
        first = error.errors(include_url=False)[0]
        ctx: dict[str, Any] = first.get("ctx") or {}
        path = ""
        for part in first["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        named = ctx.get("param") or getattr(ctx.get("error"), "parameter", None)
        if named and not path.endswith(named):
            path = f"{path}.{named}" if path else named
        message = str(ctx.get("error") or first["msg"]).removeprefix("Value error, ")
        return cls(f"{message} (at '{path}')" if path else message, param=path or None)
