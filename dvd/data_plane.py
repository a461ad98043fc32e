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
import secrets
import socket
import ssl
import sys
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path

import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dvd.v2 import vision_pb2

log = logging.getLogger("dvd.data_plane")

TICKET_BYTES = 16  # what a TCP data connection sends first: the ticket of the Encode call it serves
KEY_BYTES = 16  # under mutual TLS it sends a key too (AES-128-GCM), inside TLS: the key its tiles are sealed with
TAG_BYTES = 16  # an AES-GCM tag follows each sealed tile
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


class DataConnection:
    """A TCP data connection once it has introduced itself: it carries tiles one way, each as its raw bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send_tile(self, data: memoryview) -> None:
        self.sock.sendall(data)

    def recv_tile(self, out: memoryview) -> None:
        """Exactly len(out) bytes into `out`; OSError (timeout, reset, closed) or ConnectionError (EOF)."""
        _recv_exactly(self.sock, out)

    def shutdown(self) -> None:
        """Wake a send or receive still blocked in its thread; the descriptor stays open until `close`."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


class SealedConnection(DataConnection):
    """The data connection under mutual TLS. TLS authenticates both ends and carries the ticket and a fresh key the
    receiver chose; then both ends shut TLS down and each tile travels as one AES-128-GCM message (ciphertext, tag)
    under that key. Why not TLS records throughout: Python's `ssl` hands over one 16 KiB record per call, which
    cost more than the cipher itself; one cipher call per tile does not (docs/data_plane.md, "Under mutual TLS").
    Nonces count the tiles of this connection (one key, one direction, never reused), so a tile dropped, replayed,
    reordered or altered on the wire fails to open, and the receiver drops the connection."""

    def __init__(self, sock: socket.socket, key: bytes) -> None:
        super().__init__(sock)
        self._aead = AESGCM(key)
        self._count = 0
        self._buf = bytearray()

    def _nonce(self) -> bytes:
        self._count += 1
        return self._count.to_bytes(12, "little")

    def _buffer(self, size: int) -> memoryview:
        if len(self._buf) < size:
            self._buf = bytearray(size)
        return memoryview(self._buf)[:size]

    def send_tile(self, data: memoryview) -> None:
        sealed = self._buffer(len(data) + TAG_BYTES)
        self._aead.encrypt_into(self._nonce(), data, None, sealed)
        self.sock.sendall(sealed)

    def recv_tile(self, out: memoryview) -> None:
        sealed = self._buffer(len(out) + TAG_BYTES)
        _recv_exactly(self.sock, sealed)
        try:
            self._aead.decrypt_into(self._nonce(), sealed, None, out)
        except Exception as e:  # cryptography's InvalidTag: altered, replayed or out of order
            raise ConnectionError("a tile failed its integrity check") from e


def _recv_exactly(sock: socket.socket, out: memoryview) -> None:
    got = 0
    while got < len(out):
        n = sock.recv_into(out[got:], len(out) - got, socket.MSG_WAITALL)
        if n == 0:
            raise ConnectionError(f"closed after {got} of {len(out)} bytes")
        got += n


def connect_data(sock: socket.socket, ticket: bytes, tls: ssl.SSLContext | None) -> DataConnection:
    """The receiving end's introduction on a connected socket: the ticket, or under TLS the ticket and a new key
    inside a mutually authenticated TLS session that is then shut down (the socket carries sealed tiles after)."""
    if tls is None:
        sock.sendall(ticket)
        return DataConnection(sock)
    key = secrets.token_bytes(KEY_BYTES)
    session = tls.wrap_socket(sock)
    session.sendall(ticket + key)
    return SealedConnection(session.unwrap(), key)


def accept_data(sock: socket.socket, tls: ssl.SSLContext) -> tuple[SealedConnection, bytes]:
    """The sending end's side of the TLS introduction: raises (ssl.SSLError) for a peer without a certificate the
    CA signed, before it can send anything; returns the sealed connection and its ticket."""
    session = tls.wrap_socket(sock, server_side=True)
    try:
        intro = b""
        while len(intro) < TICKET_BYTES + KEY_BYTES:
            chunk = session.recv(TICKET_BYTES + KEY_BYTES - len(intro))
            if not chunk:
                raise ConnectionError("closed before its ticket")
            intro += chunk
        plain = session.unwrap()
    except BaseException:
        session.close()
        raise
    return SealedConnection(plain, intro[TICKET_BYTES:]), intro[:TICKET_BYTES]
