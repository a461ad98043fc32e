"""Embedding transfer micro-benchmark: bytes/s of the vision service's gRPC tile stream vs a plain memory copy.

    python benchmarks/transfer.py                         # hidden 4096 (InternVL3.5-8B), 256 rows per tile, bf16
    python benchmarks/transfer.py --hidden 5120 --streams 4

A server process streams `EncodeResponse` messages carrying `TileEmbedding`s exactly as vision_server sends them
(256 rows x hidden, raw little-endian bf16, same proto, same channel options), without running a model, to a
client in this process over loopback; the client receives and views each tile as a tensor like llm_server does.
The memory copy moves the same number of bytes tile by tile on the same machine. ratio = gRPC / memcpy tells how
much of the machine's memory bandwidth one hop of the DvD pipeline costs; on GPU nodes the transfer crosses a NIC
instead of loopback, so read it as the software ceiling of the path, not as a network figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dvd.logs import setup_logging  # noqa: E402
from dvd.procs import Service, free_port, vision_health  # noqa: E402
from dvd.tensor_codec import BF16_BYTES, decode_bf16  # noqa: E402
from dvd.v1 import vision_pb2, vision_pb2_grpc  # noqa: E402

log = logging.getLogger("benchmarks.transfer")
ROWS = 256  # embedding rows of one uncompressed InternVL tile
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class TileStreamer(vision_pb2_grpc.VisionServiceServicer):
    """The vision service's wire behaviour without the model: `options.max_tiles` tiles of one prebuilt payload."""

    def __init__(self, hidden: int) -> None:
        self.hidden = hidden
        payload = np.random.default_rng(0).integers(0, 2**16, ROWS * hidden, dtype=np.uint16).tobytes()
        self.tile = vision_pb2.TileEmbedding(rows=ROWS, hidden_size=hidden, dtype=vision_pb2.DTYPE_BF16,
                                             data=payload)

    async def Encode(self, request: vision_pb2.EncodeRequest,
                     context: object) -> AsyncIterator[vision_pb2.EncodeResponse]:
        n = request.options.max_tiles
        for i in range(n):
            tile = vision_pb2.TileEmbedding()
            tile.CopyFrom(self.tile)  # a fresh message per tile, as the real server builds one per tile
            tile.tile_index, tile.num_tiles = i, n
            yield vision_pb2.EncodeResponse(tile=tile)
        yield vision_pb2.EncodeResponse(summary=vision_pb2.EncodeSummary(
            images=[vision_pb2.ImageSummary(num_tiles=n, num_tokens=n * ROWS)]))

    async def Health(self, request: vision_pb2.VisionHealthRequest,
                     context: object) -> vision_pb2.VisionHealthResponse:
        return vision_pb2.VisionHealthResponse(ready=True, model="transfer-bench", hidden_size=self.hidden)


async def serve(port: int, hidden: int) -> None:
    import grpc

    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    vision_pb2_grpc.add_VisionServiceServicer_to_server(TileStreamer(hidden), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    log.info("tile streamer ready", extra={"port": port, "hidden": hidden})
    await server.wait_for_termination()


async def receive(address: str, tiles: int, streams: int, hidden: int, bar: tqdm) -> tuple[int, float]:
    """`streams` concurrent Encode streams of `tiles` tiles each: (bytes received, seconds)."""
    import grpc

    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)

        async def one(k: int) -> int:
            got = 0
            request = vision_pb2.EncodeRequest(request_id=f"transfer-{k}",
                                               options=vision_pb2.EncodeOptions(max_tiles=tiles))
            async for msg in stub.Encode(request):
                if msg.HasField("tile"):
                    t = msg.tile
                    # What llm_server does with each tile: the shared codec's (rows, hidden) bf16 tensor.
                    got += decode_bf16(t.data, t.rows, t.hidden_size).numel() * BF16_BYTES
                    bar.update(1)
            return got

        await one(-1)  # warm-up: connection, first allocations
        bar.reset(total=tiles * streams)
        t0 = time.perf_counter()
        sizes = await asyncio.gather(*(one(k) for k in range(streams)))
        return sum(sizes), time.perf_counter() - t0


def memcpy_rate(tile_bytes: int, tiles: int, repeats: int = 3) -> float:
    """Bytes/s of copying the same tiles one by one into a preallocated buffer (best of `repeats`)."""
    src = np.random.default_rng(1).integers(0, 2**16, tile_bytes // 2, dtype=np.uint16)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(tiles):
            np.copyto(dst, src)
        best = max(best, tiles * tile_bytes / (time.perf_counter() - t0))
    return best


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096, help="language hidden size (InternVL3.5-8B: 4096)")
    p.add_argument("--tiles", type=int, default=200, help="tiles per stream")
    p.add_argument("--streams", type=int, default=1, help="concurrent Encode streams")
    p.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # internal: the server process
    args = p.parse_args(argv)
    if args.serve is not None:
        asyncio.run(serve(args.serve, args.hidden))
        return 0

    port = free_port()
    address = f"127.0.0.1:{port}"
    with open(os.devnull, "w") as quiet:
        server = Service("tile-streamer", [sys.executable, __file__, "--serve", str(port), "--hidden",
                                           str(args.hidden)], env={"OMP_NUM_THREADS": "1"}, sink=quiet)
        try:
            server.wait_ready(lambda: vision_health(address), timeout=60)
            with tqdm(total=args.tiles, desc="tiles", unit="tile", file=sys.stderr, leave=False) as bar:
                nbytes, seconds = asyncio.run(receive(address, args.tiles, args.streams, args.hidden, bar))
        finally:
            server.stop()
    tile_bytes = ROWS * args.hidden * 2
    grpc_bps = nbytes / seconds
    copy_bps = memcpy_rate(tile_bytes, args.tiles * args.streams)
    result = {"hidden": args.hidden, "rows": ROWS, "tile_bytes": tile_bytes, "tiles": args.tiles * args.streams,
              "streams": args.streams, "bytes": nbytes, "grpc_seconds": seconds, "grpc_bytes_per_s": grpc_bps,
              "grpc_tiles_per_s": args.tiles * args.streams / seconds, "memcpy_bytes_per_s": copy_bps,
              "ratio": grpc_bps / copy_bps}
    log.info("transfer", extra={k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()})
    print(f"tile: {ROWS} x {args.hidden} bf16 = {tile_bytes / 2**20:.2f} MiB; {result['tiles']} tiles over "
          f"{args.streams} stream(s)\n"
          f"gRPC loopback stream: {grpc_bps / 2**30:.2f} GiB/s ({result['grpc_tiles_per_s']:.0f} tiles/s, "
          f"{1e3 * tile_bytes / grpc_bps:.2f} ms per tile)\n"
          f"memory copy:          {copy_bps / 2**30:.2f} GiB/s\n"
          f"ratio gRPC / memcpy:  {result['ratio']:.3f}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
