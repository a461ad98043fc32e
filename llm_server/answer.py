"""The engine's outputs as the answer a client reads, written by vLLM's own chat server.

The language server drives the engine itself (its images come from the vision pool as embeddings), then hands the
engine's outputs to vLLM's `OpenAIServingChat` response generators, the code `vllm serve` answers with: its chunks
for a stream, its chat.completion otherwise, with its parsers (reasoning, tool calls), logprobs, usage and finish
reasons. The gateway forwards the bytes as they are, so a DvD answer is a vLLM answer by construction.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from vllm.engine.protocol import EngineClient
from vllm.entrypoints.generate.base.protocol import RequestResponseMetadata
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.outputs import RequestOutput
from vllm.parser.abstract_parser import Parser

from dvd.config import option
from dvd.errors import ServiceError

CONTENT_FORMAT = "openai"  # vLLM's server default for InternVL3.5's template: OpenAI-style content lists


@dataclass(frozen=True)
class ChatOptions:
    """vLLM's chat server options, same flags and defaults (an option group of the language server's config;
    --reasoning-parser is an engine option and comes with vLLM's)."""

    tool_call_parser: str = option("", "vLLM's tool parser, which reads tool calls out of answers (InternVL3.5: "
                                       "hermes); needed for tool_choice auto, required and named")
    enable_auto_tool_choice: bool = option(False, "vLLM's: the model may call tools on its own (tool_choice auto); "
                                                  "needs --tool-call-parser")
    exclude_tools_when_tool_choice_none: bool = option(False, "vLLM's: tool_choice none leaves the tools out of the "
                                                              "prompt")
    enable_prompt_tokens_details: bool = option(False, "vLLM's: usage says how many prompt tokens were cached and "
                                                       "how many were images' (prompt_tokens_details)")


def chat_server(engine: EngineClient, model_names: Sequence[str], reasoning_parser: str,
                options: ChatOptions = ChatOptions()) -> OpenAIServingChat:
    """vLLM's chat server as `vllm serve` builds it for these flags; only its response generators are used (the
    request was rendered here, with the vision pool's embeddings)."""
    models = OpenAIServingModels(engine, [BaseModelPath(name, engine.model_config.model) for name in model_names])
    return OpenAIServingChat(  # online_renderer: only its request path renders, and it is not taken
        engine, models, "assistant", online_renderer=None, request_logger=None, chat_template=None,
        chat_template_content_format=CONTENT_FORMAT, reasoning_parser=reasoning_parser,
        enable_auto_tools=options.enable_auto_tool_choice, tool_parser=options.tool_call_parser or None,
        exclude_tools_when_tool_choice_none=options.exclude_tools_when_tool_choice_none,
        enable_prompt_tokens_details=options.enable_prompt_tokens_details)


class Progress:
    """The engine's outputs on their way to vLLM's generators, counted: the first token's time, tokens so far (the
    gateway's clock and usage), cached prompt tokens."""

    def __init__(self, outputs: AsyncIterator[RequestOutput]) -> None:
        self.outputs = outputs
        self.tokens = self.cached = self._sent = 0
        self.first_token_at: float | None = None
        self.first_token = asyncio.Event()

    def new_tokens(self) -> int:
        """Tokens generated since the last call."""
        new, self._sent = self.tokens - self._sent, self.tokens
        return new

    async def each(self) -> AsyncIterator[RequestOutput]:
        async for out in self.outputs:
            self.cached = out.num_cached_tokens or self.cached
            self.tokens += sum(len(o.token_ids) for o in out.outputs)
            if self.tokens and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
                self.first_token.set()
            yield out

    async def whole(self) -> AsyncIterator[RequestOutput]:
        """The outputs (vLLM's DELTA kind, so the first token is seen) merged into one, as vLLM's full generator
        reads the last output it gets (the FINAL_ONLY kind vLLM's server would have asked for)."""
        whole: RequestOutput | None = None
        async for out in self.each():
            if whole is None:
                whole = out
            else:
                whole.add(out, aggregate=True)
        if whole is not None:
            whole.outputs.sort(key=lambda o: o.index)
            yield whole


async def _resumed(first: RequestOutput | None, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    if first is not None:
        yield first
    async for out in rest:
        yield out


async def answer(chat: OpenAIServingChat, request: ChatCompletionRequest, progress: Progress, request_id: str,
                 template_kwargs: dict, parser: Parser | None,
                 mm_token_counts: dict[str, int] | None = None) -> AsyncIterator[bytes]:
    """vLLM's answer: for a stream, its server-sent events; otherwise an empty piece once the first token is out
    (the gateway's first-token time), then the chat.completion's JSON."""
    model = chat.models.model_name()
    # The generators read the conversation only for `echo`, which this server refuses (request.py): none is passed.
    metadata = RequestResponseMetadata(request_id=request_id)
    tokenizer = chat.renderer.tokenizer
    if request.stream:
        # The first output is awaited here: a failure before it (a dead engine) stays the caller's to answer, so
        # the gateway may still try another replica; a later one becomes vLLM's error event.
        outputs = progress.each()
        first = await anext(outputs, None)
        async for event in chat.chat_completion_stream_generator(
                request, _resumed(first, outputs), request_id, model, [], tokenizer, metadata,
                chat_template_kwargs=template_kwargs, mm_token_counts=mm_token_counts):
            yield event.encode()
        return
    whole = asyncio.ensure_future(chat.chat_completion_full_generator(
        request, progress.whole(), request_id, model, [], tokenizer, metadata, parser=parser,
        mm_token_counts=mm_token_counts))
    first = asyncio.ensure_future(progress.first_token.wait())
    try:
        await asyncio.wait({whole, first}, return_when=asyncio.FIRST_COMPLETED)
        if not whole.done():
            yield b""
        response = await whole
    finally:
        first.cancel()
        whole.cancel()
    if isinstance(response, ErrorResponse):
        raise ServiceError(response.error.message, grpc.StatusCode.INTERNAL)
    yield response.model_dump_json().encode()
