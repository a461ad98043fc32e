"""Turning a gRPC conversation into the model's prompt text, the way vLLM's chat endpoint renders it.

The chat template receives OpenAI-style content lists (`{"type": "image"}`, `{"type": "video"}`,
`{"type": "text", ...}`), which is what vLLM passes for templates of the "openai" content format (InternVL3.5's),
so the same conversation yields the same prompt, and therefore the same tokens, on DvD and on stock vLLM.

A video reaches vLLM as its frames: vLLM's InternVL puts "Frame1: <img>{256 x <|video_pad|>}</img>Frame2: ..." where
the template wrote `<video>`, and fills the pads with the frames' embeddings. vLLM 0.32 cannot take that from
embeddings (its InternVL video processor needs the frame count it only knows from pixels), so each frame is given
as an image embedding in a "Frame{i}: <image>" text of the same shape: the same tokens at every text position, the
frame's rows where vLLM puts them, and rows per frame free to differ (ViR on Flash checkpoints).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from vllm.renderers.chat_utils import _postprocess_messages
from vllm.renderers.hf import safe_apply_chat_template

from dvd.conversation import image_error, role_error, template_role, tool_calls_error
from dvd.errors import ServiceError
from dvd.v1 import llm_pb2, vision_pb2

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDER = re.compile(f"{IMAGE_PLACEHOLDER}|{VIDEO_PLACEHOLDER}")
_KIND = {IMAGE_PLACEHOLDER: vision_pb2.MEDIA_KIND_IMAGE, VIDEO_PLACEHOLDER: vision_pb2.MEDIA_KIND_VIDEO}


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]
    media: list[bytes]  # encoded images and videos, in conversation order
    kinds: list[int]  # vision_pb2.MediaKind of each
    max_tiles: list[int]  # per file: an image's own tile cap (image_url.detail), 0 = the request's
    paths: list[str]  # per file: where the client put it ("messages[0].content[1].video_url.url"), for errors


def parse_messages(messages: list[llm_pb2.ChatMessage]) -> Conversation:
    if not messages:
        raise ServiceError("the conversation has no messages")
    out: list[dict] = []
    media: list[bytes] = []
    kinds: list[int] = []
    max_tiles: list[int] = []
    paths: list[str] = []
    for i, m in enumerate(messages):
        if (error := role_error(m.role)) is not None:
            raise ServiceError(f"messages[{i}]: {error}")
        parts: list[dict] = []
        for j, part in enumerate(m.content):
            kind = part.WhichOneof("part")
            if kind == "text":
                parts.append({"type": "text", "text": part.text})
            elif kind in ("image", "video"):
                if (error := image_error(m.role)) is not None:
                    raise ServiceError(f"messages[{i}]: {error}")
                data = getattr(part, kind)
                if not data:
                    raise ServiceError(f"messages[{i}]: empty {kind}")
                parts.append({"type": kind})
                media.append(data)
                kinds.append(vision_pb2.MEDIA_KIND_VIDEO if kind == "video" else vision_pb2.MEDIA_KIND_IMAGE)
                max_tiles.append(part.max_tiles)
                paths.append(f"messages[{i}].content[{j}].{kind}_url.url")
            else:
                raise ServiceError(f"messages[{i}]: empty content part")
        message: dict = {"role": template_role(m.role), "content": parts}
        if m.role == "tool":
            # vLLM hands a tool message's text parts to the template as one string, joined by newlines.
            message["content"] = "\n".join(p["text"] for p in parts)
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            if (error := tool_calls_error(m.role)) is not None:
                raise ServiceError(f"messages[{i}]: {error}", param=f"messages[{i}].tool_calls")
            try:
                message["tool_calls"] = json.loads(m.tool_calls)
            except ValueError as e:
                raise ServiceError(f"messages[{i}].tool_calls is not valid JSON: {e}",
                                   param=f"messages[{i}].tool_calls") from e
        out.append(message)
    try:
        _postprocess_messages(out)  # vLLM's: tool-call arguments as the objects templates expect
    except ValueError as e:
        raise ServiceError(str(e), param="messages") from e
    return Conversation(out, media, kinds, max_tiles, paths)


def render_prompt(tokenizer, conversation: Conversation, model_config, template_kwargs: dict,
                  tools: list[dict] | None = None) -> str:
    """The chat template through vLLM's own call (`template_kwargs` filtered to what the template reads)."""
    prompt = safe_apply_chat_template(model_config, tokenizer, conversation.messages, tools=tools, tokenize=False,
                                      **template_kwargs)
    found = [_KIND[p] for p in _PLACEHOLDER.findall(prompt)]
    if found != conversation.kinds:
        raise ServiceError(f"the prompt has {len(found)} {IMAGE_PLACEHOLDER}/{VIDEO_PLACEHOLDER} placeholders for "
                           f"{len(conversation.kinds)} images and videos (text may not contain the literal "
                           f"{IMAGE_PLACEHOLDER} or {VIDEO_PLACEHOLDER})")
    return prompt


def expand_videos(prompt: str, frames: list[int]) -> str:
    """Each `<video>`, in order, as its frames: "Frame1: <image>Frame2: <image>..." (vLLM's InternVL video text)."""
    it = iter(frames)
    return re.sub(re.escape(VIDEO_PLACEHOLDER),
                  lambda _: "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}" for i in range(next(it))), prompt)
