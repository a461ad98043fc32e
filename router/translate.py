"""The gateway's view of a request as the language service's GenerateRequest, and where in the fleet it should go."""

from __future__ import annotations

import hashlib

from dvd.media import MEDIA_PARTS
from dvd.v2 import llm_pb2, vision_pb2
from router.schemas import ChatCompletionRequest


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
