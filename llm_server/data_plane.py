"""Receiving side of the data plane: shared-memory segments offered to a vision server on this host, a TCP data
connection to one on another, and the one copy of each tile into the image's preallocated tensor.

Copies per received byte before vLLM gets it: one on every transport (segment -> tensor, socket -> tensor with
`recv_into`, gRPC's received message -> tensor: `read_response` leaves the inline bytes where gRPC put them).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
import secrets
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from dvd.data_plane import (
    RAW_BYTES_OK,
    RAW_TILE_FIELD,
    SHM_DIR,
    TICKET_BYTES,
    DataConnection,
    Pending,
    byte_view,
    connect_data,
    remove_orphan_segments,
    shm_domain,
)
from dvd.health import VISION_SERVICE
from dvd.tensor_codec import split_raw
from dvd.v2 import vision_pb2, vision_pb2_grpc

log = logging.getLogger("llm_server.data_plane")

CONNECT_TIMEOUT_S = 2.0
PIN_MEMORY = torch.cuda.is_available()  # page-locked receive buffers: the copy to the GPU needs no staging


def image_buffer(rows: int, hidden: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The tensor one image's tiles are received into, in place: vLLM gets it as it is.

    On the host it comes from glibc's malloc, which (with `dvd.runtime.tune_allocator`) hands back the memory of
    images already freed; torch.empty's aligned allocations do not, and fault every page of a new image in again
    (docs/performance.md, "Settings behind the code")."""
    if PIN_MEMORY:
        return torch.empty((rows, hidden), dtype=dtype, pin_memory=True)
    return torch.from_numpy(np.empty(rows * hidden * dtype.itemsize, dtype=np.uint8)).view(dtype).view(rows, hidden)


def read_response(data: bytes) -> tuple[vision_pb2.EncodeResponse, list[memoryview]]:
    """Encode's response deserializer: the descriptors parsed, the inline tiles' bytes (`raw_tile_contents`) left as
    views of the message gRPC received. A message that is not one makes gRPC log and yield None."""
    head, raw = split_raw(data, RAW_TILE_FIELD)
    return vision_pb2.EncodeResponse.FromString(head), raw


