"""OpenAI shapes <-> the language service's protobufs: requests in, token deltas out as chunks or one completion."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from dvd.conversation import template_role
from dvd.sampling import PASS_THROUGH
from dvd.v1 import llm_pb2, vision_pb2
from router.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionTokensDetails,
    ContentPart,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    PromptTokensDetails,
    ResponseMessage,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)

_VIR = {None: vision_pb2.VIR_MODE_UNSPECIFIED, "auto": vision_pb2.VIR_MODE_AUTO, "off": vision_pb2.VIR_MODE_OFF}
# image_url.detail -> that image's tile cap (0: the request's budget). "low" is OpenAI's low-resolution mode: one
# 448 px tile, which InternVL tiles without a thumbnail (256 visual tokens on a non-Flash checkpoint).
DETAIL_TILES = {"low": 1}


def media_urls(req: ChatCompletionRequest) -> list[tuple[str, str, str]]:
    """Every image and video URL in prompt order: (url, its field path for error messages, "image" | "video")."""
    out = []
    for i, message in enumerate(req.messages):
        for j, part in enumerate(message.content or ()):
            if (found := part.media_url) is not None:
                url, kind = found
                out.append((url, f"messages[{i}].content[{j}].{part.type}.url", kind))
    return out


def _part(p: ContentPart, pending: Iterator[bytes]) -> llm_pb2.ContentPart:
    if p.type == "image_url" and p.image_url is not None:
        return llm_pb2.ContentPart(image=next(pending), max_tiles=DETAIL_TILES.get(p.image_url.detail or "", 0))
    if p.type == "video_url":
        return llm_pb2.ContentPart(video=next(pending))
    return llm_pb2.ContentPart(text=p.text or "")


def to_generate_request(req: ChatCompletionRequest, media: list[bytes], request_id: str) -> llm_pb2.GenerateRequest:
    """`media` are the bytes of `media_urls(req)`, in the same order."""
    pending = iter(media)
    messages = [
        llm_pb2.ChatMessage(
            role=template_role(m.role),
            content=[_part(p, pending) for p in m.content or ()],
            tool_call_id=m.tool_call_id or "", tool_calls=json.dumps(m.tool_calls) if m.tool_calls else "")
        for m in req.messages
    ]
    optional = {name: getattr(req, name) for name in PASS_THROUGH if getattr(req, name) is not None}
    if req.output_limit is not None:
        optional["max_tokens"] = req.output_limit
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or ())
    if req.logprobs_top is not None:
        optional["logprobs"] = req.logprobs_top
    if req.response_format is not None and req.response_format.type != "text":
        optional["response_format"] = req.response_format.model_dump_json(by_alias=True, exclude_none=True)
    if req.structured_outputs:
        optional["structured_outputs"] = json.dumps(req.structured_outputs)
    sampling = llm_pb2.SamplingParams(n=req.n or 1, stop=stop, stop_token_ids=req.stop_token_ids or [], **optional)
    video = req.media_io_kwargs.video if req.media_io_kwargs and req.media_io_kwargs.video else None
    vision = llm_pb2.VisionOptions(vir=_VIR[req.vir],
                                   max_dynamic_patch=req.max_dynamic_patch or req.dynamic_patch_kwarg or 0,
                                   video=vision_pb2.VideoSampling(num_frames=video.num_frames or 0,
                                                                  fps=video.fps or 0.0) if video else None)
    return llm_pb2.GenerateRequest(request_id=request_id, messages=messages, sampling=sampling, vision=vision,
                                   chat_template_kwargs=json.dumps(req.chat_template_kwargs)
                                   if req.chat_template_kwargs else "",
                                   include_reasoning=req.include_reasoning, stream=bool(req.stream),
                                   tools=json.dumps(req.tools) if req.tools is not None else "",
                                   tool_choice=json.dumps(req.tool_choice) if req.tool_choice is not None else "",
                                   parallel_tool_calls=req.parallel_tool_calls,
                                   reasoning_effort=req.reasoning_effort or "")


def to_logprobs(entries: Iterable[llm_pb2.TokenLogprob]) -> list[TokenLogprob]:
    """OpenAI's token logprobs; `bytes` are the token's UTF-8 bytes, as vLLM's server gives them."""
    def b(token: str) -> list[int]:
        return list(token.encode("utf-8", errors="replace"))

    return [TokenLogprob(token=e.token, logprob=e.logprob, bytes=b(e.token),
                         top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=b(t.token)) for t in e.top])
            for e in entries]


