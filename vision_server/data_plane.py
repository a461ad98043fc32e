"""Sending side of the data plane: the TCP data port, the clients' shared-memory segments, one sender per request.

Each tile is copied once on its way out: into the client's shared-memory segment, into the kernel's socket buffer,
or into the serialized message on the gRPC fallback (`dvd.tensor_codec.append_raw`; gRPC copies that once more).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from dvd.data_plane import (
    RAW_BYTES_OK,
    RAW_TILE_FIELD,
    SHM_DIR,
    SHM_NAME,
    TICKET_BYTES,
    DataConnection,
    Pending,
    accept_data,
    byte_view,
    owner_gone,
)
from dvd.tensor_codec import DATATYPES, append_raw, encode_bf16
from dvd.v2 import vision_pb2

log = logging.getLogger("vision_server.data_plane")

CLAIM_TIMEOUT_S = 2.0      # an Encode call waits this long for its data connection, then sends inline
UNCLAIMED_TTL_S = 30.0     # a data connection nobody claims is closed after this
MAX_PENDING = 1024         # connections waiting to be claimed, at most
SEND_TIMEOUT_S = 120.0     # a client that stops reading is cut off after this


class DataListener:
    """The TCP data port. A connection sends its 16-byte ticket, then only receives; the Encode call that carries
    the same ticket claims it and writes its tiles' bytes to it."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        """`tls`: the server side of mutual TLS; a peer without a certificate the CA signed gets nothing."""
        self.tls = tls
        self.port = 0
        self._sock: socket.socket | None = None
        self._pending: dict[bytes, tuple[DataConnection, float]] = {}
        self._waiters: dict[bytes, asyncio.Future[DataConnection]] = {}
        self._tasks: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(MAX_PENDING)  # a burst connects all at once: a short backlog drops SYNs (1 s retries)
        sock.setblocking(False)
        self._sock, self.port = sock, sock.getsockname()[1]
        self._spawn(self._accept_loop())
        return self.port

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            if len(self._pending) >= MAX_PENDING:
                self._expire(time.monotonic())
            if len(self._pending) >= MAX_PENDING:
                conn.close()
                continue
            self._spawn(self._introduce(conn))

    async def _introduce(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        ticket = b""
        try:
            if self.tls is not None:  # the handshake and the introduction in a thread: blocking TLS, bounded in time
                sock.setblocking(True)
                sock.settimeout(CLAIM_TIMEOUT_S)
                conn, ticket = await loop.run_in_executor(None, accept_data, sock, self.tls)
            else:
                while len(ticket) < TICKET_BYTES:
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, TICKET_BYTES - len(ticket)),
                                                   CLAIM_TIMEOUT_S)
                    if not chunk:
                        raise ConnectionError("closed before its ticket")
                    ticket += chunk
                conn = DataConnection(sock)
        except (OSError, TimeoutError, ConnectionError):  # ssl.SSLError included: no certificate, wrong CA
            sock.close()
            return
        conn.sock.setblocking(True)
        conn.sock.settimeout(SEND_TIMEOUT_S)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        waiter = self._waiters.pop(ticket, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(conn)
        else:
            self._pending[ticket] = (conn, time.monotonic())

    def _expire(self, now: float) -> None:
        for ticket, (conn, since) in list(self._pending.items()):
            if now - since > UNCLAIMED_TTL_S:
                del self._pending[ticket]
                conn.close()

    async def claim(self, ticket: bytes) -> DataConnection | None:
        """The connection that introduced itself with `ticket`, or None when none arrives in time."""
        self._expire(time.monotonic())
        if ticket in self._pending:
            return self._pending.pop(ticket)[0]
        waiter: asyncio.Future[DataConnection] = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = waiter
        try:
            return await asyncio.wait_for(waiter, CLAIM_TIMEOUT_S)
        except TimeoutError:
            return None
        finally:
            self._waiters.pop(ticket, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._sock is not None:
            self._sock.close()
        for conn, _ in self._pending.values():
            conn.close()
        self._pending.clear()


@dataclass
class ShmLease:
    """One request's use of a client's segment: the mapping stays open until every lease on it is released."""

    mm: mmap.mmap
    size: int  # bytes the request may write: what it offered, within the segment
    mapping: _Mapping


@dataclass
class _Mapping:
    inode: int
    size: int
    mm: mmap.mmap
    users: int = 0  # leases not yet released
    cached: bool = True  # still in ShmMaps' table; once evicted it closes with its last lease


class ShmMaps:
    """The clients' segments, mapped once and reused: a fresh mapping of a 26 MiB image costs more page faults
    than the copy itself. Entries whose name is gone, points at another file, or whose owner died are dropped.

    Lifetimes: a mapping is closed only when it has left the table (evicted, stale) and its last lease is released,
    so eviction never touches a mapping a request is still writing into. The table holds at most `capacity`
    mappings nobody uses; mappings in use are never evicted (as many as requests in flight, which the vision
    queue bounds)."""

    def __init__(self, capacity: int = 64, sweep_every_s: float = 5.0) -> None:
        self.capacity = capacity
        self.sweep_every_s = sweep_every_s
        self._maps: OrderedDict[str, _Mapping] = OrderedDict()
        self._last_sweep = time.monotonic()

    def __len__(self) -> int:
        return len(self._maps)

    def open(self, name: str, size: int) -> ShmLease | None:
        """A lease on segment `name` for `size` bytes at most; None when it cannot be used. Release it once."""
        if not SHM_NAME.fullmatch(name):
            return None
        self.sweep()
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            m = self._maps.get(name)
            if m is None or m.inode != st.st_ino or m.size != st.st_size:
                if st.st_size == 0:
                    return None
                m = _Mapping(st.st_ino, st.st_size, mmap.mmap(fd, st.st_size))
                self._evict(name)
                self._maps[name] = m
        except OSError:
            return None
        finally:
            os.close(fd)
        self._maps.move_to_end(name)
        m.users += 1
        self._trim()
        return ShmLease(m.mm, min(size, m.size), m)

    def release(self, lease: ShmLease) -> None:
        m = lease.mapping
        m.users -= 1
        if m.users == 0 and not m.cached:
            _close(m.mm)
        self._trim()

    def _trim(self) -> None:
        idle = [n for n, m in self._maps.items() if m.users == 0]  # least recently used first
        for name in idle[:max(0, len(idle) - self.capacity)]:
            self._evict(name)

    def _evict(self, name: str) -> None:
        m = self._maps.pop(name, None)
        if m is not None:
            m.cached = False
            if m.users == 0:
                _close(m.mm)

    def sweep(self) -> None:
        """Drop mappings of segments that are gone or ownerless (at most every `sweep_every_s`): on each `open`, and
        periodically (`sweep_forever`), so a dead client's segments go even when no request follows."""
        now = time.monotonic()
        if now - self._last_sweep < self.sweep_every_s:
            return
        self._last_sweep = now
        for name, m in list(self._maps.items()):
            path = SHM_DIR / name
            try:
                alive = path.stat().st_ino == m.inode
            except OSError:
                alive = False
            if alive and owner_gone(path):  # its language server died: this side survives, so it removes it
                with contextlib.suppress(OSError):
                    path.unlink()
                    log.info("removed a dead client's segment", extra={"segment": name})
                alive = False
            if not alive:
                self._evict(name)

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_every_s)
            self.sweep()

    def close(self) -> None:
        for name in list(self._maps):
            self._evict(name)


def _close(mm: mmap.mmap) -> None:
    with contextlib.suppress(BufferError):  # a view still exported (numpy): the GC closes it afterwards
        mm.close()


class TileSender:
    """One Encode call's way of delivering tile bytes. `place` fills a message's tile descriptors and, for shared
    memory, places their bytes before the message is sent; `outgoing` gives the message as it goes out (with its
    inline gRPC bytes); `follow` sends TCP bytes after it, so a client never waits for bytes whose descriptor it has
    not read. One thread hop per message, not per tile. `close` gives the segment lease and the connection back
    only once a copy or send still running for a cancelled call has finished (`Pending`)."""

    def __init__(self, executor: ThreadPoolExecutor, shm: ShmLease | None = None, maps: ShmMaps | None = None,
                 conn: DataConnection | None = None) -> None:
        self.executor = executor
        self.shm = shm
        self.maps = maps
        self.conn = conn
        self.offset = 0
        self.inline: list[torch.Tensor] = []  # the placed message's TRANSPORT_GRPC tiles, in order
        self.pending = Pending()

    @classmethod
    async def open(cls, offer: vision_pb2.DataPlaneOffer, executor: ThreadPoolExecutor,
                   listener: DataListener | None, maps: ShmMaps) -> TileSender:
        target = offer.WhichOneof("target") if RAW_BYTES_OK else None
        if target == "shm":
            shm = maps.open(offer.shm.name, offer.shm.size)
            if shm is None:
                log.warning("shared-memory segment unusable; sending inline", extra={"segment": offer.shm.name})
            return cls(executor, shm=shm, maps=maps)
        if target == "tcp_ticket" and listener is not None:
            conn = await listener.claim(offer.tcp_ticket)
            if conn is None:
                log.warning("data connection did not arrive; sending inline")
            return cls(executor, conn=conn)
        return cls(executor)

    async def place(self, tiles: Sequence[vision_pb2.TileEmbedding], embs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Fill the descriptors; returns the tensors as they go on the wire (host, contiguous, in each descriptor's
        datatype)."""
        wire = [e.to(device="cpu", dtype=DATATYPES[t.datatype]).contiguous() for t, e in zip(tiles, embs, strict=True)]
        writes: list[tuple[int, torch.Tensor]] = []
        for tile, emb in zip(tiles, wire, strict=True):
            tile.nbytes = emb.numel() * emb.element_size()
            if self.shm is not None and self.offset + tile.nbytes <= self.shm.size:
                tile.transport, tile.offset = vision_pb2.TRANSPORT_SHM, self.offset
                writes.append((self.offset, emb))
                self.offset += tile.nbytes
            elif self.conn is not None:
                tile.transport = vision_pb2.TRANSPORT_TCP
            else:  # gRPC, or a tile that does not fit the client's segment
                tile.transport = vision_pb2.TRANSPORT_GRPC
                # A big-endian host (no raw views) sends little-endian bytes of WIRE_DATATYPE, its only datatype.
                self.inline.append(emb if RAW_BYTES_OK else torch.frombuffer(bytearray(encode_bf16(emb)),
                                                                             dtype=torch.uint8))
        if writes:
            assert self.shm is not None
            await self.pending.run(self.executor, _write_shm, self.shm.mm, writes)
        return wire

    async def outgoing(self, msg: vision_pb2.EncodeResponse) -> vision_pb2.EncodeResponse | bytes:
        """The placed message as it goes out: itself, or serialized with its inline tiles' bytes appended (as
        `raw_tile_contents`) off the event loop. `serialize_response` passes those bytes to gRPC untouched."""
        if not self.inline:
            return msg
        payloads, self.inline = self.inline, []
        return await asyncio.get_running_loop().run_in_executor(self.executor, append_raw, msg.SerializeToString(),
                                                                RAW_TILE_FIELD, payloads)

    async def follow(self, tiles: Sequence[vision_pb2.TileEmbedding], wire: list[torch.Tensor]) -> None:
        sends = [emb for tile, emb in zip(tiles, wire, strict=True) if tile.transport == vision_pb2.TRANSPORT_TCP]
        if sends:
            assert self.conn is not None
            await self.pending.run(self.executor, _send_all, self.conn, sends)

    def close(self) -> None:
        shm, maps, conn = self.shm, self.maps, self.conn
        self.shm = self.conn = None
        if conn is not None:
            conn.shutdown()  # wakes a send still blocked in its thread; the fd stays its own

        def release() -> None:
            if shm is not None and maps is not None:
                maps.release(shm)
            if conn is not None:
                conn.close()

        self.pending.release(release)


def serialize_response(msg: vision_pb2.EncodeResponse | bytes) -> bytes:
    """Encode's response serializer: a message `TileSender.outgoing` already serialized goes out as it is."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def _write_shm(mm: mmap.mmap, writes: list[tuple[int, torch.Tensor]]) -> None:
    for offset, emb in writes:
        src = byte_view(emb).numpy()
        np.copyto(np.frombuffer(mm, dtype=np.uint8, count=src.size, offset=offset), src)


def _send_all(conn: DataConnection, embs: list[torch.Tensor]) -> None:
    for emb in embs:
        conn.send_tile(memoryview(byte_view(emb).numpy()))
