"""Where a DvD request spends its time, and what DvD adds over the work itself (p50 / p99 per resolution).

    python benchmarks/stage_timings.py                                  # starts the stack on the tiny checkpoint
    python benchmarks/stage_timings.py --llm HOST:PORT --router URL     # measures a running deployment

Requests are sent one at a time (no contention), so each figure is a stage's own latency. Each resolution is asked
twice over, with different images (the language server caches embeddings by content): straight to the language
server over gRPC, whose last message reports the stages, and through the router with the official `openai` client,
as a user would. The work is vision preprocessing and compute, and prefill; DvD's own part is
- hop: the vision call less the vision server's own stages (gRPC, the embedding transfer, its checks);
- gateway: the router's time to first token less the language server's (HTTP, JSON, base64, the gRPC hop), as a
  difference of the two passes' medians (different requests: a p50 only, within the spread of the two medians).
Writes JSON, markdown and a PNG with --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks.machine import auto_dtype, machine
from benchmarks.media import data_url, image_bytes
from benchmarks.throughput import pct
from dvd.logs import setup_logging
from dvd.v2 import llm_pb2, llm_pb2_grpc, vision_pb2

PROMPT = "Describe the image."
STAGES = ("vision_preprocess_seconds", "vision_queue_seconds", "vision_compute_seconds", "vision_seconds",
          "queue_seconds", "decode_seconds")
COLUMNS = ("vision_preprocess", "vision_queue", "vision_compute", "hop", "prefill", "ttft_grpc", "decode",
           "ttft_router", "gateway")
MEASURED_DIRECT = COLUMNS[:7]


async def one_grpc(stub: llm_pb2_grpc.LanguageServiceStub, image: bytes, output_len: int) -> dict[str, float]:
    # As the gateway sends it: the image's URL emptied, its bytes beside the request.
    chat = {"model": "tiny", "max_tokens": output_len, "ignore_eos": True, "temperature": 0.0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}},
                                                      {"type": "text", "text": PROMPT}]}]}
    req = llm_pb2.GenerateRequest(chat_request=json.dumps(chat).encode(),
                                  media=[vision_pb2.Media(kind=vision_pb2.MEDIA_KIND_IMAGE, data=image)])
    t0 = time.perf_counter()
    ttft = None
    last = None
    async for msg in stub.Generate(req):
        if ttft is None and msg.tokens:
            ttft = time.perf_counter() - t0
        last = msg
    assert last is not None and ttft is not None
    t = {f: getattr(last.timings, f) for f in STAGES}
    own = t["vision_preprocess_seconds"] + t["vision_queue_seconds"] + t["vision_compute_seconds"]
    return {"vision_preprocess": t["vision_preprocess_seconds"], "vision_compute": t["vision_compute_seconds"],
            "vision_queue": t["vision_queue_seconds"], "hop": t["vision_seconds"] - own, "prefill": t["queue_seconds"],
            "decode": t["decode_seconds"], "ttft_grpc": ttft, "visual_tokens": last.usage.visual_tokens,
            "embedding_mib": last.timings.embedding_bytes / 2**20}


async def one_router(client: object, model: str, image: bytes, fmt: str, output_len: int) -> float:
    """Time to the first streamed token through the gateway, as the official client sees it (its JSON encoding of
    the request included, as for any server)."""
    url = data_url(image, f"image/{fmt.lower()}")
    t0 = time.perf_counter()
    stream = await client.chat.completions.create(  # type: ignore[attr-defined]
        model=model, max_tokens=output_len, temperature=0.0, stream=True, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": PROMPT}]}])
    ttft = None
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
    assert ttft is not None, "the stream carried no text"
    return ttft


async def measure(llm: str, router_url: str, api_key: str, sizes: list[int], repeats: int, output_len: int,
                  fmt: str) -> list[dict[str, object]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=router_url, api_key=api_key, max_retries=0)
    model = (await client.models.list()).data[0].id
    rows: list[dict[str, object]] = []
    async with grpc.aio.insecure_channel(llm) as channel:
        stub = llm_pb2_grpc.LanguageServiceStub(channel)
        await one_grpc(stub, image_bytes(448, 448, 10**6, fmt), 2)  # warm-up, both ways
        await one_router(client, model, image_bytes(448, 448, 10**6 + 1, fmt), fmt, 2)
        for size in sizes:
            images = [image_bytes(size, size, seed, fmt) for seed in range(2 * repeats)]  # each image asked once
            direct = [await one_grpc(stub, image, output_len) for image in images[:repeats]]
            gateway = [await one_router(client, model, image, fmt, output_len) for image in images[repeats:]]
            row: dict[str, object] = {"px": size, "requests": repeats, "format": fmt,
                                      "image_kib": statistics.median(len(i) for i in images) / 1024,
                                      "visual_tokens": direct[0]["visual_tokens"],
                                      "embedding_mib": direct[0]["embedding_mib"]}
            for key in MEASURED_DIRECT:
                values = [d[key] for d in direct]
                row[key] = {"p50": pct(values, 50), "p99": pct(values, 99)}
            row["ttft_router"] = {"p50": pct(gateway, 50), "p99": pct(gateway, 99)}
            # Two samples of different requests: their medians compare, their tails do not (no p99).
            row["gateway"] = {"p50": row["ttft_router"]["p50"] - row["ttft_grpc"]["p50"]}  # type: ignore[index]
            rows.append(row)
    await client.close()
    return rows


def markdown(rows: list[dict[str, object]], where: str) -> str:
    head = "| px | image KiB | visual tokens | embeddings MiB | " + " | ".join(COLUMNS) + " |"
    lines = [f"Stage timings on {where}", "", head, "|" + "---|" * (4 + len(COLUMNS))]
    for r in rows:
        cells = [f"{1000 * r[k]['p50']:.1f} / " + (f"{1000 * r[k]['p99']:.1f}" if "p99" in r[k] else "-")  # type: ignore
                 for k in COLUMNS]
        lines.append(f"| {r['px']} | {r['image_kib']:.0f} | {r['visual_tokens']} | {r['embedding_mib']:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nms, p50 / p99 of one-at-a-time requests; hop and gateway are what DvD adds.\n"


def plot(rows: list[dict[str, object]], path: Path) -> None:
    """Stacked p50 stages up to the first token, per resolution; DvD's own parts (hop, gateway) in red tones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = (("vision_preprocess", "#8da0cb"), ("vision_queue", "#b3b3b3"), ("vision_compute", "#4c72b0"),
             ("hop", "#c44e52"), ("prefill", "#55a868"), ("gateway", "#dd8452"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [f"{r['px']} px" for r in rows]
    bottom = np.zeros(len(rows))
    for key, color in parts:
        ms = np.array([max(0.0, 1000 * r[key]["p50"]) for r in rows])  # type: ignore[index]
        ax.bar(names, ms, bottom=bottom, color=color, label=key)
        bottom += ms
    ax.set_ylabel("ms to the first token (p50)")
    ax.set_title("One request at a time: the work and what DvD adds", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llm", help="address of a running language server (default: start the stack)")
    p.add_argument("--router", help="base URL (.../v1) of the router in front of --llm")
    p.add_argument("--api-key", default="not-needed")
    p.add_argument("--model", default="tiny", help="checkpoint or preset of the stack started without --llm")
    p.add_argument("--sizes", default="448,896,1344")
    p.add_argument("--repeats", type=int, default=20, help="requests per resolution and path")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--image-format", default="JPEG", choices=("JPEG", "PNG"),
                   help="as benchmarks/throughput.py; PNG of the generated pictures is ~10x the bytes")
    p.add_argument("--out", type=Path, default=None, help="write stage_timings.json and stage_timings.md here")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="compute dtype of the started stack's vision server and language engine, as "
                        "benchmarks/throughput.py (auto: bfloat16 on a GPU or a CPU with native bf16)")
    args = p.parse_args()
    if bool(args.llm) != bool(args.router):
        p.error("--llm and --router go together")
    setup_logging("WARNING", fmt="text")
    sizes = [int(s) for s in args.sizes.split(",")]
    info = machine()
    where = info["cpu_model"]
    with contextlib.ExitStack() as stack:
        llm, router_url = args.llm, args.router
        if not llm:
            from router.local import start_stack

            dtype = ["--dtype", auto_dtype() if args.dtype == "auto" else args.dtype]
            started = stack.enter_context(start_stack(args.model, port=0, sink=None, vision_args=dtype,
                                                      llm_args=dtype))
            where += f", {args.model} in {dtype[1]}"
            llm, router_url = started.llm_address, started.base_url
        rows = asyncio.run(measure(llm, router_url, args.api_key, sizes, args.repeats, args.output_len,
                                   args.image_format))
    md = markdown(rows, where)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"machine": info, "setup": where, "command": " ".join(sys.argv), "rows": rows}
        (args.out / "stage_timings.json").write_text(json.dumps(record, indent=1))
        (args.out / "stage_timings.md").write_text(md)
        plot(rows, args.out / "stage_timings.png")


if __name__ == "__main__":
    main()
