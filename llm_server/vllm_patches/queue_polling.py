"""vLLM's processes sleep between checks of their shared-memory message queue instead of spinning on it, where
DVD_SHM_POLL_S is set (dvd.procs.cpu_engine_env does on CPU hosts, for stock vLLM baselines too)."""

from __future__ import annotations

import os
import time

from dvd.runtime import SHM_POLL_ENV

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
