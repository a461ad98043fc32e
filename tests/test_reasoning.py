"""Reasoning output (`--reasoning-parser`, `chat_template_kwargs`, `include_reasoning`) through DvD, against stock
vLLM's OpenAI server started with the same parser on the same checkpoint.

The engines here run only for this module (a parser changes every answer, so the session's servers run without
one). Random weights rarely close a think block, so the end-to-end cases compare whole answers that are all
reasoning (thinking on) or all content (InternVL3.5's `enable_thinking: false`); the split inside an answer is
checked on scripted outputs through the same vLLM parser the server uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest

from tests.conftest import start_llm, start_stock_vllm
from tests.helpers.router import data_url, png_bytes, user_message

PARSER = ("--reasoning-parser", "qwen3")  # InternVL3.5's language model is Qwen3; so is its thinking markup
IMAGE = data_url(png_bytes((448, 448), (30, 160, 90)))


@pytest.fixture(scope="module")
def stock(tiny_ckpt: Path) -> Iterator[openai.AsyncOpenAI]:
    svc, url = start_stock_vllm("vllm-reasoning", tiny_ckpt, *PARSER)
    yield openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    svc.stop()


@pytest.fixture(scope="module")
def dvd(tiny_ckpt: Path, vision_tiny: str) -> Iterator[openai.AsyncOpenAI]:
    from dvd.procs import router

    llm, address = start_llm("llm-reasoning", tiny_ckpt, vision_tiny, "--served-model-name", "tiny", *PARSER)
    gateway = router(address, name="router-reasoning")
    url = f"{gateway.wait_http()}/v1"
    yield openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    gateway.stop()
    llm.stop()


def counts(usage: openai.types.CompletionUsage) -> dict:
    """Usage without prompt_tokens_details, which DvD always sends and vLLM only when told to."""
    return usage.model_dump(exclude_none=True, exclude={"prompt_tokens_details"})


async def answer(client: openai.AsyncOpenAI, stream: bool, **extra: object) -> dict:
    """Reasoning, content, finish reason and usage of one greedy answer, read whole or from the stream."""
    args = {"model": "tiny", "messages": [user_message("Think, then name the colour.", images=(IMAGE,))],
            "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True, **extra}}
    if not stream:
        reply = await client.chat.completions.create(**args)
        message = reply.choices[0].message
        return {"reasoning": getattr(message, "reasoning", None), "content": message.content,
                "finish": reply.choices[0].finish_reason, "usage": counts(reply.usage)}
    reasoning: list[str] = []
    content: list[str] = []
    finish = usage = None
    async for chunk in await client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                            **args):
        if chunk.usage is not None:
            usage = counts(chunk.usage)
        for choice in chunk.choices:
            reasoning.append(getattr(choice.delta, "reasoning", None) or "")
            content.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return {"reasoning": "".join(reasoning) or None, "content": "".join(content) or None, "finish": finish,
            "usage": usage}


CASES = {"thinking": {}, "no-thinking": {"chat_template_kwargs": {"enable_thinking": False}},
         "hidden": {"include_reasoning": False}}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("case", list(CASES))
async def test_reasoning_equals_stock_vllm(dvd: openai.AsyncOpenAI, stock: openai.AsyncOpenAI, case: str,
                                           stream: bool) -> None:
    ours = await answer(dvd, stream, **CASES[case])
    ref = await answer(stock, stream, **CASES[case])
    assert ours == ref
    details = ours["usage"].get("completion_tokens_details", {})
    if case == "thinking":  # the think block never closes: all reasoning
        assert ours["reasoning"] and not ours["content"] and details["reasoning_tokens"] > 0
    elif case == "no-thinking":  # the template closed the think block in the prompt: all content
        assert ours["content"] and not ours["reasoning"] and details["reasoning_tokens"] == 0
    else:  # parsed as reasoning, then withheld
        assert not ours["reasoning"]


@pytest.mark.parametrize("kwargs", [{"tokenize": True}, {"chat_template": "{{ 'x' }}"}, ["enable_thinking"]])
async def test_bad_chat_template_kwargs_are_400s(dvd: openai.AsyncOpenAI, kwargs: object) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await answer(dvd, False, chat_template_kwargs=kwargs)
    assert info.value.body["param"] == "chat_template_kwargs", info.value.body
    assert (await answer(dvd, False))["reasoning"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("include", [True, False])
def test_a_think_block_is_split_where_it_closes(tiny_ckpt: Path, stream: bool, include: bool) -> None:
    """The language server's plumbing around vLLM's parser, on an answer that closes its think block mid-way, fed
    token by token as the engine delivers it (two choices, to show each has its own parser state)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tokenizers import get_tokenizer

    from llm_server.answer import Answer, chat_template_kwargs, parser_class

    tokenizer = get_tokenizer(str(tiny_ckpt), trust_remote_code=True)
    request = ChatCompletionRequest(messages=[], model="tiny", stream=stream, include_reasoning=include)
    answer = Answer(parser_class("qwen3", tokenizer, str(tiny_ckpt)), tokenizer, None, request,
                    chat_template_kwargs(request), n=2)
    texts = ["the sky is blue</think>Blue.", "red</think>Red, I think."]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    reasoning, content = ["", ""], [None, None]
    for step in range(max(map(len, ids))):
        outputs = [SimpleNamespace(index=i, token_ids=t[step:step + 1], text=tokenizer.decode(t[step:step + 1]),
                                   logprobs=None, finish_reason="stop" if step == len(t) - 1 else None)
                   for i, t in enumerate(ids) if step < len(t)]
        for delta in answer.deltas(SimpleNamespace(outputs=outputs, prompt_token_ids=[1, 2, 3]), lambda *_: []):
            reasoning[delta.index] += delta.reasoning
            if delta.HasField("text"):
                content[delta.index] = (content[delta.index] or "") + delta.text
    assert content == ["Blue.", "Red, I think."]
    assert reasoning == (["the sky is blue", "red"] if include else ["", ""])
    assert answer.reasoning_tokens() == sum(t.index(tokenizer.convert_tokens_to_ids("</think>")) for t in ids)
