"""vLLM general plugin (entry point `vllm.general_plugins`): runs in every vLLM process, workers included.

It swaps vLLM's InternVLChatModel for `DvdInternVLChatModel` (internvl_model.py), which fixes the ragged
image-embedding bug and accepts InternVL3.5-Flash checkpoints.
"""

from __future__ import annotations


def register() -> None:
    from vllm import ModelRegistry

    ModelRegistry.register_model("InternVLChatModel", "llm_server.internvl_model:DvdInternVLChatModel")
