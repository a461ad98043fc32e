"""A Generate call's request, prepared: the client's chat request parsed once, into vLLM's own ChatCompletionRequest
(its checks, its sampling rules), the files beside it put where their parts were, and whatever this server does
not do refused by name rather than silently ignored.

The conversation reaches the chat template as vLLM gives it to templates of the "openai" content format
(InternVL3.5's): content lists of `{"type": "text", ...}`, `{"type": "image"}` and `{"type": "video"}`, so the same
conversation yields the same prompt, and therefore the same tokens, on DvD and on stock vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from vllm import SamplingParams
from vllm.config import ModelConfig, StructuredOutputsConfig
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionRequest,
)
from vllm.exceptions import VLLMClientError
from vllm.parser.abstract_parser import Parser
from vllm.renderers.chat_utils import _postprocess_messages
from vllm.sampling_params import StructuredOutputsParams
from vllm.tokenizers import TokenizerLike

from dvd.errors import ServiceError
from dvd.media import MEDIA_PARTS
from dvd.v2 import vision_pb2
from llm_server.answer import ChatOptions

MAX_DYNAMIC_PATCH = 40  # InternVL's tiler goes up to 40 tiles (max_num in its dynamic_preprocess)

# vLLM's request fields this server carries out; any other set to a value other than its default is refused.
HONORED = frozenset({
    "messages", "model", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens",
    "max_completion_tokens", "n", "presence_penalty", "response_format", "seed", "stop", "stream", "stream_options",
    "temperature", "top_p", "tools", "tool_choice", "reasoning_effort", "include_reasoning", "parallel_tool_calls",
    "user", "top_k", "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos", "min_tokens",
    "chat_template_kwargs", "structured_outputs", "mm_processor_kwargs", "media_io_kwargs", "return_token_ids",
})
# OpenAI's fields that vLLM does not declare: the test for 'left at its default', and why not otherwise.
OPENAI_ONLY: dict[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (lambda v: not v, "are not supported (OpenAI's deprecated function calling: use 'tools')"),
    "function_call": (lambda v: v in (None, "none"), "is not supported (OpenAI's deprecated function calling: use "
                                                     "'tool_choice')"),
    "audio": (lambda v: v is None, "is not supported (text output only)"),
    "modalities": (lambda v: v in (None, ["text"]), "other than ['text'] are not supported"),
    "store": (lambda v: not v, "is not supported (nothing is stored)"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "is not supported"),
    "metadata": (lambda v: True, ""),
}
DVD_FIELDS = frozenset({"vir", "max_dynamic_patch"})  # DvD's own (VisionFields)
# Template arguments a request may not set: the server's template and how it is called are not the client's to
# change (the set vLLM's `resolve_chat_template_kwargs` calls unexpected from a request).
SERVER_ONLY_KWARGS = frozenset({"chat_template", "tokenize"})

ROLES = ("system", "user", "assistant", "tool")  # what the chat template renders
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message
PART_KEYS = {"text": {"text"}, "image_url": {"url", "detail"}, "video_url": {"url"}}
# image_url.detail -> that image's tile cap (0: the request's budget). "low" is OpenAI's low-resolution mode: one
# 448 px tile, which InternVL tiles without a thumbnail (256 visual tokens on a non-Flash checkpoint).
DETAIL_TILES = {"low": 1}
_VIR = {None: vision_pb2.VIR_MODE_UNSPECIFIED, "auto": vision_pb2.VIR_MODE_AUTO, "off": vision_pb2.VIR_MODE_OFF}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MMProcessorKwargs(_Strict):
    max_dynamic_patch: int | None = Field(None, ge=1, le=MAX_DYNAMIC_PATCH)


class VideoIOKwargs(_Strict):
    """vLLM's frame sampling for videos (its VideoMediaIO options): `num_frames` spread uniformly (-1 = every
    frame; default 32), at most `fps` frames per second of video when set. The vision server bounds the frames."""

    num_frames: int | None = Field(None, ge=-1, le=2**31 - 1)
    fps: float | None = Field(None, gt=0.0, allow_inf_nan=False)

    @field_validator("num_frames")
    @classmethod
    def _not_zero(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("'num_frames' must be -1 (every frame) or at least 1")
        return value


class MediaIOKwargs(_Strict):
    video: VideoIOKwargs | None = None


class VisionFields(BaseModel):
    """The request's fields for the vision pool: DvD's Visual Resolution Router (Flash checkpoints) and InternVL's
    tile budget, also as vLLM's mm_processor_kwargs; vLLM's media_io_kwargs for video sampling."""

    vir: Literal["auto", "off"] | None = None
    max_dynamic_patch: int | None = Field(None, ge=1, le=MAX_DYNAMIC_PATCH)
    mm_processor_kwargs: MMProcessorKwargs | None = None
    media_io_kwargs: MediaIOKwargs | None = None

    @model_validator(mode="after")
    def _one_budget(self) -> VisionFields:
        kwarg = self.mm_processor_kwargs.max_dynamic_patch if self.mm_processor_kwargs else None
        if None not in (kwarg, self.max_dynamic_patch) and kwarg != self.max_dynamic_patch:
            raise ValueError("'max_dynamic_patch' and 'mm_processor_kwargs.max_dynamic_patch' disagree")
        self.max_dynamic_patch = self.max_dynamic_patch or kwarg
        return self

    def options(self) -> vision_pb2.EncodeOptions:
        video = self.media_io_kwargs.video if self.media_io_kwargs else None
        return vision_pb2.EncodeOptions(vir=_VIR[self.vir], max_tiles=self.max_dynamic_patch or 0,
                                        video=vision_pb2.VideoSampling(num_frames=video.num_frames or 0,
                                                                       fps=video.fps or 0.0) if video else None)


def _refused(field: str, why: str) -> ServiceError:
    return ServiceError(f"'{field}' {why}", param=field)


def parse_request(raw: bytes) -> tuple[ChatCompletionRequest, vision_pb2.EncodeOptions]:
    """vLLM's request object and the vision pool's options, or the request's first problem (by field)."""
    try:
        request = ChatCompletionRequest.model_validate_json(raw)
        extra = request.model_extra or {}
        vision = VisionFields.model_validate({**{k: extra.get(k) for k in DVD_FIELDS},
                                              "mm_processor_kwargs": request.mm_processor_kwargs,
                                              "media_io_kwargs": request.media_io_kwargs})
    except ValidationError as e:
        raise ServiceError.from_validation(e) from e
    for name in (request.model_fields_set & ChatCompletionRequest.model_fields.keys()) - HONORED:
        if getattr(request, name) != ChatCompletionRequest.model_fields[name].get_default(call_default_factory=True):
            raise _refused(name, "is not supported")
    for name, value in extra.items():
        if name in OPENAI_ONLY and not OPENAI_ONLY[name][0](value):
            raise _refused(name, OPENAI_ONLY[name][1])
        if name not in OPENAI_ONLY and name not in DVD_FIELDS and value is not None:
            raise _refused(name, "is not a supported field")
    if refused := SERVER_ONLY_KWARGS & (request.chat_template_kwargs or {}).keys():
        raise ServiceError(f"{', '.join(sorted(refused))} may not be set by a request", param="chat_template_kwargs")
    return request, vision.options()


