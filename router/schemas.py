"""OpenAI chat-completions request/response models (as vLLM's `entrypoints/openai/protocol` mirrors them).

Every field a client may send is either implemented, or declared and refused when it carries a non-default value,
or unknown and refused when not null: a request is never silently answered as if an option had been applied.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from dvd.conversation import image_error, role_error, tool_calls_error
from router.errors import APIError

MAX_DYNAMIC_PATCH = 40  # InternVL's tiler goes up to 40 tiles (max_num in its dynamic_preprocess)
UINT32_MAX = 2**32 - 1
MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and vLLM's default --max-logprobs


def _unsupported(field: str, why: str, *, param: str | None = None) -> PydanticCustomError:
    """A refusal whose `param` (appended to the error's location) is the refused field, when it is one."""
    return PydanticCustomError("unsupported", "'{field}' {why}", {"field": field, "why": why, "param": param})


class _Request(BaseModel):
    """Request models keep unknown keys only to refuse them: null is the one value that means 'not set'."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _no_unknown_fields(self) -> _Request:
        for key, value in (self.model_extra or {}).items():
            if value is not None:
                raise _unsupported(key, "is not a supported field", param=key)
        return self


def _refuse_non_default(model: BaseModel, defaults: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    for name, (is_default, why) in defaults.items():
        if not is_default(getattr(model, name)):
            raise _unsupported(name, why, param=name)


class ImageURL(_Request):
    url: str = Field(min_length=1)
    # "low": this image as one 448 px tile (no thumbnail); "high"/"auto": the request's tile budget
    # (max_dynamic_patch, else the model's). Stock vLLM ignores `detail`.
    detail: Literal["auto", "low", "high"] | None = None


class VideoURL(_Request):
    """vLLM's `video_url` part: a video file (MP4, WebM, AVI, ...) as a data: or http(s) URL."""

    url: str = Field(min_length=1)


class ContentPart(_Request):
    type: str
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: VideoURL | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_type(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind not in ("text", "image_url", "video_url"):
            raise _unsupported(kind, "content parts are not supported (use 'text', 'image_url' or 'video_url')",
                               param="type")
        return data

    @model_validator(mode="after")
    def _matches_type(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a 'text' part needs a 'text' string")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an 'image_url' part needs an 'image_url' object with a 'url'")
        if self.type == "video_url" and self.video_url is None:
            raise ValueError("a 'video_url' part needs a 'video_url' object with a 'url'")
        return self

    @property
    def media_url(self) -> tuple[str, str] | None:
        """(url, kind) of an image or video part, the kind being "image" or "video"."""
        if self.type == "image_url" and self.image_url is not None:
            return self.image_url.url, "image"
        if self.type == "video_url" and self.video_url is not None:
            return self.video_url.url, "video"
        return None


class ChatMessage(_Request):
    role: str
    content: list[ContentPart] | None = None
    name: str | None = None
    refusal: str | None = None
    # The calls an assistant turn made and the call a tool turn answers, carried to the language server as sent
    # (vLLM's own types check them there).
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: Any = None

    @field_validator("content", mode="before")
    @classmethod
    def _string_is_one_text_part(cls, value: Any) -> Any:
        return [{"type": "text", "text": value}] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_role(self) -> ChatMessage:
        if (error := role_error(self.role)) is not None:
            raise ValueError(error)
        _refuse_non_default(self, {
            "function_call": (lambda v: v is None, "is not supported (OpenAI's deprecated function calling: use "
                                                   "'tool_calls')"),
        })
        if self.tool_calls and (error := tool_calls_error(self.role)):
            raise _unsupported("tool_calls", f"are not allowed here: {error}", param="tool_calls")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        if any(p.media_url for p in self.content or ()) and (error := image_error(self.role)):
            raise ValueError(error)
        return self


class StreamOptions(_Request):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> StreamOptions:
        _refuse_non_default(self, {"continuous_usage_stats": (lambda v: not v, "is not supported")})
        return self


class JsonSchema(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # `schema` shadows a pydantic BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's `response_format`; vLLM's structured-output backend in the language server enforces it."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise _unsupported("json_schema", "is required when 'type' is 'json_schema'", param="json_schema")
        return self


class MMProcessorKwargs(_Request):
    max_dynamic_patch: int | None = Field(None, ge=1, le=MAX_DYNAMIC_PATCH)


class VideoIOKwargs(_Request):
    """vLLM's frame sampling for videos (its VideoMediaIO options): `num_frames` spread uniformly (-1 = every
    frame; default 32), at most `fps` frames per second of video when set. The vision server bounds the frames."""

    num_frames: int | None = Field(None, ge=-1, le=UINT32_MAX >> 1)
    fps: float | None = Field(None, gt=0.0, allow_inf_nan=False)

    @field_validator("num_frames")
    @classmethod
    def _not_zero(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("'num_frames' must be -1 (every frame) or at least 1")
        return value


class MediaIOKwargs(_Request):
    """vLLM's `media_io_kwargs`, keyed by modality; DvD takes the video sampling options."""

    video: VideoIOKwargs | None = None


def _none(value: Any) -> bool:
    return value is None


# Declared OpenAI fields this server does not implement: the test for 'left at its default', and why not.
_UNSUPPORTED_REQUEST_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (lambda v: not v, "are not supported (OpenAI's deprecated function calling: use 'tools')"),
    "function_call": (lambda v: v in (None, "none"), "is not supported (OpenAI's deprecated function calling: use "
                                                     "'tool_choice')"),
    "logit_bias": (lambda v: not v, "is not supported"),
    "audio": (_none, "is not supported (text output only)"),
    "modalities": (lambda v: v in (None, ["text"]), "other than ['text'] are not supported"),
    "prediction": (_none, "is not supported"),
    "web_search_options": (_none, "is not supported"),
    "store": (lambda v: not v, "is not supported (nothing is stored)"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "is not supported"),
}


class ChatCompletionRequest(_Request):
    # OpenAI, in the order of its reference.
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    metadata: dict[str, str] | None = None
    n: int | None = Field(1, ge=1, le=128)
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Checked and parsed by vLLM's own types in the language server, whose --tool-call-parser reads the calls.
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    functions: list[Any] | None = None
    function_call: Any = None
    logit_bias: dict[str, float] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    store: bool | None = None
    service_tier: str | None = None
    # vLLM's extensions.
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(None, ge=0, le=UINT32_MAX)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    stop_token_ids: list[int] | None = None
    structured_outputs: dict[str, Any] | None = None  # json, regex, choice, grammar, ... (vLLM's own checks)
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false}: InternVL3.5's switch
    include_reasoning: bool | None = None  # false: drop what the server's --reasoning-parser splits off
    # OpenAI's, checked by vLLM in the language server; "none" turns the template's thinking off, as in vLLM.
    reasoning_effort: str | None = None
    mm_processor_kwargs: MMProcessorKwargs | None = None
    media_io_kwargs: MediaIOKwargs | None = None
    # DvD's own: the Flash checkpoints' Visual Resolution Router, and InternVL's tile budget per image.
    vir: Literal["auto", "off"] | None = None
    max_dynamic_patch: int | None = Field(None, ge=1, le=MAX_DYNAMIC_PATCH)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_shape(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str | dict):
            raise ValueError("'tool_choice' must be a string or an object")
        return value

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        _refuse_non_default(self, _UNSUPPORTED_REQUEST_FIELDS)
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed with 'stream': true")
        if self.top_logprobs and not self.logprobs:
            raise _unsupported("top_logprobs", "needs 'logprobs': true", param="top_logprobs")
        patches = {p for p in (self.max_dynamic_patch, self.dynamic_patch_kwarg) if p is not None}
        if len(patches) > 1:
            raise ValueError("'max_dynamic_patch' and 'mm_processor_kwargs.max_dynamic_patch' disagree")
        if any(t < 0 or t > UINT32_MAX for t in self.stop_token_ids or ()):
            raise ValueError("'stop_token_ids' must be token ids (non-negative integers)")
        return self

    @property
    def dynamic_patch_kwarg(self) -> int | None:
        return self.mm_processor_kwargs.max_dynamic_patch if self.mm_processor_kwargs else None

    @property
    def output_limit(self) -> int | None:
        """`max_completion_tokens` replaces the deprecated `max_tokens`; either works."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_top(self) -> int | None:
        """Alternatives per token to ask vLLM for; None when the client wants no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _param(loc: tuple[int | str, ...], ctx: dict[str, Any] | None) -> str | None:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    field = (ctx or {}).get("param")
    if field:
        path = f"{path}.{field}" if path else field
    return path or None


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Validate a JSON body; a 400 names the first problem, its field's path as OpenAI's `param`."""
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = _param(tuple(err["loc"]), err.get("ctx"))
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{msg} (at '{param}')" if param else msg, code="invalid_request", param=param) from None


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


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


def _now() -> int:
    return int(time.time())


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


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


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


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
