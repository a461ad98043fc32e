"""The OpenAI chat-completions shapes the gateway reads and writes (as vLLM's `entrypoints/openai/protocol` has them).

Of a request the gateway reads only what it acts on: the model to route to, how to answer (stream, n, logprobs,
usage), and the image and video URLs it fetches. Everything else travels as the client wrote it to the language
server, where vLLM's own ChatCompletionRequest checks it once (llm.proto's GenerateRequest).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_serializer
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


class StreamOptions(BaseModel):
    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    n: int | None = Field(1, ge=1, le=128)  # the gateway assembles the n choices
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    _body: dict[str, Any] = PrivateAttr(default_factory=dict)  # the request as sent, forwarded to the language server

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

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


# ---- responses ----


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None  # with a reasoning parser, as vLLM's


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON, as the model wrote it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    reasoning: str | None = None  # vLLM's field for what its reasoning parser splits off
    tool_calls: list[ToolCall] | None = None


class _Choice(BaseModel):
    index: int
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class Choice(_Choice):
    message: ResponseMessage


def _now() -> int:
    return int(time.time())


class _Completion(BaseModel):
    """What a whole answer and each chunk of a streamed one both carry."""

    id: str
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None


class ChatCompletion(_Completion):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    usage: Usage


class _Sparse(BaseModel):
    """A delta: fields that are not set are left out, as in OpenAI's stream."""

    @model_serializer(mode="wrap")
    def _omit_nulls(self, handler: Callable[[_Sparse], dict[str, Any]]) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_Sparse):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Sparse):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(_Sparse):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(_Choice):
    delta: DeltaMessage


class ChatCompletionChunk(_Completion):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


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