def to_delta_call(call: llm_pb2.ToolCallDelta) -> DeltaToolCall:
    """A piece of a streamed tool call: its id (and type) come once, its name once, its arguments in pieces."""
    function = None
    if call.HasField("name") or call.HasField("arguments"):
        function = DeltaFunctionCall(name=call.name if call.HasField("name") else None,
                                     arguments=call.arguments if call.HasField("arguments") else None)
    return DeltaToolCall(index=call.index, id=call.id if call.HasField("id") else None,
                         type="function" if call.HasField("id") else None, function=function)


def to_usage(usage: llm_pb2.Usage | None) -> Usage:
    if usage is None:
        return Usage()
    details = (CompletionTokensDetails(reasoning_tokens=usage.reasoning_tokens)
               if usage.HasField("reasoning_tokens") else None)
    return Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                 total_tokens=usage.prompt_tokens + usage.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_prompt_tokens),
                 completion_tokens_details=details)


class CompletionBuilder:
    """Accumulates a whole response for `stream: false`; choices interleave when n > 1."""

    def __init__(self, request_id: str, model: str, n: int, logprobs: bool = False) -> None:
        self.request_id, self.model = request_id, model
        self.texts: list[str | None] = [None] * n  # None until a delta carries content (llm.proto's ChoiceDelta)
        self.reasoning: list[str | None] = [None] * n
        self.tool_calls: list[list[ToolCall]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.logprobs: list[list[TokenLogprob]] | None = [[] for _ in range(n)] if logprobs else None

    def feed(self, response: llm_pb2.GenerateResponse) -> None:
        for c in response.choices:
            if c.HasField("text"):
                self.texts[c.index] = (self.texts[c.index] or "") + c.text
            if c.reasoning:
                self.reasoning[c.index] = (self.reasoning[c.index] or "") + c.reasoning
            self.tool_calls[c.index].extend(ToolCall(id=t.id, function=FunctionCall(name=t.name, arguments=t.arguments))
                                            for t in c.tool_calls)  # a whole answer's calls come whole
            if self.logprobs is not None:
                self.logprobs[c.index].extend(to_logprobs(c.logprobs))
            if c.finish_reason:
                self.finish[c.index] = c.finish_reason

    def build(self, usage: llm_pb2.Usage | None) -> ChatCompletion:
        choices = [Choice(index=i, message=ResponseMessage(content=text, reasoning=self.reasoning[i],
                                                          tool_calls=self.tool_calls[i] or None),
                          finish_reason=self.finish[i],
                          logprobs=ChoiceLogprobs(content=self.logprobs[i]) if self.logprobs is not None else None)
                   for i, text in enumerate(self.texts)]
        return ChatCompletion(id=self.request_id, model=self.model, choices=choices, usage=to_usage(usage))


class ChunkBuilder:
    """Turns responses into OpenAI chunks: role first, content deltas, a finish chunk per choice, usage last."""

    def __init__(self, request_id: str, model: str, n: int, include_usage: bool, logprobs: bool = False) -> None:
        self.request_id, self.model, self.n, self.include_usage = request_id, model, n, include_usage
        self.logprobs = logprobs

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.request_id, model=self.model, choices=choices, usage=usage)

    def start(self) -> Iterator[ChatCompletionChunk]:
        for i in range(self.n):
            yield self._chunk([ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])

    def feed(self, response: llm_pb2.GenerateResponse) -> Iterator[ChatCompletionChunk]:
        for c in response.choices:
            if c.text or c.reasoning or c.tool_calls or (self.logprobs and c.logprobs):
                logprobs = ChoiceLogprobs(content=to_logprobs(c.logprobs)) if self.logprobs else None
                delta = DeltaMessage(content=c.text if c.HasField("text") else None, reasoning=c.reasoning or None,
                                     tool_calls=[to_delta_call(t) for t in c.tool_calls] or None)
                yield self._chunk([ChunkChoice(index=c.index, delta=delta, logprobs=logprobs)])
            if c.finish_reason:
                yield self._chunk([ChunkChoice(index=c.index, delta=DeltaMessage(), finish_reason=c.finish_reason)])

    def end(self, usage: llm_pb2.Usage | None) -> Iterator[ChatCompletionChunk]:
        if self.include_usage:
            yield self._chunk([], usage=to_usage(usage))
