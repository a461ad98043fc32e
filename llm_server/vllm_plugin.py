"""vLLM general plugin (entry point `vllm.general_plugins`): runs in every vLLM process, workers included.

It swaps vLLM's InternVLChatModel for `DvdInternVLChatModel` (internvl_model.py), which fixes the ragged
image-embedding bug and accepts InternVL3.5-Flash checkpoints; and in the engine processes a language server
starts, it arms the parent-death signal: vLLM's EngineCore otherwise outlives a language server that is killed
(or SIGTERMed before its engine is up), holding its memory and, on a GPU node, the GPU. Where DVD_SHM_POLL_S
is set (dvd.procs.cpu_engine_env does on CPU hosts, for stock vLLM baselines too), vLLM's processes sleep between
checks of their shared-memory message queue instead of spinning on it.
"""

from __future__ import annotations

import os
import time

from dvd.runtime import SHM_POLL_ENV

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


# The shortest sleep between checks, and the share of the time already waited that the next sleep may add.
MIN_POLL_S = 0.0001
POLL_BACKOFF = 0.25


def poll_pause(waited_s: float, longest_s: float) -> float:
    """Sleep a quarter of the time already waited, between MIN_POLL_S and `longest_s`: an answer that comes quickly
    (a step's second RPC, the next step's schedule) is seen within 0.1 ms, while a reader waiting through a long
    step wakes at most every `longest_s`. Each wake-up preempts a thread computing on the same cores, and OpenMP's
    barriers wait for that thread (dvd/procs.py, CPU_SHM_POLL_S)."""
    return min(longest_s, max(MIN_POLL_S, waited_s * POLL_BACKOFF))


def poll_message_queue_gently() -> None:
    """Sleep (poll_pause, at most SHM_POLL_ENV seconds) where vLLM's queue reader would spin (sched_yield) in the
    first second after a message. On a GPU node the spin costs one idle core; on a CPU host it takes the cores the
    engine computes on (measurements: dvd/procs.py, CPU_SHM_POLL_S). vLLM 0.32 has no setting for it (upstream PRs
    #52814, #52848)."""
    longest = float(os.environ.get(SHM_POLL_ENV) or 0)
    if longest <= 0:
        return
    from vllm.distributed.device_communicators import shm_broadcast

    spin = shm_broadcast.SpinCondition
    spin_wait = spin.wait
    if getattr(spin_wait, "dvd_pause", None) is not None:  # plugins load once per process, but may load again
        return

    def wait(self: shm_broadcast.SpinCondition, timeout_ms: int | None = None) -> None:
        if self.is_reader:
            now = time.monotonic()
            if now <= self.last_read + self.busy_loop_s:
                # The wait starts at the first check after a read (last_read is before the reader's own work).
                if getattr(self, "dvd_read", None) != self.last_read:
                    self.dvd_read, self.dvd_wait_start = self.last_read, now
                # the caller checks the queue again, exactly as after vLLM's sched_yield
                time.sleep(poll_pause(now - self.dvd_wait_start, longest))
                return
        spin_wait(self, timeout_ms)

    wait.dvd_pause = longest  # type: ignore[attr-defined]
    spin.wait = wait  # type: ignore[method-assign]


def share_cores_with_vision() -> None:
    """Where DVD_CORE_BUDGET names a core budget (dvd/core_budget.py; CPU hosts whose launcher shares the cores with
    a vision server), the CPU worker notes each step and runs it on its first threads only while the vision server
    has a batch. vLLM's worker refuses torch.set_num_threads after binding its threads to cores; torch's own
    setter is called, before each step, between parallel regions."""
    from dvd.core_budget import CoreBudget

    budget = CoreBudget.from_env()
    if budget is None:
        return
    try:
        from vllm.v1.worker.cpu_worker import CPUWorker
    except ImportError:  # not a CPU build
        return
    execute = CPUWorker.execute_model
    if getattr(execute, "dvd_budget", False):
        return
    import torch

    state = {"bound": 0, "now": 0}

    def execute_model(self: CPUWorker, *args: object, **kwargs: object) -> object:
        if not state["bound"]:
            state["bound"] = state["now"] = torch.get_num_threads()  # as vLLM's thread binding left it
            from vllm.logger import init_logger

            init_logger("vllm.dvd").info("core budget shared with the vision server: %d threads, %d while it "
                                         "computes", state["bound"], budget.engine_share(state["bound"]))
        want = budget.engine_threads(state["bound"])
        if want != state["now"]:
            torch._C.set_num_threads(want)
            state["now"] = want
        budget.engine_stepped(want)
        return execute(self, *args, **kwargs)

    execute_model.dvd_budget = True  # type: ignore[attr-defined]
    CPUWorker.execute_model = execute_model  # type: ignore[method-assign]


def register() -> None:
    die_with_parent_engine()
    poll_message_queue_gently()
    share_cores_with_vision()
    from vllm import ModelRegistry

    ModelRegistry.register_model("InternVLChatModel", "llm_server.internvl_model:DvdInternVLChatModel")
