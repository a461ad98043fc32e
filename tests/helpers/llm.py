"""Calls to the language service as the tests make them, and stock vLLM's answer as the reference."""

from __future__ import annotations

import grpc
import openai

from dvd.v1 import llm_pb2, llm_pb2_grpc
from tests.helpers.media import data_url


def text(t: str) -> llm_pb2.ContentPart:
    return llm_pb2.ContentPart(text=t)


def image(data: bytes) -> llm_pb2.ContentPart:
    return llm_pb2.ContentPart(image=data)


async def generate(address: str, parts: list[llm_pb2.ContentPart], max_tokens: int = 16,
                   **sampling) -> tuple[list[int], llm_pb2.GenerateResponse]:
    """Greedy (unless told otherwise) token ids of choice 0, and the final message with usage."""
    req = llm_pb2.GenerateRequest(
        messages=[llm_pb2.ChatMessage(role="user", content=parts)],
        sampling=llm_pb2.SamplingParams(max_tokens=max_tokens, **({"temperature": 0.0} | sampling)),
    )
    tokens: list[int] = []
    last = None
    async with grpc.aio.insecure_channel(address) as channel:
        async for msg in llm_pb2_grpc.LanguageServiceStub(channel).Generate(req):
            for c in msg.choices:
                if c.index == 0:
                    tokens.extend(c.token_ids)
            last = msg
    assert last is not None and last.HasField("usage")
    return tokens, last


async def stock_vllm_tokens(base_url: str, images: list[bytes], question: str, max_tokens: int) -> list[int]:
    """Greedy token ids of stock vLLM's OpenAI server for one user message (images first), the reference."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none")
    content = [*({"type": "image_url", "image_url": {"url": data_url(b)}} for b in images),
               {"type": "text", "text": question}]
    ref = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                               max_tokens=max_tokens, temperature=0,
                                               extra_body={"return_token_ids": True})
    return list(ref.choices[0].token_ids or [])


async def health(address: str) -> llm_pb2.LanguageHealthResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        return await llm_pb2_grpc.LanguageServiceStub(channel).Health(llm_pb2.LanguageHealthRequest(), timeout=5)
