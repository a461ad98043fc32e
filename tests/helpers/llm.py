"""Calls to the language service as the tests make them, and stock vLLM's answer as the reference."""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2_grpc

from dvd.health import probe
from dvd.v2 import llm_pb2, llm_pb2_grpc, vision_pb2
from tests.helpers.media import data_url


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(data: bytes) -> vision_pb2.Media:
    return vision_pb2.Media(kind=vision_pb2.MEDIA_KIND_IMAGE, data=data)


def video(data: bytes) -> vision_pb2.Media:
    return vision_pb2.Media(kind=vision_pb2.MEDIA_KIND_VIDEO, data=data)


def chat_request(parts: list[dict | vision_pb2.Media], messages: list[dict] | None = None, request_id: str = "",
                 **fields: object) -> llm_pb2.GenerateRequest:
    """A GenerateRequest as the gateway sends it: one user message of `parts` (after `messages`), each file as an
    emptied image_url / video_url part with its bytes in `media`, and the request's other OpenAI fields."""
    content = [p if isinstance(p, dict) else
               {"type": "video_url" if p.kind == vision_pb2.MEDIA_KIND_VIDEO else "image_url",
                "video_url" if p.kind == vision_pb2.MEDIA_KIND_VIDEO else "image_url": {"url": ""}} for p in parts]
    body = {"model": "tiny", "messages": [*(messages or []), {"role": "user", "content": content}], **fields}
    return llm_pb2.GenerateRequest(request_id=request_id, chat_request=json.dumps(body).encode(),
                                   media=[p for p in parts if not isinstance(p, dict)])


async def answer(address: str, req: llm_pb2.GenerateRequest) -> tuple[dict, llm_pb2.GenerateResponse]:
    """A whole (not streamed) answer's chat.completion, and the final message with usage."""
    body = b""
    last = None
    async with grpc.aio.insecure_channel(address) as channel:
        async for msg in llm_pb2_grpc.LanguageServiceStub(channel).Generate(req):
            body += msg.body
            last = msg
    assert last is not None and last.HasField("usage")
    return json.loads(body), last


async def generate(address: str, parts: list[dict | vision_pb2.Media], max_tokens: int = 16,
                   **fields: object) -> tuple[list[int], llm_pb2.GenerateResponse]:
    """Greedy (unless told otherwise) token ids of choice 0, and the final message with usage."""
    req = chat_request(parts, max_tokens=max_tokens, **({"temperature": 0.0, "return_token_ids": True} | fields))
    reply, last = await answer(address, req)
    return reply["choices"][0]["token_ids"], last


async def stock_vllm_tokens(base_url: str, images: list[bytes], question: str, max_tokens: int) -> list[int]:
    """Greedy token ids of stock vLLM's OpenAI server for one user message (images first), the reference."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none")
    content = [*({"type": "image_url", "image_url": {"url": data_url(b)}} for b in images),
               {"type": "text", "text": question}]
    ref = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                               max_tokens=max_tokens, temperature=0,
                                               extra_body={"return_token_ids": True})
    return list(ref.choices[0].token_ids or [])


@dataclass
class LanguageStatus:
    ready: bool  # grpc.health.v1
    running_requests: int  # its load trailer
    metadata: llm_pb2.LanguageMetadata


async def health(address: str) -> LanguageStatus:
    async with grpc.aio.insecure_channel(address) as channel:
        ready, load, _ = await probe(health_pb2_grpc.HealthStub(channel), "", timeout=5)
        meta = await llm_pb2_grpc.LanguageServiceStub(channel).Metadata(vision_pb2.MetadataRequest(), timeout=5)
    return LanguageStatus(ready, int(load), meta)


def assert_logprobs_close(ours: list, ref: list, tolerance: float) -> None:
    """Two greedy answers with their logprobs (OpenAI's `logprobs.content` entries), compared as vLLM's own model
    tests compare two implementations (`check_logprobs_close`): the same tokens with logprobs within `tolerance`,
    until the first position where they picked different tokens. There each side's token must be in the other's top
    logprobs, within `tolerance` of the other's pick: a near tie that rounding may break either way (the vision
    server's bf16 ViT batches tiles as it does, vLLM's in one forward). The answers may part after it."""
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        if a.token != b.token:
            # Several ids may decode to one text (empty, say): the entry of that text nearest the pick is the rival.
            gap_in_ref = min((abs(t.logprob - b.logprob) for t in b.top_logprobs if t.token == a.token), default=None)
            gap_in_ours = min((abs(t.logprob - a.logprob) for t in a.top_logprobs if t.token == b.token), default=None)
            assert None not in (gap_in_ref, gap_in_ours), f"position {i}: {a.token!r} vs {b.token!r} is no near tie"
            assert max(gap_in_ref, gap_in_ours) <= tolerance, (i, gap_in_ref, gap_in_ours)
            return
        assert a.logprob == pytest.approx(b.logprob, abs=tolerance), i
        assert [t.logprob for t in a.top_logprobs] == pytest.approx([t.logprob for t in b.top_logprobs],
                                                                    abs=tolerance), i
