"""The one place where embeddings become wire bytes and back: raw little-endian bfloat16, row-major.

Never pickle or torch.save across a service boundary: raw bytes plus explicit shape metadata is language- and
version-independent, and costs nothing to decode (a view over the received buffer).

On gRPC, tile bytes travel in a message's own `repeated bytes` field (EncodeResponse.raw_tile_contents, as KServe
v2's raw_output_contents) but are written and read here rather than through protobuf's objects: a payload set on a
message, serialized, parsed and read back is copied four times on top of gRPC's own copies, which halved the
fallback's rate (tests/test_data_plane.py proves the bytes are what any protobuf reader reads).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from dvd.data_plane import byte_view

BF16_BYTES = 2
# A tile tensor's datatype by its KServe v2 name (TileEmbedding.datatype): what a receiver accepts; the vision server
# sends WIRE_DATATYPE.
DATATYPES = {"BF16": torch.bfloat16, "FP16": torch.float16, "FP32": torch.float32}
WIRE_DATATYPE = "BF16"
_LEN = 2  # protobuf's wire type of a length-delimited field (bytes, string, message)


def encode_bf16(t: torch.Tensor) -> bytes:
    """A 2-D tensor -> raw little-endian bf16 bytes."""
    if t.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(t.shape)}")
    data = t.detach().to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16)
    if sys.byteorder != "little":
        data = data.byteswap()
    return data.numpy().tobytes()


def decode_bf16(data: bytes | memoryview, rows: int, cols: int) -> torch.Tensor:
    """Raw little-endian bf16 bytes -> a (rows, cols) bf16 tensor; raises ValueError on a size mismatch."""
    if rows <= 0 or cols <= 0:
        raise ValueError(f"invalid embedding shape ({rows}, {cols})")
    expected = rows * cols * BF16_BYTES
    if len(data) != expected:
        raise ValueError(f"embedding payload has {len(data)} bytes, expected {expected} for ({rows}, {cols}) bf16")
    t = torch.frombuffer(bytearray(data), dtype=torch.int16)
    if sys.byteorder != "little":
        t = t.byteswap()
    return t.view(torch.bfloat16).view(rows, cols)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    n = shift = 0
    while shift < 64:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return n, pos
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def append_raw(head: bytes, field: int, payloads: Sequence[torch.Tensor]) -> bytes:
    """`head` (a serialized message) with each contiguous tensor's bytes appended as one more entry of its repeated
    bytes field number `field`: protobuf's encoding of that message, built with one copy of each payload."""
    tag = _varint(field << 3 | _LEN)
    parts: list[bytes | memoryview] = [head]
    for p in payloads:
        view = memoryview(byte_view(p).numpy())
        parts += (tag, _varint(len(view)), view)
    return b"".join(parts)  # CPython copies buffers above 1 MiB with the GIL released


def split_raw(data: bytes, field: int) -> tuple[bytes, list[memoryview]]:
    """The inverse of `append_raw` for any encoding of the message: every entry of bytes field `field` as a view of
    `data` (no copy), and the message's other fields as bytes for protobuf to parse. Raises ValueError when `data`
    is not a protobuf message."""
    buf = memoryview(data)
    rest: list[memoryview] = []
    raw: list[memoryview] = []
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _read_varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == _LEN:
            size, pos = _read_varint(buf, pos)
            if number == field:
                if pos + size > len(buf):
                    raise ValueError("truncated field")
                raw.append(buf[pos:pos + size])
                pos += size
                continue
            pos += size
        else:
            raise ValueError(f"wire type {wire_type} at byte {start}")
        if pos > len(buf):
            raise ValueError("truncated field")
        rest.append(buf[start:pos])
    return b"".join(rest), raw
