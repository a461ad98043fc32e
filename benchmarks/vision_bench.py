"""Vision micro-benchmark: tiles/s through the gRPC vision service vs a plain forward loop of the same model.

    python benchmarks/vision_bench.py                       # CPU, the `small` checkpoint, starts its own server
    python benchmarks/vision_bench.py --device cuda --model /path/to/InternVL3_5-8B-Flash
    python benchmarks/vision_bench.py --address host:port   # an already running server (same --model for the loop)

Two ratios, each measured side by side in one run (rounds alternate; the best round of each side counts):
- saturated: service tiles/s under concurrent requests / the plain forward loop's tiles/s at its best batch size
  (1, 2, 4 and the server's largest batch are tried): what decoding, tiling, batching, gRPC and the bf16 rows'
  delivery cost on top of the model itself (target >= 0.95). The client is the language server's own VisionPool,
  receiving over the data plane the server offers (shared memory on one host), as a language server does.
- lone: one single-tile request at a time, its latency / one bare single-tile forward (target <= 1.2): what a
  request pays when nothing else is queued (no padding, no waiting for company).
The plain loop does the service's work: ViT, the router on Flash checkpoints, one projector per tile.

And the model against references nobody here wrote, in the same rounds:
- vLLM's own InternViT -> pixel shuffle -> mlp1 (its model class and loader, same checkpoint, tiles and dtype; skipped
  where vLLM is not installed): our ViT's tiles/s over it (target >= 1.2).
- MFU: tiles/s x FLOP per tile over an in-run square matmul in the same dtype (what the GEMM library reaches here)
  and over the nominal peak (GPU data sheet; CPU cores x clock x FLOP per cycle).
`--out DIR` writes vision_bench.json, .md and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.flops import vision_tile_flops
from benchmarks.machine import cpu_model, cpu_peak_flops, native_bf16
from benchmarks.vllm_vision import vllm_available, vllm_extract_feature
from dvd.checkpoint import resolve_model
from dvd.procs import vision_server
from dvd.v2 import vision_pb2
from llm_server.vision_pool import VisionPool
from vision_server.config import ModelConfig, ServerConfig
from vision_server.model import build_model, compile_vit
from vision_server.preprocess import preprocess
from vision_server.weights import load_vision_weights

# Dense bf16 peaks (no sparsity), by device-name substring.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def make_images(n: int, width: int, height: int) -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        # Smooth content with noise: realistic JPEG sizes and decode times.
        base = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((width, height), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (height, width, 3))
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class ForwardLoop:
    """A model forward alone on the same tiles, on a worker thread like the server's device runner (on CPU the main
    thread ran this model ~2x slower: glibc's main-thread heap hands big temporaries back to the OS)."""

    def __init__(self, forward: Callable[[torch.Tensor, bool], object], tiles: torch.Tensor, device: str,
                 repeats: int) -> None:
        self.forward, self.tiles, self.device, self.repeats = forward, tiles, device, repeats
        self.pool = ThreadPoolExecutor(max_workers=1)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _throughput(self, batch: int) -> float:
        batches = [self.tiles[i:i + batch] for i in range(0, len(self.tiles) - batch + 1, batch)]
        for b in batches[:2]:  # warm-up
            self.forward(b, True)
        self._sync()
        t0 = time.perf_counter()
        for _ in range(self.repeats):
            for b in batches:
                self.forward(b, True)
        self._sync()
        return self.repeats * len(batches) * batch / (time.perf_counter() - t0)

    def _single_ms(self, n: int) -> float:
        one = self.tiles[:1]
        self.forward(one, False)  # a lone tile is never compressed: the service skips the router too
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.forward(one, False)
            self._sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    def throughput(self, batch: int) -> float:
        """Tiles/s of one round at `batch` tiles per forward."""
        return self.pool.submit(self._throughput, batch).result()

    def single_ms(self, n: int) -> float:
        """Median time of a bare single-tile forward (to bf16 rows on the host)."""
        return self.pool.submit(self._single_ms, n).result()

    def run(self, fn: Callable[[], float]) -> float:
        return self.pool.submit(fn).result()


