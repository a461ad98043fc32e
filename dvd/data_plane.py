"""The embedding data plane's shared rules: who may use shared memory, how a TCP data connection introduces itself,
and how a tile's bytes are viewed without a copy.

gRPC is the control plane (request, one descriptor per tile, errors, cancellation); the tile bytes travel one way,
vision -> language, on the transport the vision server picks from what the client offered (docs/data_plane.md):
shared memory on one host, a TCP connection to the vision server's data port across hosts, inline gRPC bytes as the
fallback. A later RDMA transport (NIXL/UCX) is one more `Transport` value, one more offer in `DataPlaneOffer` and one
more branch in the two `TileSender`/`TileReceiver` classes; nothing else in the request path knows the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import sys
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path

import torch

from dvd.v1 import vision_pb2

log = logging.getLogger("dvd.data_plane")

TICKET_BYTES = 16  # what a TCP data connection sends first: the ticket of the Encode call it serves
SHM_DIR = Path("/dev/shm")
SHM_NAME = re.compile(r"dvd-\d+-[0-9a-f]{32}")  # the only names a vision server opens: never a path
TRANSPORTS = ("auto", "shm", "tcp", "grpc")
# Raw transports send the tensor's own bytes: the wire format (little-endian bf16) is the host's on x86 and ARM.
RAW_BYTES_OK = sys.byteorder == "little"
# EncodeResponse's field for the gRPC fallback's tile bytes, written and read by dvd.tensor_codec.append_raw/split_raw
RAW_TILE_FIELD = vision_pb2.EncodeResponse.DESCRIPTOR.fields_by_name["raw_tile_contents"].number


def shm_domain() -> str:
    """Identity of this process's /dev/shm: two processes with equal domains can open each other's segments.

    Boot id (one kernel) plus the tmpfs mount's device and inode (one IPC namespace: containers get their own
    /dev/shm unless they share the host's). Empty when there is no usable /dev/shm."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        st = SHM_DIR.stat()
    except OSError:
        return ""
    if not os.access(SHM_DIR, os.W_OK) or not RAW_BYTES_OK:
        return ""
    return f"{boot}/{st.st_dev}/{st.st_ino}"


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 tensor over the same memory (no copy)."""
    if not t.is_contiguous():
        raise ValueError("byte_view needs a contiguous tensor")
    return t.reshape(-1).view(torch.uint8)


def owner_gone(path: Path) -> bool:
    """True when the DvD segment at `path` has no owner left: its creator holds a shared flock for the segment's
    whole life (llm_server.data_plane.ShmSlots), so an exclusive lock can be taken only once that process died."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # the lock, if taken, goes with the descriptor


def remove_orphan_segments() -> list[str]:
    """Delete DvD segments whose creator died (SIGKILL skips every cleanup); live owners hold their locks. Either
    side of the data plane runs it: the language server at start, the vision server when it sweeps its mappings,
    and every launcher when a service it started is gone (dvd.procs). Returns the names removed."""
    removed = []
    for path in SHM_DIR.glob("dvd-*"):
        if SHM_NAME.fullmatch(path.name) and owner_gone(path):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path.name)
    if removed:
        log.info("removed orphaned shared-memory segments", extra={"count": len(removed)})
    return removed


class Pending:
    """The one blocking data-plane operation (a copy, a send, a receive) a request has running in a worker thread.

    A request can end (cancelled, failed) while its operation still runs: the thread cannot be stopped, so what it
    uses (a mapping, a segment, a socket) may only be released once it is done. `release` runs then, on the event
    loop, never while the thread still holds the resource."""

    def __init__(self) -> None:
        self._op: Future[None] | None = None

    async def run(self, executor: Executor, fn: Callable[..., None], *args: object) -> None:
        self._op = executor.submit(fn, *args)
        await asyncio.wrap_future(self._op)

    def release(self, fn: Callable[[], None]) -> None:
        """`fn()` now when nothing runs, else on the event loop as soon as the running operation ends."""
        op, self._op = self._op, None
        if op is None or op.done():
            fn()
            return
        loop = asyncio.get_running_loop()
        op.add_done_callback(lambda _: loop.call_soon_threadsafe(fn))
