"""The sampling options, listed once: read from llm.proto's SamplingParams, so the gateway (which fills them from
the OpenAI request) and the language server (which hands them to vLLM) cannot disagree on the list."""

from __future__ import annotations

from dvd.v1 import llm_pb2

# Worked out from other request fields rather than copied: max_tokens (also max_completion_tokens, clamped to the
# context) and logprobs (logprobs + top_logprobs).
DERIVED = frozenset({"max_tokens", "logprobs"})

# Optional scalars that keep one name from the OpenAI request through the proto to vLLM's SamplingParams.
PASS_THROUGH: tuple[str, ...] = tuple(
    f.name for f in llm_pb2.SamplingParams.DESCRIPTOR.fields
    if f.has_presence and f.message_type is None and f.name not in DERIVED)
