"""Turning a gRPC conversation into the model's prompt text, the way vLLM's chat endpoint renders it.

The chat template receives OpenAI-style content lists (`{"type": "image"}`, `{"type": "text", ...}`), which is
what vLLM passes for templates of the "openai" content format (InternVL3.5's), so the same conversation yields
the same prompt, and therefore the same tokens, on DvD and on stock vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from vllm.renderers.chat_utils import _postprocess_messages
from vllm.renderers.hf import safe_apply_chat_template

from dvd.conversation import image_error, role_error, template_role, tool_calls_error
from dvd.v1 import llm_pb2

IMAGE_PLACEHOLDER = "<image>"


class PromptError(ValueError):
    """The request cannot be served as asked (client error); `param` names the offending field, OpenAI-style."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]
    images: list[bytes]
    image_max_tiles: list[int]  # per image: its own tile cap (image_url.detail), 0 = the request's


def parse_messages(messages: list[llm_pb2.ChatMessage]) -> Conversation:
    if not messages:
        raise PromptError("the conversation has no messages")
    out: list[dict] = []
    images: list[bytes] = []
    image_max_tiles: list[int] = []
    for i, m in enumerate(messages):
        if (error := role_error(m.role)) is not None:
            raise PromptError(f"messages[{i}]: {error}")
        parts: list[dict] = []
        for part in m.content:
            kind = part.WhichOneof("part")
            if kind == "text":
                parts.append({"type": "text", "text": part.text})
            elif kind == "image":
                if (error := image_error(m.role)) is not None:
                    raise PromptError(f"messages[{i}]: {error}")
                if not part.image:
                    raise PromptError(f"messages[{i}]: empty image")
                parts.append({"type": "image"})
                images.append(part.image)
                image_max_tiles.append(part.max_tiles)
            else:
                raise PromptError(f"messages[{i}]: empty content part")
        message: dict = {"role": template_role(m.role), "content": parts}
        if m.role == "tool":
            # vLLM hands a tool message's text parts to the template as one string, joined by newlines.
            message["content"] = "\n".join(p["text"] for p in parts)
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            if (error := tool_calls_error(m.role)) is not None:
                raise PromptError(f"messages[{i}]: {error}", param=f"messages[{i}].tool_calls")
            try:
                message["tool_calls"] = json.loads(m.tool_calls)
            except ValueError as e:
                raise PromptError(f"messages[{i}].tool_calls is not valid JSON: {e}",
                                  param=f"messages[{i}].tool_calls") from e
        out.append(message)
    try:
        _postprocess_messages(out)  # vLLM's: tool-call arguments as the objects templates expect
    except ValueError as e:
        raise PromptError(str(e), param="messages") from e
    return Conversation(out, images, image_max_tiles)


def render_prompt(tokenizer, conversation: Conversation, model_config, template_kwargs: dict,
                  tools: list[dict] | None = None) -> str:
    """The chat template through vLLM's own call (`template_kwargs` filtered to what the template reads)."""
    prompt = safe_apply_chat_template(model_config, tokenizer, conversation.messages, tools=tools, tokenize=False,
                                      **template_kwargs)
    found = prompt.count(IMAGE_PLACEHOLDER)
    if found != len(conversation.images):
        raise PromptError(f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholders for {len(conversation.images)} "
                          f"images (text may not contain the literal {IMAGE_PLACEHOLDER})")
    return prompt


def text_token_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens with each `<image>` as an empty `<img></img>` pair: vLLM's tokens minus the
    `<IMG_CONTEXT>` rows it puts between them. The three are special tokens, which the tokenizer never merges with
    their neighbours, so the prompt's length is `len(these) + rows`, in a time that does not grow with the image."""
    return tokenizer.encode("<img></img>".join(prompt.split(IMAGE_PLACEHOLDER)), add_special_tokens=False)
