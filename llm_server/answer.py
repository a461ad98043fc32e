"""vLLM's outputs as the deltas a client reads, split as vLLM's OpenAI server splits them.

With `--reasoning-parser` and/or `--tool-call-parser`, each choice gets its own vLLM `Parser` (they are stateful)
and the answer is divided into reasoning, content and tool calls by vLLM's code, not ours: `parse_delta` for a
client that streams, `parse` on the whole text for one that does not (vLLM's two paths, which can disagree, so
the gateway says which one its client reads). The parser reads the request's options (tools, tool_choice,
include_reasoning, ...) from vLLM's own `ChatCompletionRequest`, the one the request was parsed into (request.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vllm.config import ModelConfig
from vllm.entrypoints.generate.base.protocol import DeltaToolCall, FunctionCall
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionRequest,
)
from vllm.entrypoints.serve.utils.tool_calls_utils import maybe_filter_parallel_tool_calls
from vllm.logprobs import Logprob
from vllm.outputs import RequestOutput
from vllm.parser import ParserManager
from vllm.parser.abstract_parser import Parser
from vllm.renderers.chat_utils import make_tool_call_id
from vllm.tokenizers import TokenizerLike

from dvd.config import option
from dvd.v2 import llm_pb2


@dataclass(frozen=True)
class ToolOptions:
    """vLLM's server options for tool calling, same flags (an option group of the language server's config;
    --reasoning-parser is an engine option and comes with vLLM's)."""

    tool_call_parser: str = option("", "vLLM's tool parser, which reads tool calls out of answers (InternVL3.5: "
                                       "hermes); needed for tool_choice auto, required and named")
    enable_auto_tool_choice: bool = option(False, "vLLM's: the model may call tools on its own (tool_choice auto); "
                                                  "needs --tool-call-parser")
    exclude_tools_when_tool_choice_none: bool = option(False, "vLLM's: tool_choice none leaves the tools out of the "
                                                              "prompt")


def parser_class(reasoning_parser: str, tokenizer: TokenizerLike, model_name: str,
                 tools: ToolOptions = ToolOptions()) -> type[Parser] | None:
    """The parser class vLLM's server would build for these flags, or None when no output parsing is asked for."""
    if not reasoning_parser and not tools.tool_call_parser:
        return None
    return ParserManager.get_parser(tool_parser_name=tools.tool_call_parser or None,
                                    reasoning_parser_name=reasoning_parser,
                                    enable_auto_tools=tools.enable_auto_tool_choice, tool_strict_level="auto",
                                    model_name=model_name, is_harmony=False, tokenizer=tokenizer)


def token_logprobs(token_ids: Sequence[int], steps: Sequence[dict[int, Logprob] | None] | None, top: int | None,
                   decode: Callable[[int], str]) -> list[llm_pb2.TokenLogprob]:
    """vLLM's per-token logprobs as its OpenAI server reports them (`_create_chat_logprobs`): the sampled token's
    decoded text and log-probability (floored at -9999), and the first `top` entries of the step's dict."""
    if top is None or not steps:
        return []

    def entry(token_id: int, lp: Logprob) -> llm_pb2.TokenLogprob:
        text = lp.decoded_token if lp.decoded_token is not None else decode(token_id)
        return llm_pb2.TokenLogprob(token=text, logprob=max(lp.logprob, -9999.0))

    out = []
    for token_id, step in zip(token_ids, steps, strict=False):
        if step is None or token_id not in step:
            out.append(llm_pb2.TokenLogprob(token=decode(token_id), logprob=-9999.0))
            continue
        sampled = entry(token_id, step[token_id])
        sampled.top.extend(entry(t, lp) for i, (t, lp) in enumerate(step.items()) if i < top)
        out.append(sampled)
    return out


@dataclass
class _Choice:
    parser: Parser | None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    tools_streamed: bool = False


