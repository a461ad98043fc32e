"""Shared helpers for the vision tests (images in every format, one gRPC Encode call); holds no tests itself."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from PIL import Image

from dvd.tensor_codec import decode_bf16
from dvd.v2 import vision_pb2, vision_pb2_grpc
from llm_server.vision_pool import EncodedImages, VisionPool


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random pixels: any resampling difference shows up in the tiles."""
    rng = np.random.default_rng(seed + 7919 * width + height)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    arr = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)


def encode(image: Image.Image, fmt: str, **save_args: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save_args)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries one empty IDAT: a decompression bomb in 60 bytes."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@dataclass
class Encoded:
    tiles: list[vision_pb2.TileEmbedding] = field(default_factory=list)
    summary: vision_pb2.EncodeSummary | None = None
    inline: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (image, tile) -> its raw_tile_contents

    def image_tiles(self, image_index: int) -> list[vision_pb2.TileEmbedding]:
        return [t for t in self.tiles if t.image_index == image_index]

    def payload(self, tile: vision_pb2.TileEmbedding) -> bytes:
        return self.inline[(tile.image_index, tile.tile_index)]

    def tensor(self, tile: vision_pb2.TileEmbedding) -> torch.Tensor:
        return decode_bf16(self.payload(tile), *tile.shape)

    def fingerprint(self) -> list[tuple[int, int, int, bool, bytes]]:
        return [(t.image_index, t.tile_index, t.shape[0], t.compressed, self.payload(t)) for t in self.tiles]


def media(files: list[bytes], kind: int = vision_pb2.MEDIA_KIND_IMAGE,
          max_tiles: tuple[int, ...] = ()) -> list[vision_pb2.Media]:
    """Files of one kind; `max_tiles`: each file's own tile cap (none: 0, the request's)."""
    return [vision_pb2.Media(kind=kind, data=f, max_tiles=c) for f, c in zip(files, max_tiles or [0] * len(files),
                                                                           strict=True)]


def request(images: list[bytes], vir: int = vision_pb2.VIR_MODE_UNSPECIFIED, max_tiles: int = 0,
            request_id: str = "test", file_max_tiles: tuple[int, ...] = ()) -> vision_pb2.EncodeRequest:
    return vision_pb2.EncodeRequest(request_id=request_id, media=media(images, max_tiles=file_max_tiles),
                                    options=vision_pb2.EncodeOptions(vir=vir, max_tiles=max_tiles))


def collect(responses: Iterable[vision_pb2.EncodeResponse]) -> Encoded:
    """Read with plain protobuf, as any client would: each inline tile's bytes are its message's next
    raw_tile_contents entry."""
    out = Encoded()
    for r in responses:
        out.tiles.extend(r.tiles)
        inline = [t for t in r.tiles if t.transport in (vision_pb2.TRANSPORT_UNSPECIFIED, vision_pb2.TRANSPORT_GRPC)]
        assert len(inline) == len(r.raw_tile_contents), "one raw_tile_contents entry per inline tile"
        for t, data in zip(inline, r.raw_tile_contents, strict=True):
            out.inline[(t.image_index, t.tile_index)] = data
        if r.HasField("summary"):
            out.summary = r.summary
    return out


def encode_sync(address: str, req: vision_pb2.EncodeRequest, timeout: float = 60) -> Encoded:
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * 2**20)]) as ch:
        return collect(vision_pb2_grpc.VisionServiceStub(ch).Encode(req, timeout=timeout))


async def encode_with(address: str, transport: str, images: list[bytes], **pool_args: object) -> EncodedImages:
    """Images through the language server's own VisionPool, on `transport` (pool_args: auth, shm budget, ...)."""
    pool = VisionPool((address,), hidden_size=128, timeout_s=60, transport=transport, **pool_args)  # type: ignore[arg-type]
    await pool.start()
    try:
        return await pool.encode(f"dp-{transport}", media(images), vision_pb2.EncodeOptions())
    finally:
        await pool.close()
