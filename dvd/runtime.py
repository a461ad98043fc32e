"""Process-wide settings of a serving process: the allocator for multi-MiB buffers, and the garbage collector."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import logging
import os

log = logging.getLogger("dvd.runtime")

PORTS_ENV = "DVD_PORTS_FILE"  # set by a launcher (dvd/procs.py) that wants to learn the ports a service bound
# Seconds a vLLM process sleeps between checks of its shared-memory message queue instead of spinning on it
# (llm_server/vllm_patches/queue_polling.py); unset or 0 keeps vLLM's spin. Set for CPU engines by
# dvd.procs.cpu_engine_env. An environment variable by necessity: it reaches vLLM's engine and worker processes.
SHM_POLL_ENV = "DVD_SHM_POLL_S"


def tune_allocator() -> None:
    """Keep multi-MiB buffers in glibc's heap instead of a fresh mmap each time.

    By default glibc maps every buffer above its (adaptive, <= 32 MiB) threshold with mmap and unmaps it on free, so
    each tile or image faults its pages in again on arrival (docs/performance.md, "Settings behind the code").
    Equivalent to MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824.
    A no-op outside glibc."""
    name = ctypes.util.find_library("c")
    if not name or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (mallopt(m_mmap_threshold, 32 * 2**20) and mallopt(m_trim_threshold, 2**30)):
        log.warning("mallopt refused the allocator settings")


def freeze_heap() -> None:
    """Move everything start-up allocated (modules, weights' wrappers, vLLM's objects) out of the collector's view.

    Without it each full collection walks millions of start-up objects while requests allocate messages and
    futures (docs/performance.md, "Settings behind the code"). vLLM's engine does the same
    (`freeze_gc_heap`)."""
    gc.collect()
    gc.freeze()


def report_ports(**ports: int) -> None:
    """Tell the launcher which ports this service bound (it asked for port 0: no pre-picked port can be taken by
    another process in between). A no-op unless the launcher set DVD_PORTS_FILE."""
    path = os.environ.get(PORTS_ENV)
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(ports, f)
    os.replace(tmp, path)  # the launcher never reads half a file
