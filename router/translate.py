"""OpenAI shapes <-> the language service's protobufs: requests in, token deltas out as chunks or one completion."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from dvd.media import MEDIA_PARTS
from dvd.v2 import llm_pb2, vision_pb2
from router.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionTokensDetails,
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


def to_generate_request(req: ChatCompletionRequest, media: list[bytes], request_id: str) -> llm_pb2.GenerateRequest:
    """`media`: the files of `req.media()`, in the same order."""
    kinds = [MEDIA_PARTS[f"{kind}_url"] for _, _, kind in req.media()]
    return llm_pb2.GenerateRequest(request_id=request_id, chat_request=req.forwarded(),
                                   media=[vision_pb2.Media(kind=k, data=d) for k, d in zip(kinds, media, strict=True)])


def affinity_key(req: ChatCompletionRequest, media: list[bytes]) -> bytes | None:
    """What stays the same from one turn of a conversation to the next: its first image or video (every turn
    resends it; its embeddings are cached where it was encoded), else, once the conversation has a reply in it, its
    opening (system messages and first user message: the prompt prefix vLLM has cached). A first text-only
    request has none (least load)."""
    if media:
        return hashlib.blake2b(media[0], digest_size=16).digest()
    if not any(m.role == "assistant" for m in req.messages):
        return None
    opening = hashlib.blake2b(digest_size=16)
    for message in req.messages:
        opening.update(message.role.encode() + b"\0")
        for part in message.content or ():
            opening.update((part.text or "").encode() + b"\0")
        if message.role == "user":
            break
    return opening.digest()


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