class Answer:
    """One request's choices; `deltas` turns each RequestOutput (vLLM's DELTA kind) into proto deltas."""

    def __init__(self, parser_cls: type[Parser] | None, tokenizer: TokenizerLike, model_config: ModelConfig | None,
                 request: ChatCompletionRequest, template_kwargs: dict,
                 tools: ToolOptions = ToolOptions()) -> None:
        self.request, self.tools = request, tools
        self.stream = bool(request.stream)
        self.parser_cls = parser_cls
        self.choices = [_Choice(parser_cls(tokenizer, request.tools, chat_template_kwargs=template_kwargs,
                                           model_config=model_config) if parser_cls else None)
                        for _ in range(request.n or 1)]

    @property
    def parses_reasoning(self) -> bool:
        return self.parser_cls is not None and self.parser_cls.reasoning_parser_cls is not None

    @property
    def hides_logprobs(self) -> bool:
        """vLLM withholds logprobs when an answer is parsed but its reasoning not returned: they would leak it."""
        return self.parser_cls is not None and not self.request.include_reasoning

    @property
    def named_tool(self) -> bool:
        return isinstance(self.request.tool_choice, ChatCompletionNamedToolChoiceParam)

    def adjust_request(self) -> None:
        """The tool parser's constraint for tool_choice required/named (vLLM's adjust_request), on the request."""
        if self.choices[0].parser is not None:
            self.choices[0].parser.adjust_request(self.request)

    def deltas(self, out: RequestOutput,
               logprobs: Callable[[Sequence[int], object], list[llm_pb2.TokenLogprob]]) -> list[llm_pb2.ChoiceDelta]:
        result = []
        for o in out.outputs:
            ids = list(o.token_ids)
            delta = llm_pb2.ChoiceDelta(index=o.index, token_ids=ids, finish_reason=o.finish_reason or "")
            if not self.hides_logprobs:
                delta.logprobs.extend(logprobs(ids, o.logprobs))
            choice = self.choices[o.index]
            finished = o.finish_reason is not None
            if choice.parser is None:
                delta.text = o.text
            else:
                choice.token_ids.extend(ids)  # read by the parser and its reasoning-token count
                if self.stream:
                    self._stream(choice, delta, o.text, ids, out.prompt_token_ids, finished)
                else:
                    choice.text += o.text
                    if finished:
                        self._whole(choice, delta, out.prompt_token_ids)
            result.append(delta)
        return result

    def _stream(self, choice: _Choice, delta: llm_pb2.ChoiceDelta, text: str, ids: list[int],
                prompt_ids: list[int] | None, finished: bool) -> None:
        """vLLM's streaming path (chat_completion_stream_generator)."""
        assert choice.parser is not None
        message = choice.parser.parse_delta(text, ids, self.request, prompt_token_ids=prompt_ids, finished=finished)
        if message is not None:
            choice.tools_streamed |= bool(message.tool_calls)
            message = maybe_filter_parallel_tool_calls(message, self.request)
            _set_message(delta, message.reasoning, message.content)
            delta.tool_calls.extend(_delta_call(c) for c in message.tool_calls)
        if finished and choice.tools_streamed and not self.named_tool and delta.finish_reason == "stop":
            delta.finish_reason = "tool_calls"  # OpenAI's: "stop" after a named call, "tool_calls" otherwise

    def _whole(self, choice: _Choice, delta: llm_pb2.ChoiceDelta, prompt_ids: list[int] | None) -> None:
        """vLLM's whole-answer path (chat_completion_full_generator): which parsed calls a client gets, and when the
        finish reason is "tool_calls"."""
        assert choice.parser is not None
        if prompt_ids is not None:
            choice.parser.set_prompt_token_ids(prompt_ids)
        auto = self.tools.enable_auto_tool_choice
        reasoning, content, calls = choice.parser.parse(choice.text, self.request, enable_auto_tools=auto,
                                                        model_output_token_ids=choice.token_ids)
        request = self.request
        has_tool_parser = self.parser_cls is not None and self.parser_cls.tool_parser_cls is not None
        required = request.tool_choice == "required"
        kept: list[FunctionCall] = []
        if self.named_tool or required:
            kept, content = list(calls or []), content or ""
        elif request.tools and request.tool_choice in ("auto", None) and auto and has_tool_parser:
            kept = list(calls or [])
        kept = maybe_filter_parallel_tool_calls(kept, request)
        auto_called = bool(kept) and not (self.named_tool or required)
        if auto_called or (required and delta.finish_reason == "stop"):
            delta.finish_reason = "tool_calls"
        _set_message(delta, reasoning if request.include_reasoning else None, content)
        delta.tool_calls.extend(llm_pb2.ToolCallDelta(index=i, id=c.id or make_tool_call_id(), name=c.name,
                                                      arguments=c.arguments) for i, c in enumerate(kept))

    def reasoning_tokens(self) -> int | None:
        """Reasoning tokens over all choices, as vLLM counts them for usage; None without a reasoning parser."""
        if not self.parses_reasoning:
            return None
        return sum(c.parser.count_reasoning_tokens(c.token_ids) for c in self.choices if c.parser is not None)


def _delta_call(call: DeltaToolCall) -> llm_pb2.ToolCallDelta:
    out = llm_pb2.ToolCallDelta(index=call.index, id=call.id)
    if call.function is not None:
        out.MergeFrom(llm_pb2.ToolCallDelta(name=call.function.name, arguments=call.function.arguments))
    return out


def _set_message(delta: llm_pb2.ChoiceDelta, reasoning: str | None, content: str | None) -> None:
    if reasoning:
        delta.reasoning = reasoning
    if content is not None:
        delta.text = content