def our_forward(cfg: ModelConfig, ckpt: Path, device: str, dtype: torch.dtype, with_vir: bool,
                compiled: bool = False) -> Callable[[torch.Tensor, bool], object]:
    """The service's work on a batch: ViT, the router on Flash checkpoints (ViR on), one projector per tile."""
    model = build_model(cfg, load_vision_weights(ckpt, cfg.flash), device, dtype)
    if compiled:
        compile_vit(model)
    with_vir = with_vir and cfg.flash

    @torch.inference_mode()
    def forward(b: torch.Tensor, router: bool) -> object:
        grid = model.features(b.to(device))
        if router and with_vir:
            model.route(grid, grid.shape[0])
        return model.project(grid, compressed=False).to(torch.bfloat16).cpu()

    return forward


def vllm_forward(ckpt: Path, device: str, dtype: torch.dtype) -> Callable[[torch.Tensor, bool], object]:
    """vLLM's own InternViT -> pixel shuffle -> mlp1 (no router: vLLM has none), to bf16 rows on the host."""
    extract = vllm_extract_feature(ckpt, dtype, device)
    return lambda b, router: extract(b).to(torch.bfloat16).cpu()


def matmul_flops(device: str, dtype: torch.dtype, n: int, seconds: float = 2.0) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`: the in-run ceiling a ViT's GEMMs can approach (n large enough that
    the operands exceed the last-level cache on CPU)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)
    sync()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


@contextlib.asynccontextmanager
async def language_side(address: str, hidden: int) -> AsyncIterator[VisionPool]:
    """The client a language server is: its own VisionPool, receiving over the data plane the server offers it
    (shared memory on one host), so the service is measured as it is used, not through inline gRPC."""
    pool = VisionPool((address,), hidden_size=hidden, timeout_s=600, transport="auto")
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


async def lone_run(address: str, hidden: int, image: bytes, n: int, vir: int) -> float:
    """Median latency (ms) of `n` single-image requests sent one after another."""
    times = []
    async with language_side(address, hidden) as pool:
        for k in range(n + 1):
            t = time.perf_counter()
            await pool.encode(f"lone-{k}", [vision_pb2.Media(data=image)], vision_pb2.EncodeOptions(vir=vir))
            if k:  # the first one warms the path up
                times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


async def service_run(address: str, hidden: int, images: list[bytes], per_request: int, concurrency: int,
                      repeats: int, vir: int) -> tuple[float, list[float], int]:
    """Encode all images `repeats` times with `concurrency` calls in flight: (tiles/s, latencies, compressed)."""
    reqs = [images[i:i + per_request] for i in range(0, len(images), per_request)] * repeats
    latencies: list[float] = []
    tiles = compressed = 0
    async with language_side(address, hidden) as pool:

        async def one(k: int, imgs: list[bytes]) -> None:
            nonlocal tiles, compressed
            t = time.perf_counter()
            encoded = await pool.encode(f"bench-{k}", [vision_pb2.Media(data=i) for i in imgs],
                                        vision_pb2.EncodeOptions(vir=vir))
            tiles += sum(s.num_tiles for s in encoded.summary.images)
            compressed += sum(s.num_compressed_tiles for s in encoded.summary.images)
            latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(one(-k - 1, reqs[0]) for k in range(2)))  # warm-up
        tiles = compressed = 0
        latencies.clear()
        sem = asyncio.Semaphore(concurrency)

        async def gated(k: int, imgs: list[bytes]) -> None:
            async with sem:
                await one(k, imgs)

        t0 = time.perf_counter()
        await asyncio.gather(*(gated(k, r) for k, r in enumerate(reqs)))
        return tiles / (time.perf_counter() - t0), latencies, compressed


def peak_flops(device: str, dtype: torch.dtype, override_tflops: float) -> tuple[float, str]:
    """The device's nominal dense peak in `dtype`: the data sheet on GPUs, cores x clock x FLOP/cycle on CPUs."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)
        if dtype != torch.bfloat16:
            return 0.0, f"no data-sheet figure for {dtype} on {name}"
        return peak * 1e12, f"{name} data sheet, dense bf16" if peak else f"unknown peak for {name}"
    return cpu_peak_flops(bf16=dtype == torch.bfloat16 and native_bf16())


def best_of(runs: dict[int, list[float]]) -> tuple[int, float]:
    """The batch size with the best median round, and its best round (the service's best round counts too: the
    best of all rounds at every size would be the best of more noisy samples than the service gets)."""
    batch = max(runs, key=lambda b: statistics.median(runs[b]))
    return batch, max(runs[batch])


def write_report(out: Path, r: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vision_bench.json").write_text(json.dumps(r, indent=1))
    rows = [("service", r["service_tiles_per_s"], f"concurrency {r['concurrency']}"),
            ("our ViT, bare loop", r["plain_tiles_per_s"], f"batch {r['plain_batch']}")]
    if r.get("vllm_tiles_per_s"):
        rows.append(("vLLM's InternViT", r["vllm_tiles_per_s"], f"batch {r['vllm_batch']}"))
    lines = [f"# Vision tiles/s, `{r['model']}` ({r['dtype']}, {r['where']})", "",
             f"{r['gflop_per_tile']:.2f} GFLOP per tile; in-run {r['matmul_n']}^3 matmul "
             f"{r['matmul_flops'] / 1e9:.1f} GFLOP/s; nominal peak {r['peak_flops'] / 1e9:.1f} GFLOP/s "
             f"({r['peak_source']}).", "",
             "| side | tiles/s | x vLLM | MFU vs matmul | MFU vs peak | setting |", "|---|---|---|---|---|---|"]
    for name, tps, setting in rows:
        vs = f"{tps / r['vllm_tiles_per_s']:.2f}" if r.get("vllm_tiles_per_s") else "-"
        mfu_peak = f"{tps * r['gflop_per_tile'] * 1e9 / r['peak_flops']:.1%}" if r["peak_flops"] else "-"
        lines.append(f"| {name} | {tps:.2f} | {vs} | {tps * r['gflop_per_tile'] * 1e9 / r['matmul_flops']:.1%} | "
                     f"{mfu_peak} | {setting} |")
    lines += ["", f"Service / bare loop {r['service_vs_plain']:.3f} (target >= 0.95); lone single-tile request "
              f"{r['lone_ms']:.1f} ms vs bare forward {r['single_ms']:.1f} ms = {r['lone_vs_single']:.2f}x "
              "(target <= 1.2)."]
    (out / "vision_bench.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([n for n, _, _ in rows], [t for _, t, _ in rows], color=["#4c72b0", "#55a868", "#c44e52"][:len(rows)])
    ax.axhline(r["matmul_flops"] / (r["gflop_per_tile"] * 1e9), color="grey", ls="--", label="in-run matmul rate")
    ax.set_ylabel("tiles/s")
    ax.set_title(f"{r['model']} {r['dtype']}\n{r['where']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "vision_bench.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="checkpoint directory or preset")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="auto: bfloat16 on a GPU or a CPU with native bf16, float32 otherwise")
    p.add_argument("--address", default=None, help="use a running server instead of starting one")
    p.add_argument("--batching", choices=("auto", "variable", "padded"), default="auto",
                   help="the server's batching (vision_server --batching)")
    p.add_argument("--preprocess-threads", type=int, default=0, help="the server's decoding threads (0 = its default)")
    p.add_argument("--lone-requests", type=int, default=10, help="single-tile requests per round for the lone ratio")
    p.add_argument("--max-batch-tiles", type=int, default=0)
    p.add_argument("--batch-sizes", default="", help="the loops' batch sizes (default 1, 2, 4 and the server's)")
    p.add_argument("--image-size", default="896x448", help="WxH of the test images (896x448 = 3 tiles)")
    p.add_argument("--images", type=int, default=16, help="distinct images")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3,
                   help="passes over the images per round: the service's first and last batches wait for decoding "
                        "and run part-full, so one pass of 48 tiles measured its ramps, not its steady state (0.93x "
                        "the loop where three passes measured 0.95x, 2-vCPU Zen 4 EPYC)")
    p.add_argument("--rounds", type=int, default=3, help="measurements per side; the best one counts")
    p.add_argument("--vir", choices=("auto", "off"), default="auto")
    p.add_argument("--compile", action="store_true",
                   help="the server and our loop run the compiled ViT (vision_server --compile)")
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM's InternViT (it is skipped where vLLM is absent)")
    p.add_argument("--matmul-n", type=int, default=0, help="matmul reference size (default 3072 on CPU, 8192 on GPU)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak, if not derived")
    p.add_argument("--out", type=Path, default=None, help="write vision_bench.json, .md and .png here")
    a = p.parse_args(argv)

    device = "cuda:0" if a.device == "cuda" else a.device
    scfg = ServerConfig(model=a.model, devices=(device,), dtype=a.dtype, max_batch_tiles=a.max_batch_tiles,
                        batching=a.batching)
    max_batch = scfg.resolved_max_batch()
    if a.dtype == "auto":
        dtype = torch.bfloat16 if scfg.on_gpu() or native_bf16() else torch.float32
    else:
        dtype = getattr(torch, a.dtype)
    ckpt = resolve_model(a.model)
    cfg = ModelConfig.from_checkpoint(ckpt)
    w, h = (int(x) for x in a.image_size.split("x"))
    images = make_images(a.images, w, h)
    lone_image = make_images(1, cfg.image_size, cfg.image_size)[0]  # exactly one tile
    vir = vision_pb2.VIR_MODE_OFF if a.vir == "off" else vision_pb2.VIR_MODE_AUTO
    with_vir = cfg.flash and a.vir == "auto"
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else cpu_model()
    print(f"on {where}", flush=True)
    print(f"model={cfg.name} flash={cfg.flash} device={device} dtype={dtype} batching={a.batching} "
          f"max_batch={max_batch} threads={threads} images={a.images}x{a.image_size} concurrency={a.concurrency} "
          f"compiled={a.compile}",
          flush=True)

    tiles = torch.cat([preprocess(d, image_size=cfg.image_size, min_num=1, max_num=cfg.max_dynamic_patch,
                                  use_thumbnail=cfg.use_thumbnail, max_pixels=10**9).pixels for d in images])
    plain = ForwardLoop(our_forward(cfg, ckpt, device, dtype, with_vir, a.compile), tiles, device, a.repeats)
    ref = None
    if not a.no_vllm and vllm_available():
        ref = ForwardLoop(vllm_forward(ckpt, device, dtype), tiles, device, a.repeats)
    elif not a.no_vllm:
        print("vllm    : not installed here; vLLM's InternViT is not measured", flush=True)
    batch_sizes = sorted({int(x) for x in a.batch_sizes.split(",") if x} or {1, 2, 4, max_batch})
    svc = None
    address = a.address
    if address is None:
        env = {"OMP_NUM_THREADS": str(threads), "DVD_LOG_LEVEL": "WARNING"}
        # The resolved dtype, not "auto": the server's own auto is float32 on every CPU, and the sides must match.
        # No cache of recent encodings: the benchmark sends its images many times, and measures the ViT.
        svc = vision_server(ckpt, "--embedding-cache-gb", "0", "--dtype", str(dtype).removeprefix("torch."),
                            "--batching", a.batching,
                            "--max-batch-tiles", str(max_batch),
                            *(["--compile"] if a.compile else []),
                            *(["--preprocess-threads", str(a.preprocess_threads)] if a.preprocess_threads else []),
                            name="vision-bench", devices=device, env=env, sink=open(os.devnull, "w"))  # noqa: SIM115
        address = svc.wait_grpc(300)
    # Rounds alternate (the idle server costs nothing while the loops run) and the best round of each side
    # counts: on a shared machine the slower rounds measure the neighbours.
    svc_runs: list[tuple[float, list[float], int]] = []
    loop_runs: dict[int, list[float]] = {b: [] for b in batch_sizes}
    ref_runs: dict[int, list[float]] = {b: [] for b in batch_sizes}
    lone_runs: list[float] = []
    single_runs: list[float] = []
    ref_single: list[float] = []
    matmul_n = a.matmul_n or (8192 if device.startswith("cuda") else 3072)
    matmul: list[float] = []
    try:
        for k in range(a.rounds):
            for b in batch_sizes:
                loop_runs[b].append(plain.throughput(b))
                if ref is not None:
                    ref_runs[b].append(ref.throughput(b))
            svc_runs.append(asyncio.run(service_run(address, cfg.llm_hidden, images, a.images_per_request,
                                                    a.concurrency, a.repeats, vir)))
            single_runs.append(plain.single_ms(a.lone_requests))
            if ref is not None:
                ref_single.append(ref.single_ms(a.lone_requests))
            lone_runs.append(asyncio.run(lone_run(address, cfg.llm_hidden, lone_image, a.lone_requests, vir)))
            matmul.append(plain.run(lambda: matmul_flops(device, dtype, matmul_n)))
            print(f"round {k + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    finally:
        if svc is not None:
            svc.stop()
    svc_tps, lat, compressed = max(svc_runs, key=lambda r: r[0])
    best_batch, loop_tps = best_of(loop_runs)
    paired = [r[0] / x for r, x in zip(svc_runs, loop_runs[best_batch], strict=True)]
    lone_ms, single_ms = min(lone_runs), min(single_runs)
    print(f"rounds  : service {' '.join(f'{r[0]:.2f}' for r in svc_runs)} tiles/s | ours "
          + " | ".join(f"batch {b}: {' '.join(f'{x:.2f}' for x in r)}" for b, r in loop_runs.items()))
    if ref is not None:
        print("          vLLM " + " | ".join(f"batch {b}: {' '.join(f'{x:.2f}' for x in r)}"
                                      for b, r in ref_runs.items()))

    lat.sort()
    print(f"service : {svc_tps:8.2f} tiles/s  (request latency p50 {statistics.median(lat) * 1000:.0f} ms, "
          f"p90 {lat[int(0.9 * (len(lat) - 1))] * 1000:.0f} ms, compressed tiles {compressed})")
    print(f"plain   : {loop_tps:8.2f} tiles/s  (our model's forward loop, best batch size {best_batch})")
    ref_batch, ref_tps = best_of(ref_runs) if ref is not None else (0, 0.0)
    if ref is not None:
        print(f"vllm    : {ref_tps:8.2f} tiles/s  (vLLM's InternViT + pixel shuffle + mlp1, same tiles and dtype, best "
              f"batch size {ref_batch}; single tile {min(ref_single):.1f} ms)")
        print(f"vs vllm : service {svc_tps / ref_tps:.3f}x, our loop {loop_tps / ref_tps:.3f}x (target >= 1.2)")
    print(f"ratio   : {svc_tps / loop_tps:8.3f}  (saturated service / plain loop; target >= 0.95); round by round "
          + " ".join(f"{x:.3f}" for x in paired))
    print(f"lone    : {lone_ms:8.1f} ms per single-tile request vs {single_ms:.1f} ms per bare single-tile forward: "
          f"{lone_ms / single_ms:.2f}x (target <= 1.2)")
    flops = vision_tile_flops(cfg, with_vir)
    mm = max(matmul)
    peak, peak_source = peak_flops(device, dtype, a.peak_tflops)
    print(f"flops   : {flops / 1e9:8.2f} GFLOP per tile; {matmul_n}^3 {dtype} matmul {mm / 1e9:.1f} GFLOP/s in this "
          f"run; nominal peak {peak / 1e9:.1f} GFLOP/s ({peak_source})")
    sides = [("service", svc_tps), ("plain", loop_tps)] + ([("vllm", ref_tps)] if ref is not None else [])
    for name, tps in sides:
        print(f"mfu     : {name:8} {tps * flops / mm:6.1%} of the matmul"
              + (f", {tps * flops / peak:6.1%} of peak" if peak else ""))
    if device.startswith("cuda") and peak:
        floor_ms = flops / peak * 1e3
        print(f"floor   : {floor_ms:8.3f} ms per tile = {1e3 / floor_ms:.0f} tiles/s at peak")
    if a.out:
        write_report(a.out, {
            "where": where, "model": cfg.name, "compiled": a.compile, "device": device,
            "dtype": str(dtype).removeprefix("torch."), "threads": threads, "concurrency": a.concurrency,
            "images": a.images, "image_size": a.image_size,
            "gflop_per_tile": flops / 1e9, "matmul_n": matmul_n, "matmul_flops": mm, "peak_flops": peak,
            "peak_source": peak_source, "service_tiles_per_s": svc_tps, "plain_tiles_per_s": loop_tps,
            "plain_batch": best_batch, "vllm_tiles_per_s": ref_tps or None, "vllm_batch": ref_batch or None,
            "vllm_single_ms": min(ref_single) if ref_single else None, "service_vs_plain": svc_tps / loop_tps,
            "service_vs_vllm": svc_tps / ref_tps if ref_tps else None, "lone_ms": lone_ms, "single_ms": single_ms,
            "lone_vs_single": lone_ms / single_ms, "rounds": {"service": [r[0] for r in svc_runs],
                                                              "plain": loop_runs, "vllm": ref_runs}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
