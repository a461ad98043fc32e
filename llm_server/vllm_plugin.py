"""vLLM general plugin (entry point `vllm.general_plugins`): runs in every vLLM process, workers included.

It swaps vLLM's InternVLChatModel for `DvdInternVLChatModel` (internvl_model.py), which fixes the ragged
image-embedding bug and accepts InternVL3.5-Flash checkpoints; and in the engine processes a language server
starts, it arms the parent-death signal: vLLM's EngineCore otherwise outlives a language server that is killed
(or SIGTERMed before its engine is up), holding its memory and, on a GPU node, the GPU.
"""

from __future__ import annotations

import os

ENGINE_PARENT_ENV = "DVD_ENGINE_PARENT"  # set by llm_server to its pid before it starts vLLM's engine


def die_with_parent_engine() -> None:
    parent = os.environ.get(ENGINE_PARENT_ENV)
    if not parent or os.getpid() == int(parent):
        return
    import signal

    from dvd.die_with_parent import arm

    # EngineCore dies with the language server, its workers with EngineCore (same rule, one level down). SIGKILL,
    # not SIGTERM: an EngineCore still starting only notes a SIGTERM and keeps waiting for its dead frontend.
    arm(signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the signal was armed
        os._exit(1)


def register() -> None:
    die_with_parent_engine()
    from vllm import ModelRegistry

    ModelRegistry.register_model("InternVLChatModel", "llm_server.internvl_model:DvdInternVLChatModel")
