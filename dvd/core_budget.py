"""One CPU host's cores, shared by the vision server and the language engine: who computes where when both have work.

On a CPU host both processes compute with OpenMP over the same cores. Alone, each should have every core; together,
2 x n threads time-share n cores, and each runtime's barriers wait for threads the scheduler gave to the other
process (docs/performance.md, "A shared core budget"). The budget splits the cores only while both have work: the
engine's OpenMP threads are bound to the cores in order, so it keeps its first n - n // 2 threads and the vision
server runs n // 2 threads on the last n // 2 cores; whichever is alone takes every core again at its next step or
batch.

The state is a small file both processes map (its path in DVD_CORE_BUDGET, made and removed by the launcher,
`router.local.start_stack` on CPU): the vision server's busy flag and the time of the engine's last step
(CLOCK_MONOTONIC, one clock for the whole host). The engine counts as busy for ENGINE_IDLE_AFTER_S after a step
began: under load steps follow each other within milliseconds.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import time
from pathlib import Path

ENV = "DVD_CORE_BUDGET"
ENGINE_IDLE_AFTER_S = 0.05
# vision busy (batches running), engine's last step start (monotonic seconds), threads of that step
_LAYOUT = struct.Struct("<qdq")


class CoreBudget:
    def __init__(self, path: str | Path) -> None:
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), _LAYOUT.size)
        self.cpus = sorted(os.sched_getaffinity(0))

    @classmethod
    def from_env(cls) -> CoreBudget | None:
        path = os.environ.get(ENV)
        return cls(path) if path and Path(path).exists() else None

    @staticmethod
    def create() -> Path:
        """A fresh state file (nobody busy) for one stack; the launcher removes it."""
        # Not in /dev/shm: the data plane's sweepers own the dvd- names there. One page, rarely written back.
        fd, name = tempfile.mkstemp(prefix="dvd-core-budget-")
        os.write(fd, _LAYOUT.pack(0, -1e9, 0))
        os.close(fd)
        return Path(name)

    def _read(self) -> tuple[int, float, int]:
        return _LAYOUT.unpack_from(self._map)

    def set_vision_busy(self, busy: bool) -> None:
        struct.pack_into("<q", self._map, 0, int(busy))

    def vision_busy(self) -> bool:
        return self._read()[0] > 0

    def engine_stepped(self, threads: int = 0) -> None:
        struct.pack_into("<dq", self._map, 8, time.monotonic(), threads)

    def engine_step(self) -> tuple[float, int]:
        """When the engine's last step began (monotonic seconds) and on how many threads."""
        return self._read()[1:]

    def engine_busy(self) -> bool:
        return time.monotonic() - self._read()[1] < ENGINE_IDLE_AFTER_S

    @staticmethod
    def engine_share(bound: int) -> int:
        """The engine's threads while both compute, of the `bound` it was started with: its first n - n // 2."""
        return bound - bound // 2 if bound > 1 else bound

    def vision_share(self) -> list[int]:
        """The vision server's cores while both compute: the last n // 2 (all of them on one core)."""
        n = len(self.cpus)
        return self.cpus[n - n // 2:] if n > 1 else self.cpus

    def engine_threads(self, bound: int) -> int:
        """Threads for the engine's next step (its threads are bound to cores in order)."""
        return self.engine_share(bound) if self.vision_busy() else bound

    def vision_cpus(self) -> list[int]:
        """Cores for the vision server's next batch: its share while the engine steps, else all."""
        return self.vision_share() if self.engine_busy() else self.cpus
