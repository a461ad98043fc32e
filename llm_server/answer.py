"""vLLM's outputs as the deltas a client reads, split as vLLM's OpenAI server splits them.

With `--reasoning-parser`, each choice gets its own vLLM `Parser` (they are stateful) and the answer is divided
into reasoning and content by vLLM's code, not ours: `parse_delta` for a client that streams, `parse` on the whole
text for one that does not (vLLM's two paths, which can disagree, so the gateway says which one its client reads).
The parser reads its options from vLLM's own `ChatCompletionRequest`, built once per request from the proto.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vllm.config import ModelConfig
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.outputs import RequestOutput
from vllm.parser import ParserManager
from vllm.parser.abstract_parser import Parser
from vllm.tokenizers import TokenizerLike

from dvd.v1 import llm_pb2
from llm_server.prompt import PromptError

# vLLM's server default for the content format of InternVL3.5's template: OpenAI-style content lists.
CONTENT_FORMAT = "openai"
# Template arguments a request may not set: the server's template and how it is called are not the client's to
# change (the set vLLM's `resolve_chat_template_kwargs` calls unexpected from a request).
SERVER_ONLY_KWARGS = frozenset({"chat_template", "tokenize"})


def parser_class(reasoning_parser: str, tokenizer: TokenizerLike, model_name: str) -> type[Parser] | None:
    """The parser class vLLM's server would build for these flags, or None when no output parsing is asked for."""
    if not reasoning_parser:
        return None
    return ParserManager.get_parser(tool_parser_name=None, reasoning_parser_name=reasoning_parser,
                                    enable_auto_tools=False, tool_strict_level="auto", model_name=model_name,
                                    is_harmony=False, tokenizer=tokenizer)


def openai_request(request: llm_pb2.GenerateRequest, model_name: str) -> ChatCompletionRequest:
    """vLLM's request object for what its chat template and parsers read (the conversation travels apart)."""
    try:
        kwargs = json.loads(request.chat_template_kwargs) if request.chat_template_kwargs else None
        if isinstance(kwargs, dict) and (refused := SERVER_ONLY_KWARGS & kwargs.keys()):
            raise ValueError(f"{', '.join(sorted(refused))} may not be set by a request")
        return ChatCompletionRequest(
            messages=[], model=model_name, chat_template_kwargs=kwargs, stream=request.stream,
            include_reasoning=request.include_reasoning if request.HasField("include_reasoning") else True)
    except ValueError as e:  # pydantic's ValidationError and json's errors are ValueErrors
        raise PromptError(f"invalid chat_template_kwargs: {e}", param="chat_template_kwargs") from e


def chat_template_kwargs(request: ChatCompletionRequest) -> dict:
    """The keyword arguments vLLM gives the chat template and the parser (add_generation_prompt and the rest)."""
    return request.build_chat_params(None, CONTENT_FORMAT).chat_template_kwargs


@dataclass
class _Choice:
    parser: Parser | None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)


class Answer:
    """One request's choices; `deltas` turns each RequestOutput (vLLM's DELTA kind) into proto deltas."""

    def __init__(self, parser_cls: type[Parser] | None, tokenizer: TokenizerLike, model_config: ModelConfig,
                 request: ChatCompletionRequest, template_kwargs: dict, n: int) -> None:
        self.request = request
        self.stream = bool(request.stream)
        self.parsing = parser_cls is not None
        self.choices = [_Choice(parser_cls(tokenizer, None, chat_template_kwargs=template_kwargs,
                                           model_config=model_config) if parser_cls else None) for _ in range(n)]

    @property
    def hides_logprobs(self) -> bool:
        """vLLM withholds logprobs when reasoning is parsed but not returned: they would leak it."""
        return self.parsing and not self.request.include_reasoning

    def deltas(self, out: RequestOutput,
               logprobs: Callable[[Sequence[int], object], list[llm_pb2.TokenLogprob]]) -> list[llm_pb2.ChoiceDelta]:
        result = []
        for o in out.outputs:
            ids = list(o.token_ids)
            delta = llm_pb2.ChoiceDelta(index=o.index, token_ids=ids, finish_reason=o.finish_reason or "")
            if not self.hides_logprobs:
                delta.logprobs.extend(logprobs(ids, o.logprobs))
            choice = self.choices[o.index]
            choice.token_ids.extend(ids)
            finished = o.finish_reason is not None
            if choice.parser is None:
                delta.text = o.text
            elif self.stream:
                message = choice.parser.parse_delta(o.text, ids, self.request, prompt_token_ids=out.prompt_token_ids,
                                                    finished=finished)
                if message is not None:
                    _set_message(delta, message.reasoning, message.content)
            else:
                choice.text += o.text
                if finished:
                    if out.prompt_token_ids is not None:
                        choice.parser.set_prompt_token_ids(out.prompt_token_ids)
                    reasoning, content, _ = choice.parser.parse(choice.text, self.request, enable_auto_tools=False,
                                                                model_output_token_ids=choice.token_ids)
                    _set_message(delta, reasoning if self.request.include_reasoning else None, content)
            result.append(delta)
        return result

    def reasoning_tokens(self) -> int | None:
        """Reasoning tokens over all choices, as vLLM counts them for usage; None without a parser."""
        if not self.parsing:
            return None
        return sum(c.parser.count_reasoning_tokens(c.token_ids) for c in self.choices if c.parser is not None)


def _set_message(delta: llm_pb2.ChoiceDelta, reasoning: str | None, content: str | None) -> None:
    if reasoning:
        delta.reasoning = reasoning
    if content is not None:
        delta.text = content
