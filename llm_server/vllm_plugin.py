"""vLLM general plugin (entry point `vllm.general_plugins`): runs in every vLLM process, workers included.

It swaps vLLM's InternVLChatModel for `DvdInternVLChatModel` (internvl_model.py), which fixes the ragged
image-embedding bug and accepts InternVL3.5-Flash checkpoints, and applies the changes in `vllm_patches/`: the
engine processes die with their language server, poll their message queue gently, share cores with a vision
server.
"""

from __future__ import annotations

from llm_server.vllm_patches.core_budget import share_cores_with_vision
from llm_server.vllm_patches.engine_parent import die_with_parent_engine
from llm_server.vllm_patches.queue_polling import poll_message_queue_gently


def register() -> None:
    die_with_parent_engine()
    poll_message_queue_gently()
    share_cores_with_vision()
    from vllm import ModelRegistry

    ModelRegistry.register_model("InternVLChatModel", "llm_server.internvl_model:DvdInternVLChatModel")
