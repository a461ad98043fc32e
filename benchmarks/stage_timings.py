"""Where a DvD request spends its time: vision (preprocess, queue, compute, transfer), prefill, decode.

    python benchmarks/stage_timings.py                    # starts the stack on the tiny checkpoint
    python benchmarks/stage_timings.py --llm HOST:PORT    # measures a running language server

Requests are sent one at a time (no contention), so each figure is the stage's own latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics

import grpc

from dvd.logs import setup_logging
from dvd.media import image_bytes
from dvd.v1 import llm_pb2, llm_pb2_grpc

FIELDS = ("vision_preprocess_seconds", "vision_queue_seconds", "vision_compute_seconds", "vision_seconds",
          "queue_seconds", "decode_seconds")


async def one(stub: llm_pb2_grpc.LanguageServiceStub, size: int, seed: int, output_len: int) -> dict[str, float]:
    req = llm_pb2.GenerateRequest(
        messages=[llm_pb2.ChatMessage(role="user", content=[
            llm_pb2.ContentPart(image=image_bytes(size, size, seed=seed)),
            llm_pb2.ContentPart(text="Describe the image.")])],
        sampling=llm_pb2.SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0))
    last = None
    async for msg in stub.Generate(req):
        last = msg
    assert last is not None
    row = {f: getattr(last.timings, f) for f in FIELDS}
    row["transfer_and_client_seconds"] = row["vision_seconds"] - sum(row[f] for f in FIELDS[:3])
    row["visual_tokens"] = last.usage.visual_tokens
    row["embedding_mib"] = last.timings.embedding_bytes / 2**20
    return row


async def measure(address: str, sizes: list[int], repeats: int, output_len: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = llm_pb2_grpc.LanguageServiceStub(channel)
        await one(stub, 448, 999, 2)  # warm-up
        print(f"{'px':>5} {'tokens':>6} {'MiB':>5} " + " ".join(f"{k.replace('_seconds', ''):>18}" for k in
                                                         (*FIELDS, "transfer_and_client_seconds")) + "   (ms, median)")
        for size in sizes:
            rows = [await one(stub, size, seed, output_len) for seed in range(repeats)]
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            print(f"{size:>5} {int(med['visual_tokens']):>6} {med['embedding_mib']:>5.2f} "
                  + " ".join(f"{1000 * med[k]:>18.1f}" for k in (*FIELDS, "transfer_and_client_seconds")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llm", help="address of a running language server (default: start the tiny stack)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--sizes", default="448,896,1344")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output-len", type=int, default=16)
    args = p.parse_args()
    setup_logging("WARNING")
    sizes = [int(s) for s in args.sizes.split(",")]
    with contextlib.ExitStack() as stack:
        address = args.llm
        if not address:
            from router.local import start_stack

            address = stack.enter_context(start_stack(args.model, port=0, sink=None)).llm_address
        asyncio.run(measure(address, sizes, args.repeats, args.output_len))


if __name__ == "__main__":
    main()