class VisionStub(vision_pb2_grpc.VisionServiceStub):
    """The generated stub, but Encode's answers come as `read_response` gives them: (message, inline bytes)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        super().__init__(channel)
        self.Encode = channel.unary_stream(f"/{VISION_SERVICE}/Encode",
                                           request_serializer=vision_pb2.EncodeRequest.SerializeToString,
                                           response_deserializer=read_response)


class BrokenStream(RuntimeError):
    """A vision server's answer that does not add up: tile bytes that did not arrive as described (a server that died
    mid-tile, a descriptor out of bounds), or descriptors out of order or count. The call is tried on another."""


@dataclass
class ShmSlot:
    name: str
    fd: int
    size: int
    mm: mmap.mmap


class ShmSlots:
    """Reusable shared-memory segments, one per Encode call in flight, within a byte budget.

    Segments are allocated up front (posix_fallocate), so a full /dev/shm is an error here, at creation, never a
    SIGBUS in the vision server; and reused, so their pages are faulted in once. Each holds a shared flock for its
    lifetime: a segment whose lock can be taken exclusively has no owner left (its process died) and is removed."""

    def __init__(self, budget_bytes: int, keep_free: int = 4) -> None:
        self.budget_bytes = budget_bytes
        self.keep_free = keep_free
        self.domain = shm_domain() if budget_bytes > 0 else ""
        self._free: list[ShmSlot] = []
        self._used = 0
        if self.domain:
            remove_orphan_segments()

    def acquire(self, nbytes: int) -> ShmSlot | None:
        """A segment of at least `nbytes`, or None (over budget, /dev/shm full): the caller uses another transport."""
        fits = [s for s in self._free if s.size >= nbytes]
        if fits:
            slot = min(fits, key=lambda s: s.size)
            self._free.remove(slot)
            return slot
        size = 1 << max(20, (nbytes - 1).bit_length())  # powers of two from 1 MiB: few sizes, often reused
        while self._used + size > self.budget_bytes and self._free:
            self._destroy(self._free.pop(0))
        if self._used + size > self.budget_bytes:
            return None
        try:
            slot = self._create(size)
        except OSError as e:
            log.warning("cannot create a shared-memory segment; using another transport",
                        extra={"bytes": size, "error": str(e)})
            return None
        self._used += size
        return slot

    def release(self, slot: ShmSlot, reuse: bool = True) -> None:
        """Give a segment back. `reuse=False` for a call that ended before its last tile: its server may still be
        writing into the segment, so it is removed (the server's writes land in memory nobody reads again) rather
        than handed to the next call, whose tiles they would overwrite."""
        if not reuse:
            self._destroy(slot)
            return
        self._free.append(slot)
        while len(self._free) > self.keep_free:
            self._destroy(self._free.pop(0))

    def _create(self, size: int) -> ShmSlot:
        name = f"dvd-{os.getpid()}-{secrets.token_hex(16)}"
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.posix_fallocate(fd, 0, size)
            return ShmSlot(name, fd, size, mmap.mmap(fd, size))
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(SHM_DIR / name)
            raise

    def _destroy(self, slot: ShmSlot) -> None:
        self._used -= slot.size
        with contextlib.suppress(OSError):
            os.unlink(SHM_DIR / slot.name)
        with contextlib.suppress(BufferError):
            slot.mm.close()
        os.close(slot.fd)

    def close(self) -> None:
        while self._free:
            self._destroy(self._free.pop())


class TileReceiver:
    """One Encode attempt's receiving end: what to offer the server, and each tile's bytes into its place."""

    def __init__(self, executor: ThreadPoolExecutor, slots: ShmSlots | None = None, slot: ShmSlot | None = None,
                 conn: DataConnection | None = None, ticket: bytes = b"") -> None:
        self.executor = executor
        self.ticket = ticket
        self.slots = slots
        self.slot = slot
        self.conn = conn
        self.shm_end = 0  # bytes of the segment already read: tiles arrive at increasing offsets
        self.complete = False  # every tile received: the server is done with the segment and the connection
        self.pending = Pending()

    @classmethod
    async def open(cls, mode: str, executor: ThreadPoolExecutor, slots: ShmSlots, server_domain: str,
                   host: str, data_port: int, max_bytes: int, timeout: float,
                   tls: ssl.SSLContext | None = None) -> TileReceiver:
        """The best transport `mode` allows for this server: shared memory when it shares our /dev/shm, TCP when
        it has a data port, inline gRPC otherwise (and whenever the better one cannot be set up)."""
        if mode in ("auto", "shm") and RAW_BYTES_OK and slots.domain and server_domain == slots.domain:
            slot = slots.acquire(max_bytes)
            if slot is not None:
                return cls(executor, slots=slots, slot=slot)
        if mode in ("auto", "tcp") and RAW_BYTES_OK and data_port:
            loop = asyncio.get_running_loop()
            ticket = secrets.token_bytes(TICKET_BYTES)
            try:
                conn = await loop.run_in_executor(executor, _connect, host, data_port, ticket, timeout, tls)
            except OSError as e:
                log.warning("data connection failed; receiving inline",
                            extra={"server": f"{host}:{data_port}", "error": str(e)})
            else:
                return cls(executor, conn=conn, ticket=ticket)
        return cls(executor)

    def offer(self) -> vision_pb2.DataPlaneOffer:
        if self.slot is not None:
            return vision_pb2.DataPlaneOffer(shm=vision_pb2.ShmTarget(name=self.slot.name, size=self.slot.size))
        if self.conn is not None:
            return vision_pb2.DataPlaneOffer(tcp_ticket=self.ticket)
        return vision_pb2.DataPlaneOffer()

    async def receive(self, items: list[tuple[vision_pb2.TileEmbedding, torch.Tensor]],
                      inline: list[memoryview]) -> None:
        """Copy each tile's bytes into its `dst` (a contiguous slice of its image's tensor), wherever they travel;
        `inline`: the message's raw_tile_contents, one per TRANSPORT_GRPC tile in order.

        One message's tiles in one thread hop: the copies run off the event loop, which keeps streaming tokens."""
        jobs: list[tuple[int, vision_pb2.TileEmbedding, memoryview | None, torch.Tensor]] = []
        payloads = iter(inline)
        for tile, dst in items:  # descriptors already checked against their rows (VisionPool._check_tile)
            out = byte_view(dst)
            transport = tile.transport or vision_pb2.TRANSPORT_GRPC
            data = None
            if transport == vision_pb2.TRANSPORT_GRPC:
                data = next(payloads, None)
                if data is None or len(data) != out.numel():
                    raise BrokenStream(f"inline tile carries {0 if data is None else len(data)} bytes, expected "
                                       f"{out.numel()}")
            elif transport == vision_pb2.TRANSPORT_SHM and self.slot is not None:
                if tile.offset != self.shm_end or tile.offset + tile.nbytes > self.slot.size:
                    raise BrokenStream(f"tile at segment offset {tile.offset}+{tile.nbytes} is out of order or "
                                       f"bounds (next {self.shm_end}, size {self.slot.size})")
                self.shm_end += tile.nbytes
            elif not (transport == vision_pb2.TRANSPORT_TCP and self.conn is not None):
                raise BrokenStream(f"tile sent over transport {transport}, which this request did not offer")
            jobs.append((transport, tile, data, out))
        if next(payloads, None) is not None:
            raise BrokenStream(f"message carries {len(inline)} inline payloads for fewer inline tiles")
        if jobs:
            await self.pending.run(self.executor, _copy, jobs, self.slot, self.conn)

    def close(self) -> None:
        """Give the segment and connection back, once a copy still running in a thread (a cancelled call) ends."""
        slot, slots, conn, reuse = self.slot, self.slots, self.conn, self.complete
        self.slot = self.conn = None
        if conn is not None:
            conn.shutdown()  # wakes a receive still blocked in its thread

        def release() -> None:
            if slot is not None and slots is not None:
                slots.release(slot, reuse)
            if conn is not None:
                conn.close()

        self.pending.release(release)


