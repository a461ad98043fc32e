"""The conversation (request.py) as the model's prompt text, the way vLLM's chat endpoint renders it.

A video reaches vLLM as its frames: vLLM's InternVL puts "Frame1: <img>{256 x <|video_pad|>}</img>Frame2: ..." where
the template wrote `<video>`, and fills the pads with the frames' embeddings. vLLM 0.32 cannot take that from
embeddings (its InternVL video processor needs the frame count it only knows from pixels), so each frame is given
as an image embedding in a "Frame{i}: <image>" text of the same shape: the same tokens at every text position, the
frame's rows where vLLM puts them, and rows per frame free to differ (ViR on Flash checkpoints).
"""

from __future__ import annotations

import re

from vllm.renderers.hf import safe_apply_chat_template

from dvd.errors import ServiceError
from dvd.v2 import vision_pb2
from llm_server.request import Conversation

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDER = re.compile(f"{IMAGE_PLACEHOLDER}|{VIDEO_PLACEHOLDER}")
_KIND = {IMAGE_PLACEHOLDER: vision_pb2.MEDIA_KIND_IMAGE, VIDEO_PLACEHOLDER: vision_pb2.MEDIA_KIND_VIDEO}


def render_prompt(tokenizer, conversation: Conversation, model_config, template_kwargs: dict,
                  tools: list[dict] | None = None) -> str:
    """The chat template through vLLM's own call (`template_kwargs` filtered to what the template reads)."""
    prompt = safe_apply_chat_template(model_config, tokenizer, conversation.messages, tools=tools, tokenize=False,
                                      **template_kwargs)
    found = [_KIND[p] for p in _PLACEHOLDER.findall(prompt)]
    if found != [m.kind for m in conversation.media]:
        raise ServiceError(f"the prompt has {len(found)} {IMAGE_PLACEHOLDER}/{VIDEO_PLACEHOLDER} placeholders for "
                           f"{len(conversation.media)} images and videos (text may not contain the literal "
                           f"{IMAGE_PLACEHOLDER} or {VIDEO_PLACEHOLDER})")
    return prompt


def expand_videos(prompt: str, frames: list[int]) -> str:
    """Each `<video>`, in order, as its frames: "Frame1: <image>Frame2: <image>..." (vLLM's InternVL video text)."""
    it = iter(frames)
    return re.sub(re.escape(VIDEO_PLACEHOLDER),
                  lambda _: "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}" for i in range(next(it))), prompt)
