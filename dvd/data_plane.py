"""The embedding data plane's shared rules: who may use shared memory, how a TCP data connection introduces itself,
and how a tile's bytes are viewed without a copy.

gRPC is the control plane (request, one descriptor per tile, errors, cancellation); the tile bytes travel one way,
vision -> language, on the transport the vision server picks from what the client offered (docs/data_plane.md):
shared memory on one host, a TCP connection to the vision server's data port across hosts, inline gRPC bytes as the
fallback. A later RDMA transport (NIXL/UCX) is one more `Transport` value, one more offer in `DataPlaneOffer` and one
more branch in the two `TileSender`/`TileReceiver` classes; nothing else in the request path knows the transport.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch

from dvd.v1 import vision_pb2

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
