"""The OpenAI shapes the gateway reads and writes itself (as vLLM's `entrypoints/openai` has them).

Of a request the gateway reads only what it acts on: the model to route to, whether to stream, n (bounded here), and
the image and video URLs it fetches. Everything else travels as the client wrote it to the language server, where
vLLM's own ChatCompletionRequest checks it once (llm.proto's GenerateRequest); the answer comes back as vLLM's chat
server writes it, and the gateway forwards it as it is.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator
from pydantic_core import from_json

from dvd.errors import ServiceError
from dvd.media import MEDIA_PARTS
from router.errors import APIError


class MediaURL(BaseModel):
    url: str = Field(min_length=1)


class ContentPart(BaseModel):
    type: str | None = None
    text: str | None = None
    image_url: MediaURL | None = None
    video_url: MediaURL | None = None


class ChatMessage(BaseModel):
    role: str
    content: list[ContentPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _string_is_one_text_part(cls, value: Any) -> Any:
        return [{"type": "text", "text": value}] if isinstance(value, str) else value


class ChatCompletionRequest(BaseModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    n: int | None = Field(1, ge=1, le=128)  # a bound on one request's work (vLLM sets none)
    stream: bool | None = False
    _body: dict[str, Any] = PrivateAttr(default_factory=dict)  # the request as sent, forwarded to the language server

    def media(self) -> Iterator[tuple[str, str, str]]:
        """Every image and video URL in prompt order: (url, its field path, "image" | "video")."""
        for i, message in enumerate(self.messages):
            for j, part in enumerate(message.content or ()):
                media_url = getattr(part, part.type, None) if part.type in MEDIA_PARTS else None
                if isinstance(media_url, MediaURL):
                    yield media_url.url, f"messages[{i}].content[{j}].{part.type}.url", part.type.removesuffix("_url")

    def forwarded(self) -> bytes:
        """The request as sent, each fetched file's URL emptied: the file travels beside it (GenerateRequest)."""
        for message in self._body["messages"]:
            for part in message.get("content") if isinstance(message.get("content"), list) else ():
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in MEDIA_PARTS and isinstance(media_url := part.get(kind), dict):
                    media_url["url"] = ""
        return json.dumps(self._body, ensure_ascii=False).encode()


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """The gateway's view of a JSON body; a 400 names the first problem, its field's path as OpenAI's `param`."""
    try:
        raw = from_json(body)  # pydantic's parser: a nesting limit, where json.loads would overflow the stack
        request = ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        refused = ServiceError.from_validation(exc)
        raise APIError(400, refused.message, code="invalid_request", param=refused.param) from None
    except ValueError as exc:  # not JSON
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_request") from None
    request._body = raw
    return request


# ---- /v1/models (answers come from the language server as vLLM writes them) ----


def _now() -> int:
    return int(time.time())


class ModelPermission(BaseModel):
    """vLLM's, so that clients that read /v1/models as vLLM answers it find the same fields."""

    id: str = Field(default_factory=lambda: f"modelperm-{uuid.uuid4().hex}")
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=_now)
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    """vLLM's ModelCard: `root` is what the model was loaded from."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "vllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