def template_tools(request: ChatCompletionRequest, tools: ChatOptions) -> list[dict] | None:
    """The tools the chat template renders, as vLLM's renderer passes them."""
    if request.tools is None or (request.tool_choice == "none" and tools.exclude_tools_when_tool_choice_none):
        return None
    return [tool.model_dump() for tool in request.tools]


def check_tool_choice(request: ChatCompletionRequest, parser_cls: type[Parser] | None, tools: ChatOptions) -> None:
    """vLLM's server refuses a tool_choice it has no parser for (its renderer's check, same messages)."""
    if request.tool_choice in (None, "none") or (parser_cls is not None and parser_cls.tool_parser_cls is not None):
        return
    if request.tool_choice == "auto":
        if not tools.enable_auto_tool_choice:
            raise ServiceError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                               param="tool_choice")
        return
    what = (f'function "{request.tool_choice.function.name}"'
            if isinstance(request.tool_choice, ChatCompletionNamedToolChoiceParam) else f'"{request.tool_choice}"')
    raise ServiceError(f"tool_choice={what} requires --tool-call-parser to be set", param="tool_choice")


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]  # as the chat template receives them
    media: list[vision_pb2.Media]  # the files in conversation order, an image's own tile cap set (its `detail`)
    paths: list[str]  # per file: where the client put it ("messages[0].content[1].video_url.url"), for errors


def role_error(role: str) -> str | None:
    """Why a message with this role cannot be served, or None."""
    if role == "function":
        return "'function' messages (OpenAI's deprecated function calling) are not supported: use 'tool'"
    if role not in ROLES and role not in ROLE_ALIASES:
        return f"unknown role {role!r}; expected one of {', '.join((*ROLES, *ROLE_ALIASES))}"
    return None


