"""The embedding data plane on real servers: every transport end to end, its faults, and its protocol checks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from dvd.data_plane import (
    KEY_BYTES,
    RAW_TILE_FIELD,
    SHM_DIR,
    TAG_BYTES,
    Pending,
    SealedConnection,
    remove_orphan_segments,
    shm_domain,
)
from dvd.errors import ServiceError
from dvd.health import VISION_SERVICE, Health
from dvd.tensor_codec import append_raw, split_raw
from dvd.v2 import vision_pb2, vision_pb2_grpc
from llm_server.data_plane import ShmSlots
from llm_server.vision_pool import VisionPool
from tests.conftest import start_vision
from tests.helpers.media import image_bytes
from tests.helpers.vision import Encoded, collect, encode_with, media
from vision_server.data_plane import DataListener, ShmMaps, TileSender
from vision_server.service import add_to_server

pytestmark = pytest.mark.timeout(600)
TRANSPORTS = ("grpc", "tcp", "shm")


def own_segments() -> set[str]:
    return {p.name for p in SHM_DIR.glob(f"dvd-{os.getpid()}-*")}


def same_bytes(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return False
    return all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(a, b, strict=True))


async def test_every_transport_delivers_the_same_bytes(vision_tiny_flash: str) -> None:
    """Compressed (64-row) and full (256-row) tiles, several images: identical tensors on every path."""
    images = [image_bytes(1000, 700, seed=81), image_bytes(448, 448, seed=82), image_bytes(300, 900, seed=83)]
    got = {t: await encode_with(vision_tiny_flash, t, images) for t in (*TRANSPORTS, "auto")}
    for t in TRANSPORTS:
        assert set(got[t].bytes_by_transport) == {t}, got[t].bytes_by_transport
        assert got[t].bytes_received == sum(e.numel() * 2 for e in got[t].embeddings)
    assert set(got["auto"].bytes_by_transport) == {"shm"}  # one host, one /dev/shm
    assert sum(s.num_compressed_tiles for s in got["grpc"].summary.images) > 0  # the router did compress
    for t in ("tcp", "shm", "auto"):
        assert same_bytes(got[t].embeddings, got["grpc"].embeddings), t
    assert not own_segments()  # every segment was removed when its pool closed


async def test_auto_takes_tcp_without_shared_memory(vision_tiny: str) -> None:
    encoded = await encode_with(vision_tiny, "auto", [image_bytes(600, 500, seed=84)], shm_budget_bytes=0)
    assert set(encoded.bytes_by_transport) == {"tcp"}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_cancel_mid_stream_then_serve_again(vision_tiny: str, transport: str) -> None:
    """A caller that goes away mid-transfer frees its data connection or segment; the server keeps serving."""
    pool = VisionPool((vision_tiny,), hidden_size=128, timeout_s=60, transport=transport)
    await pool.start()
    try:
        images = [image_bytes(1792, 1344, seed=85 + i) for i in range(3)]
        task = asyncio.create_task(pool.encode("dp-cancel", media(images), vision_pb2.EncodeOptions()))
        await asyncio.sleep(0.4)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.backends[0].outstanding == 0
        again = await pool.encode("dp-after", media([image_bytes(500, 500, seed=88)]), vision_pb2.EncodeOptions())
        assert set(again.bytes_by_transport) == {transport}
    finally:
        await pool.close()
    assert not own_segments()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_failover_when_a_server_dies_mid_transfer(vision_tiny: str, tiny_ckpt: Path, transport: str) -> None:
    """The first-choice server is killed while it streams; the request completes on the other one, same bytes."""
    doomed, doomed_address = start_vision(f"vision-doomed-{transport}", tiny_ckpt)
    images = [image_bytes(1792, 1344, seed=60 + i) for i in range(4)]  # 4 x 13 tiles: seconds of work
    pool = VisionPool((doomed_address, vision_tiny), hidden_size=128, timeout_s=120, transport=transport)
    await pool.start()
    try:
        task = asyncio.create_task(pool.encode("dp-die", media(images), vision_pb2.EncodeOptions()))
        await asyncio.sleep(0.5)
        doomed.proc.kill()
        encoded = await task
    finally:
        await pool.close()
        doomed.stop()
    expected = await encode_with(vision_tiny, "grpc", images)
    assert encoded.server == vision_tiny
    assert set(encoded.bytes_by_transport) == {transport}
    assert same_bytes(encoded.embeddings, expected.embeddings)


def raw_encode(address: str, offer: vision_pb2.DataPlaneOffer) -> Encoded:
    req = vision_pb2.EncodeRequest(request_id="dp-raw", media=media([image_bytes(448, 448, seed=89)]),
                                   data_plane=offer)
    with grpc.insecure_channel(address) as channel:
        return collect(vision_pb2_grpc.VisionServiceStub(channel).Encode(req, timeout=30))


@pytest.mark.parametrize("name", ["../../etc/passwd", "dvd-1-" + "0" * 32, "psm_12345678"])
def test_server_writes_only_into_real_client_segments(vision_tiny: str, name: str) -> None:
    """A path, a missing segment, or someone else's segment: the tiles come inline instead."""
    got = raw_encode(vision_tiny, vision_pb2.DataPlaneOffer(shm=vision_pb2.ShmTarget(name=name, size=2**20)))
    assert got.tiles and all(t.transport == vision_pb2.TRANSPORT_GRPC and len(got.payload(t)) == t.nbytes
                             for t in got.tiles)