def _copy(jobs: list[tuple[int, vision_pb2.TileEmbedding, memoryview | None, torch.Tensor]], slot: ShmSlot | None,
          conn: DataConnection | None) -> None:
    """One message's tiles into place, in a worker thread: it gets the segment and connection it reads from, which
    `TileReceiver.close` keeps alive until it returns."""
    for transport, tile, data, out in jobs:
        if data is not None:
            np.copyto(out.numpy(), np.frombuffer(data, dtype=np.uint8))
        elif transport == vision_pb2.TRANSPORT_SHM:
            assert slot is not None
            src = np.frombuffer(slot.mm, dtype=np.uint8, count=tile.nbytes, offset=tile.offset)
            np.copyto(out.numpy(), src)  # one thread: torch's parallel copy fights the sender for the cores
        else:
            assert conn is not None
            _recv_exactly(conn, out)


def _connect(host: str, port: int, ticket: bytes, timeout: float, tls: ssl.SSLContext | None) -> DataConnection:
    """A data connection that has introduced itself (under mutual TLS when `tls`); it only receives from here on."""
    sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = connect_data(sock, ticket, tls)
        conn.sock.settimeout(timeout)
    except OSError:
        sock.close()
        raise
    return conn


def _recv_exactly(conn: DataConnection, out: torch.Tensor) -> None:
    view = memoryview(out.numpy())
    try:
        conn.recv_tile(view)
    except (OSError, ConnectionError) as e:  # timeout, reset, closed under us by a cancelled call, a bad tag
        raise BrokenStream(f"data connection failed on a tile of {len(view)} bytes: {e}") from e