def _part(part: dict, path: str, role: str, media: list[vision_pb2.Media], out: Conversation) -> dict:
    """One content part as the template gets it; an image or video part takes the next file."""
    kind = part.get("type")
    if kind not in PART_KEYS:
        raise ServiceError(f"'{kind}' content parts are not supported (use 'text', 'image_url' or 'video_url')",
                           param=f"{path}.type")
    body = part.get(kind)
    if body is None or (kind != "text" and not isinstance(body, dict)):
        raise ServiceError(f"a '{kind}' part needs a '{kind}' {'string' if kind == 'text' else 'object'}",
                           param=path)
    unknown = [f"{path}.{key}" for key in set(part) - {"type", kind}]
    unknown += [f"{path}.{kind}.{key}" for key in set(body) - PART_KEYS[kind]] if isinstance(body, dict) else []
    if unknown:
        raise ServiceError(f"'{min(unknown).rsplit('.', 1)[-1]}' is not a supported field", param=min(unknown))
    if kind == "text":
        return {"type": "text", "text": body}
    if role != "user":
        raise ServiceError("images and videos are only allowed in user messages", param=path)
    n = len(out.media)
    if n >= len(media) or media[n].kind != MEDIA_PARTS[kind] or not media[n].data:
        raise ServiceError(f"no file arrived for this {kind} part", param=f"{path}.{kind}.url")
    out.media.append(vision_pb2.Media(kind=media[n].kind, data=media[n].data,
                                      max_tiles=DETAIL_TILES.get(body.get("detail") or "", 0)))
    out.paths.append(f"{path}.{kind}.url")
    return {"type": kind.removesuffix("_url")}


def parse_messages(messages: list[Any], media: list[vision_pb2.Media]) -> Conversation:
    """vLLM's validated messages and the request's files, as the chat template takes them."""
    if not messages:
        raise ServiceError("the conversation has no messages", param="messages")
    out = Conversation([], [], [])
    for i, m in enumerate(messages):
        role = m.get("role")
        if (error := role_error(role)) is not None:
            raise ServiceError(error, param=f"messages[{i}].role")
        content = m.get("content")
        try:  # vLLM validates content parts as they are read
            content = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or ())
        except ValidationError as e:
            where = f"messages[{i}].content[{e.errors()[0]['loc'][0]}]"
            raise ServiceError(f"{where} is not a content part this server takes ('text', 'image_url' with an "
                               f"'image_url' object, 'video_url' with a 'video_url' object)", param=where) from e
        parts = [_part(p, f"messages[{i}].content[{j}]", role, media, out) for j, p in enumerate(content or ())]
        message: dict = {"role": ROLE_ALIASES.get(role, role), "content": parts}
        if role == "tool":
            # vLLM hands a tool message's text parts to the template as one string, joined by newlines.
            message["content"] = "\n".join(p["text"] for p in parts)
            message["tool_call_id"] = m.get("tool_call_id")
        if m.get("tool_calls"):
            if role != "assistant":
                raise ServiceError("only assistant messages carry 'tool_calls'", param=f"messages[{i}].tool_calls")
            message["tool_calls"] = m["tool_calls"]
        out.messages.append(message)
    if len(out.media) != len(media):
        raise ServiceError(f"{len(media)} files arrived for {len(out.media)} image and video parts", param="messages")
    try:
        _postprocess_messages(out.messages)  # vLLM's: tool-call arguments as the objects templates expect
    except ValueError as e:
        raise ServiceError(str(e), param="messages") from e
    return out


def check_constraints(request: ChatCompletionRequest, model_config: ModelConfig, config: StructuredOutputsConfig | None,
                      tokenizer: TokenizerLike) -> StructuredOutputsParams | None:
    """The request's constraint, by vLLM's own rule (response_format over structured_outputs, or the schema of the
    calls tool_choice required/named asks for, once the parser's adjust_request has set it), checked by vLLM's own
    validator (grammar, schema, regex, choice) before any vision work: inside add_request it raises the same errors
    without saying which request field was wrong. vLLM accepts the checked object again (it remembers the backend
    `auto` chose)."""
    constraint = request.extract_structured_outputs()
    if constraint is None:
        return None
    param = ("response_format" if request.response_format else
             "tools" if request.tool_choice not in (None, "none", "auto") else "structured_outputs")
    try:
        SamplingParams(structured_outputs=constraint)._validate_structured_outputs(model_config, config, tokenizer)
    except (ValueError, VLLMClientError) as e:
        raise ServiceError(str(e), param=param) from e
    return constraint