def test_unclaimed_ticket_falls_back_inline(vision_tiny: str) -> None:
    """A TCP ticket whose connection never arrives (a load balancer sent it elsewhere): inline after a short wait."""
    got = raw_encode(vision_tiny, vision_pb2.DataPlaneOffer(tcp_ticket=secrets.token_bytes(16)))
    assert got.tiles and all(t.transport == vision_pb2.TRANSPORT_GRPC and len(got.payload(t)) == t.nbytes
                             for t in got.tiles)


def test_inline_bytes_are_a_plain_protobuf_field() -> None:
    """What the sender appends by hand is what any protobuf reader parses, and the receiver's split reads any
    encoding of the message (here protobuf's own, payloads interleaved with nothing) into the same parts."""
    msg = vision_pb2.EncodeResponse()
    msg.tiles.add(tile_index=0, datatype="BF16", shape=[3, 5], transport=vision_pb2.TRANSPORT_GRPC)
    msg.tiles.add(tile_index=1, datatype="BF16", shape=[3, 5], transport=vision_pb2.TRANSPORT_GRPC)
    msg.summary.images.add(num_tiles=2, num_tokens=6)
    tensors = [torch.randn(3, 5, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16) for i in range(2)]
    wire = append_raw(msg.SerializeToString(), RAW_TILE_FIELD, tensors)
    parsed = vision_pb2.EncodeResponse.FromString(wire)
    assert list(parsed.raw_tile_contents) == [t.view(torch.int16).numpy().tobytes() for t in tensors]
    del parsed.raw_tile_contents[:]
    assert parsed == msg
    for encoding in (wire, vision_pb2.EncodeResponse.FromString(wire).SerializeToString()):
        head, raw = split_raw(encoding, RAW_TILE_FIELD)
        assert vision_pb2.EncodeResponse.FromString(head) == msg
        assert [bytes(r) for r in raw] == [t.view(torch.int16).numpy().tobytes() for t in tensors]
    for broken in (wire[:-1], b"\x1b", b"\x1a\xff"):  # truncated payload, wire type 3, truncated length
        with pytest.raises(ValueError):
            split_raw(broken, RAW_TILE_FIELD)


# -- protocol checks against a vision server that lies about its bytes -----------------------------------------------

