"""vLLM's EngineCore outlives a language server that is killed (or SIGTERMed before its engine is up), holding its
memory and, on a GPU node, the GPU: in the engine processes a language server starts, the parent-death signal."""

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