class LyingVision(vision_pb2_grpc.VisionServiceServicer):
    """Speaks the data plane like the real server, then breaks it in one chosen way."""

    def __init__(self, fault: str, listener: DataListener) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.fault = fault
        self.listener = listener
        self.maps = ShmMaps()
        self.executor = ThreadPoolExecutor(2)

    async def Encode(self, request: vision_pb2.EncodeRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[vision_pb2.EncodeResponse | bytes]:
        sender = await TileSender.open(request.data_plane, self.executor, self.listener, self.maps)
        datatype = "FP16" if self.fault == "fp16" else "BF16"
        emb = torch.ones(256, 128, dtype=torch.float16 if datatype == "FP16" else torch.bfloat16)
        msg = vision_pb2.EncodeResponse()
        for i in range(2):
            msg.tiles.add(tile_index=i, num_tiles=2, datatype=datatype, shape=[256, 128], image_rows=512)
        wire = await sender.place(msg.tiles, [emb, emb])
        if self.fault == "shm-offset":
            msg.tiles[1].offset += 2
        elif self.fault == "nbytes":
            msg.tiles[1].nbytes -= 2
        elif self.fault == "image-rows":
            msg.tiles[1].image_rows = 1024
        elif self.fault == "not-offered":
            msg.tiles[1].transport = vision_pb2.TRANSPORT_SHM
        elif self.fault == "datatype":
            msg.tiles[0].datatype = "INT8"
        elif self.fault == "inline-short":
            sender.inline[1] = emb[:255]
        msg.summary.images.add(num_tiles=2, num_tokens=512)
        try:
            yield b"\xff\xff" if self.fault == "garbage" else await sender.outgoing(msg)
            if self.fault == "tcp-short":
                assert sender.conn is not None
                sender.conn.sock.sendall(b"\0" * 1000)
                sender.close()  # the connection ends 1000 bytes into the first tile
                await asyncio.sleep(5)
            else:
                await sender.follow(msg.tiles, wire)
        finally:
            sender.close()

    async def Metadata(self, request: vision_pb2.MetadataRequest,
                       context: grpc.aio.ServicerContext) -> vision_pb2.VisionMetadata:
        return vision_pb2.VisionMetadata(model="liar", hidden_size=128, max_tiles=12,
                                         data_port=self.listener.port, shm_domain=shm_domain())


@pytest.mark.parametrize(("fault", "transport", "message"), [
    ("shm-offset", "shm", "out of order or bounds"),
    ("nbytes", "grpc", "declares"),
    ("image-rows", "tcp", "does not fit"),
    ("not-offered", "tcp", "did not offer"),
    ("tcp-short", "tcp", "closed after 1000"),
    ("inline-short", "grpc", "carries 65280 bytes, expected 65536"),
    ("garbage", "grpc", "not an EncodeResponse"),
    ("datatype", "shm", "unsupported tile tensor: INT8"),
])
async def test_a_lying_server_is_a_protocol_error(fault: str, transport: str, message: str) -> None:
    async with lying_pool(fault, transport) as pool:
        for attempt in range(pool.error_threshold):
            # One broken answer may be the request's alone: the server stays in rotation until it fails calls
            # error_threshold times in a row, then it is not tried again until its health check passes.
            assert pool.backends[0].ready, attempt
            with pytest.raises(ServiceError, match="no vision server could encode") as err:
                await pool.encode("dp-liar", media([b"image"]), vision_pb2.EncodeOptions())
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "127.0.0.1" not in str(err.value)  # what failed, not where: addresses stay in the logs
        assert not pool.backends[0].ready
        assert re.search(message, pool.backends[0].last_error)  # the reason, for the operator
    assert not own_segments()


@contextlib.asynccontextmanager
async def lying_pool(fault: str, transport: str) -> AsyncIterator[VisionPool]:
    listener = DataListener()
    await listener.start("127.0.0.1", 0)
    server = grpc.aio.server()
    add_to_server(LyingVision(fault, listener), server)
    await Health(server, VISION_SERVICE).set(True)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    pool = VisionPool((f"127.0.0.1:{port}",), hidden_size=128, timeout_s=20, transport=transport)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()
        await server.stop(0)
        await listener.close()


@pytest.mark.parametrize("transport", ["shm", "tcp", "grpc"])
async def test_another_datatype_is_a_value(transport: str) -> None:
    """Tiles are described as KServe v2 describes tensors (datatype + shape): FP16 tiles arrive as FP16 on every
    transport, with no change to the protocol or the receiver."""
    async with lying_pool("fp16", transport) as pool:
        encoded = await pool.encode("dp-fp16", media([b"image"]), vision_pb2.EncodeOptions())
    assert not own_segments()
    (emb,) = encoded.embeddings
    assert emb.dtype == torch.float16 and emb.shape == (512, 128) and bool((emb == 1).all())


# -- shared-memory segments --------------------------------------------------------------------------------------------

def test_segments_are_reused_within_their_budget() -> None:
    slots = ShmSlots(budget_bytes=3 * 2**20)
    try:
        a = slots.acquire(2**20)
        b = slots.acquire(2 * 2**20)
        assert a is not None and b is not None
        assert slots.acquire(2**20) is None  # over budget: the caller takes another transport
        slots.release(a)
        again = slots.acquire(1000)
        assert again is not None and again.name == a.name  # reused, pages already in place
        assert len(own_segments()) == 2
        slots.release(again)
        slots.release(b)
    finally:
        slots.close()
    assert not own_segments()


def test_a_mapping_outlives_its_eviction_while_a_request_writes() -> None:
    """Issue 30's race: more client segments than the table holds evicted the least recently used mapping while a
    request still wrote into it ("mmap closed or invalid"). Eviction now waits for the mapping's last lease."""
    slots = ShmSlots(budget_bytes=8 * 2**20)
    maps = ShmMaps(capacity=2)
    segments = [slots.acquire(2**20) for _ in range(5)]
    try:
        assert all(s is not None for s in segments)
        first = maps.open(segments[0].name, 2**20)  # type: ignore[union-attr]
        assert first is not None
        others = [maps.open(s.name, 2**20) for s in segments[1:]]  # type: ignore[union-attr]
        assert all(o is not None for o in others)
        for o in others[:-1]:
            maps.release(o)  # type: ignore[arg-type]
        assert len(maps) <= 2 + 2  # idle mappings within capacity, those in use kept
        np.frombuffer(first.mm, dtype=np.uint8, count=4096)[:] = 7  # still mapped: this raised before
        assert bytes(segments[0].mm[:4]) == b"\x07" * 4  # type: ignore[union-attr]
        maps.release(first)
        maps.release(others[-1])  # type: ignore[arg-type]
        assert len(maps) == 2  # the idle ones beyond capacity are gone once nobody uses them
    finally:
        maps.close()
        for s in segments:
            if s is not None:
                slots.release(s)
        slots.close()
    assert not own_segments()


def test_a_segment_from_an_unfinished_call_is_not_reused() -> None:
    """A call that ended early may still have its server writing into its segment: it is removed, not handed to the
    next call, whose tiles the late writes would overwrite."""
    slots = ShmSlots(budget_bytes=4 * 2**20)
    try:
        a = slots.acquire(2**20)
        assert a is not None
        slots.release(a, reuse=False)
        assert a.name not in own_segments()
        b = slots.acquire(2**20)
        assert b is not None and b.name != a.name
        slots.release(b)
    finally:
        slots.close()


async def test_resources_wait_for_the_operation_using_them() -> None:
    """`Pending.release` runs after the worker thread's copy or send ends, never under it (a cancelled call's
    thread keeps running: closing its mapping or socket then broke it, or handed its fd to someone else)."""
    from concurrent.futures import ThreadPoolExecutor

    gate, released = threading.Event(), asyncio.Event()
    pending = Pending()
    with ThreadPoolExecutor(1) as executor:
        task = asyncio.create_task(pending.run(executor, gate.wait, 10))
        await asyncio.sleep(0.05)
        task.cancel()  # the call goes away; its thread still waits in the copy
        with pytest.raises(asyncio.CancelledError):
            await task
        pending.release(released.set)
        await asyncio.sleep(0.1)
        assert not released.is_set()
        gate.set()
        await asyncio.wait_for(released.wait(), 5)
    done = asyncio.Event()
    Pending().release(done.set)  # nothing running: at once
    assert done.is_set()


def test_segments_of_a_killed_process_are_removed() -> None:
    """SIGKILL skips every cleanup; the next language server on the host removes what the dead one left."""
    code = ("import sys, time; from llm_server.data_plane import ShmSlots; s = ShmSlots(2**22); "
            "print(s.acquire(2**20).name, flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        name = child.stdout.readline().strip() if child.stdout else ""
        assert (SHM_DIR / name).exists()
        live = ShmSlots(2**22)
        mine = live.acquire(2**20)
        remove_orphan_segments()
        assert (SHM_DIR / name).exists()  # its owner is alive: kept
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert name in remove_orphan_segments()
        assert not (SHM_DIR / name).exists()
        assert mine is not None and (SHM_DIR / mine.name).exists()  # a live owner's segment is never touched
        live.release(mine)
        live.close()
    finally:
        child.kill()
        child.wait(10)


def test_the_vision_side_removes_a_dead_clients_segment() -> None:
    """Whichever side survives removes DvD's segments: a vision server that still maps the segment of a language
    server that was SIGKILLed unlinks it at its next sweep (it runs periodically, without any new request)."""
    code = ("import sys, time; from llm_server.data_plane import ShmSlots; s = ShmSlots(2**22); "
            "print(s.acquire(2**20).name, flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    maps = ShmMaps(sweep_every_s=0.0)
    try:
        name = child.stdout.readline().strip() if child.stdout else ""
        lease = maps.open(name, 2**20)
        assert lease is not None
        maps.release(lease)
        maps.sweep()
        assert (SHM_DIR / name).exists() and len(maps) == 1  # owner alive: kept, mapping cached
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        maps.sweep()
        assert not (SHM_DIR / name).exists() and len(maps) == 0
    finally:
        maps.close()
        child.kill()
        child.wait(10)


def test_a_sealed_tile_is_ciphertext_and_opens_only_unaltered_and_in_order() -> None:
    """Under mutual TLS the data connection's tiles travel sealed (AES-GCM, a key sent inside TLS, nonces counting
    tiles): the wire never carries the tile's bytes, and an altered or replayed tile does not open."""
    key, tile = secrets.token_bytes(KEY_BYTES), os.urandom(4096)
    sending, wire = socket.socketpair()
    SealedConnection(sending, key).send_tile(memoryview(tile))
    sealed = wire.recv(len(tile) + TAG_BYTES, socket.MSG_WAITALL)
    assert len(sealed) == len(tile) + TAG_BYTES and tile[:64] not in sealed

    def opened(*messages: bytes) -> list[bytes | None]:
        """Each message as the receiving end opens it, in turn on one connection (None: refused)."""
        feed, receiving = socket.socketpair()
        conn, results = SealedConnection(receiving, key), []
        for message in messages:
            feed.sendall(message)
            out = bytearray(len(tile))
            try:
                conn.recv_tile(memoryview(out))
                results.append(bytes(out))
            except ConnectionError:
                results.append(None)
        for s in (feed, receiving):
            s.close()
        return results

    altered = bytearray(sealed)
    altered[100] ^= 1
    assert opened(sealed) == [tile]
    assert opened(bytes(altered)) == [None]
    assert opened(sealed, sealed) == [tile, None]  # a replay is out of order: its nonce is spent
    for s in (sending, wire):
        s.close()
