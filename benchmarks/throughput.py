"""Table 18 on this machine: request throughput of stock vLLM (colocated) vs DvD vs DvD + ViR, per image size.

    python benchmarks/throughput.py                                   # small preset, starts every engine itself
    python benchmarks/throughput.py --model /ckpt/InternVL3_5-8B --flash-model /ckpt/InternVL3_5-8B-Flash
    python benchmarks/throughput.py --endpoint dvd=http://gpu-node:8000/v1 --configs dvd   # a running deployment

Every configuration is driven by the same client over the OpenAI HTTP API (streaming chat completions, one
generated image per request, `ignore_eos` with a fixed `max_tokens`), with the same images, prompts, output length
and concurrency (or Poisson arrival rate). Each configuration's services start once and serve every resolution.
On one CPU machine the services of a configuration share the cores, so the split is explicit (`--cpu-split`) and
recorded with the results: see CPU_SPLIT_NOTE.

`--workload multiturn` sends conversations as chat clients do (every turn resends the history, the image included);
`--goodput` counts the requests that meet latency targets, as `vllm bench serve --goodput`; every cell also reports
the model FLOPs of a request (benchmarks/flops.py), vision and language, to relate a run to the paper's regime.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from benchmarks.flops import language_flops, llm_config, tiles_per_image, vision_tile_flops
from benchmarks.machine import auto_dtype, machine
from benchmarks.media import data_url, image_bytes
from dvd.checkpoint import resolve_model
from dvd.logs import setup_logging
from dvd.procs import Service, cpu_engine_env, free_port, http_ok, usable_cpus
from router.local import ENGINE_START_TIMEOUT, start_stack
from vision_server.config import ModelConfig

log = logging.getLogger("benchmarks.throughput")
REPO = Path(__file__).resolve().parent.parent

CONFIGS = ("baseline", "dvd", "dvd-vir")
LABELS = {"baseline": "baseline (vLLM colocated)", "dvd": "DvD", "dvd-vir": "DvD + ViR"}
PROMPT = "Describe this image in detail."
WORKLOADS = ("single", "multiturn")
# Later turns of a multi-turn conversation ask these in order (and wrap around): short, as users follow up.
FOLLOW_UPS = ("What colours dominate it?", "Describe the left side.", "What is in the background?",
              "Is there any text in it?", "Summarise it in one sentence.")
# vLLM's `bench serve --goodput` metrics; targets are in milliseconds.
GOODPUT_LABELS = {"ttft": "TTFT", "tpot": "TPOT", "e2el": "E2EL"}
DEFAULT_GOODPUT = ("ttft:2000", "tpot:100")
# InternVL wraps each image's embedding rows as `<img>` + rows + `</img>`; the template ends the image line with "\n".
# The text comes before the image, so that newline sits between two special tokens and is exactly one token.
IMAGE_WRAPPER_TOKENS = 3
CPU_SPLIT_NOTE = (
    "CPU-only numbers measure the serving system, not GPU speed-ups. Every configuration gets the same cores. With "
    "--cpu-split shared (the default) the DvD vision server and language engine both run on all of them, so the "
    "stage with work takes the cores the other leaves idle, as the baseline engine does inside one process; with "
    "VISION:LLM lists they get disjoint cores. The router and this client float. What transfers to GPU "
    "deployments: whether the pipeline overlaps vision and language work, per-request overheads of the extra hop "
    "(gRPC, bf16 wire format), the visual token counts and ViR's share of compressed tiles, the embedding cache on "
    "resent images, and failure-free operation under load. What does not: absolute req/s, TTFT and TPOT, and the "
    "size of the speed-up, which on GPUs depends on the ViT/LLM compute ratio, GPU count per pool, batch sizes and "
    "the interconnect (the paper's DvD adds GPUs for the vision pool; here both designs share one machine).")


@dataclass
class RequestResult:
    """One request's raw timings (seconds, relative to the start of its cell) and token counts."""

    index: int
    ok: bool
    start: float
    conversation: int = 0  # single-turn: every request is its own conversation (= index)
    turn: int = 0  # 0-based position in its conversation
    ttft: float | None = None
    latency: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    visual_tokens: int | None = None  # None where the prompt's text tokens are unknown (later turns)
    token_times: list[float] = field(default_factory=list)  # arrival of each content chunk, from `start`
    error: str | None = None
    text: str = ""  # the streamed content: the assistant message of the conversation's next turn
    id: str = ""  # the completion's id (the router's request id, in every service's log lines)

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.latency is None or not self.completion_tokens or self.completion_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.completion_tokens - 1)

    def metric(self, key: str) -> float | None:
        """A goodput metric in seconds: ttft, tpot or e2el (end-to-end latency)."""
        return {"ttft": self.ttft, "tpot": self.tpot, "e2el": self.latency}[key]


def parse_goodput(pairs: Sequence[str]) -> dict[str, float]:
    """`KEY:MS` pairs as `vllm bench serve --goodput` takes them (keys ttft, tpot, e2el; milliseconds)."""
    targets: dict[str, float] = {}
    for pair in pairs:
        key, sep, ms = pair.partition(":")
        try:
            value = float(ms)
        except ValueError:
            value = math.nan
        if not sep or key not in GOODPUT_LABELS or not value >= 0 or math.isinf(value):
            raise ValueError(f"goodput target {pair!r}: want KEY:MS with KEY in {', '.join(GOODPUT_LABELS)} "
                             "and MS >= 0")
        targets[key] = value
    return targets


def is_good(r: RequestResult, targets: Mapping[str, float]) -> bool:
    """vLLM's goodput rule: the request succeeded and meets every target (metric <= target)."""
    if not r.ok:
        return False
    for key, ms in targets.items():
        value = r.metric(key)
        if value is None or value * 1e3 > ms:
            return False
    return True


@dataclass(frozen=True)
class FlopsModel:
    """What one configuration's checkpoint computes per request (benchmarks/flops.py), from its config.json.

    Counts are of the request as sent, without caches: a multi-turn request resends the image and the history, and
    a server whose prefix or encoder cache hits computes less than this.
    """

    checkpoint: str
    tile_gflops: float  # one tile through the ViT and projector (and ViR's router for the Flash configuration)
    plain_tile_gflops: float  # without the router: a single-tile image skips it (one tile is never compressed)
    tiles: dict[int, int]  # tiles per image, by resolution
    llm: dict[str, Any]  # the decoder's config (llm_config)

    @staticmethod
    def from_checkpoint(ckpt: Path, resolutions: Sequence[int], with_vir: bool) -> FlopsModel:
        cfg = ModelConfig.from_checkpoint(ckpt)
        raw = json.loads((ckpt / "config.json").read_text())
        return FlopsModel(str(ckpt), vision_tile_flops(cfg, with_vir) / 1e9, vision_tile_flops(cfg, False) / 1e9,
                          {r: tiles_per_image(cfg, r, r) for r in resolutions}, dict(llm_config(raw)))

    def vision_gflops(self, resolution: int) -> float:
        """One image per request; the baseline runs the same ViT in its own process."""
        tiles = self.tiles[resolution]
        return tiles * (self.tile_gflops if tiles > 1 else self.plain_tile_gflops)

    def language_gflops(self, results: Sequence[RequestResult]) -> float | None:
        """Mean over the requests of each one's decoder FLOPs (prompts grow turn by turn in a conversation)."""
        xs = [language_flops(self.llm, r.prompt_tokens, r.completion_tokens) for r in results
              if r.prompt_tokens is not None and r.completion_tokens is not None]
        return statistics.fmean(xs) / 1e9 if xs else None


@dataclass
class Cell:
    """One configuration at one resolution."""

    config: str
    resolution: int
    duration: float
    results: list[RequestResult]
    text_prompt_tokens: int
    loadavg_before: tuple[float, float, float]
    goodput: dict[str, float] = field(default_factory=dict)  # targets in ms
    flops: FlopsModel | None = field(default=None, repr=False)

    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    def summary(self) -> dict[str, Any]:
        ok = self.ok()
        vis = [r.visual_tokens for r in ok if r.visual_tokens is not None]
        prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
        good = sum(is_good(r, self.goodput) for r in self.results)
        return {
            "config": self.config, "resolution": self.resolution, "requests": len(self.results),
            "failed": len(self.results) - len(ok), "duration_s": self.duration,
            "throughput_rps": len(ok) / self.duration if self.duration > 0 else 0.0,
            "output_tok_s": sum(r.completion_tokens or 0 for r in ok) / self.duration if self.duration > 0 else 0.0,
            "ttft_p50_s": pct([r.ttft for r in ok], 50), "ttft_p99_s": pct([r.ttft for r in ok], 99),
            "tpot_p50_s": pct([r.tpot for r in ok], 50), "tpot_p99_s": pct([r.tpot for r in ok], 99),
            "visual_tokens_per_image": statistics.fmean(vis) if vis else None,
            "goodput_rps": good / self.duration if self.duration > 0 else 0.0,
            "goodput_share": good / len(self.results) if self.results else 0.0,
            "prompt_tokens_mean": statistics.fmean(prompts) if prompts else None,
            "vision_gflops_per_request": self.flops.vision_gflops(self.resolution) if self.flops else None,
            "language_gflops_per_request": self.flops.language_gflops(ok) if self.flops else None,
        }


def pct(values: Sequence[float | None], q: float) -> float | None:
    """Percentile with linear interpolation (numpy's default), None when there is nothing to measure."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------------------------- workload

@dataclass(frozen=True)
class Workload:
    """The same requests for every configuration: one seeded image per conversation, so no cache can hit across
    conversations. `single` is a one-turn conversation per request; `multiturn` has `turns` turns per conversation.
    """

    resolutions: tuple[int, ...]
    num_requests: int
    output_len: int
    concurrency: int
    request_rate: float  # requests/s (Poisson arrivals); inf = all at once, bounded by concurrency
    image_format: str
    seed: int
    kind: str = "single"
    turns: int = 1  # requests per conversation; num_requests counts conversations

    def image_url(self, resolution: int, index: int) -> str:
        fmt = self.image_format.upper()
        mime = "image/jpeg" if fmt == "JPEG" else f"image/{fmt.lower()}"
        return data_url(image_bytes(resolution, resolution, seed=self.seed + resolution * 100_003 + index, fmt=fmt),
                        mime)

    def images(self) -> dict[int, list[str]]:
        """Encoded once, before any configuration runs: the client's own work stays out of the measurement."""
        return {r: [self.image_url(r, i) for i in range(self.num_requests)]
                for r in tqdm(self.resolutions, desc="images", unit="res", leave=False, file=sys.stderr)}

    def warmup_image(self, resolution: int) -> str:
        return self.image_url(resolution, 99_999)

    def arrivals(self) -> list[float]:
        """Send offsets in seconds: all zero, or a seeded Poisson process at `request_rate`."""
        if math.isinf(self.request_rate):
            return [0.0] * self.num_requests
        rng, t, out = random.Random(self.seed), 0.0, []
        for _ in range(self.num_requests):
            out.append(t)
            t += rng.expovariate(self.request_rate)
        return out


def chat_body(model: str, image: str | None, max_tokens: int, answers: Sequence[str] = ()) -> dict[str, Any]:
    """The request of turn len(answers): as chat clients send it, the whole history again, the image included.

    Turn 0 is the prompt with the image; each earlier answer follows as an assistant message, then a follow-up.
    """
    content: list[dict[str, Any]] = [{"type": "text", "text": PROMPT}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image}})
    messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
    for k, answer in enumerate(answers):
        messages += [{"role": "assistant", "content": answer},
                     {"role": "user", "content": [{"type": "text", "text": FOLLOW_UPS[k % len(FOLLOW_UPS)]}]}]
    return {"model": model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


# ------------------------------------------------------------------------------------------------------------ client

async def send(client: httpx.AsyncClient, base_url: str, body: dict[str, Any], index: int, t0: float,
               text_tokens: int | None) -> RequestResult:
    """One streaming chat completion; TTFT = first chunk with content, as vLLM's own serving benchmark counts it."""
    start = time.perf_counter()
    res = RequestResult(index=index, ok=False, start=start - t0)
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", f"{base_url}/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    res.error = str(chunk["error"])[:300]
                    return res
                usage = chunk.get("usage") or usage
                res.id = chunk.get("id") or res.id
                text = "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices") or ())
                if text:
                    res.text += text
                    now = time.perf_counter() - start
                    res.token_times.append(now)
                    if res.ttft is None:
                        res.ttft = now
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
        return res
    res.latency = time.perf_counter() - start
    if usage is None:
        res.error = "no usage in the stream"
        return res
    res.prompt_tokens, res.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if text_tokens is not None and res.prompt_tokens is not None:
        res.visual_tokens = res.prompt_tokens - text_tokens - IMAGE_WRAPPER_TOKENS
    if res.completion_tokens != body["max_tokens"]:
        res.error = f"{res.completion_tokens} completion tokens, expected {body['max_tokens']}"
        return res
    res.ok = res.ttft is not None
    if not res.ok:
        res.error = "no content in the stream"
    return res


async def served_model(client: httpx.AsyncClient, base_url: str) -> str:
    resp = await client.get(f"{base_url}/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def text_prompt_tokens(client: httpx.AsyncClient, base_url: str, model: str) -> int:
    """The server's own token count for the prompt without its image: the rest of an image prompt is visual."""
    res = await send(client, base_url, chat_body(model, None, 1), -1, time.perf_counter(), None)
    if res.prompt_tokens is None:
        raise RuntimeError(f"text-only calibration request failed: {res.error}")
    return res.prompt_tokens


async def run_cell(client: httpx.AsyncClient, base_url: str, model: str, wl: Workload, resolution: int,
                   images: list[str], config: str, text_tokens: int, goodput: dict[str, float],
                   flops: FlopsModel | None) -> Cell:
    """Warm up once, then send the resolution's conversations at the workload's concurrency or rate.

    Turns within a conversation are sequential (each needs the previous answer); only turn 0's prompt is the
    calibrated text plus one image, so later turns get no visual token count.
    """
    warm = await send(client, base_url, chat_body(model, wl.warmup_image(resolution), wl.output_len), -1,
                      time.perf_counter(), text_tokens)
    if not warm.ok:
        log.warning("warm-up request failed", extra={"config": config, "resolution": resolution,
                                                     "error": warm.error})
    gate = asyncio.Semaphore(wl.concurrency)
    bar = tqdm(total=len(images) * wl.turns, desc=f"{config} {resolution}px", unit="req", leave=False, file=sys.stderr)
    loadavg = os.getloadavg()
    t0 = time.perf_counter()

    async def conversation(c: int, offset: float) -> list[RequestResult]:
        await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
        out: list[RequestResult] = []
        async with gate:
            for k in range(wl.turns):
                i = c * wl.turns + k
                if out and not out[-1].ok:  # the history lacks an answer: the rest of the conversation is lost
                    r = RequestResult(index=i, ok=False, start=time.perf_counter() - t0,
                                      error=f"not sent: turn {k - 1} failed")
                else:
                    body = chat_body(model, images[c], wl.output_len, [x.text for x in out])
                    # Visual tokens = prompt - calibrated text - wrapper holds for turn 0's prompt only: later ones
                    # add the answers and follow-ups, whose token counts depend on how the server tokenises them.
                    r = await send(client, base_url, body, i, t0, text_tokens if k == 0 else None)
                r.conversation, r.turn = c, k
                out.append(r)
                bar.update(1)
                if not r.ok:
                    log.warning("request failed", extra={"config": config, "resolution": resolution, "index": i,
                                                         "conversation": c, "turn": k, "error": r.error})
        return out

    convs = await asyncio.gather(*(conversation(c, off) for c, off in enumerate(wl.arrivals())))
    duration = time.perf_counter() - t0
    bar.close()
    cell = Cell(config, resolution, duration, [r for conv in convs for r in conv], text_tokens, loadavg, goodput,
                flops)
    s = cell.summary()
    log.info("cell done", extra={k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()})
    return cell


async def drive(base_url: str, config: str, wl: Workload, images: dict[int, list[str]], api_key: str | None,
                goodput: dict[str, float], flops: FlopsModel | None) -> list[Cell]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=wl.concurrency + 4, max_keepalive_connections=wl.concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0, connect=30.0), limits=limits,
                                 headers=headers) as client:
        model = await served_model(client, base_url)
        text_tokens = await text_prompt_tokens(client, base_url, model)
        log.info("serving", extra={"config": config, "model": model, "text_prompt_tokens": text_tokens})
        return [await run_cell(client, base_url, model, wl, res, images[res], config, text_tokens, goodput, flops)
                for res in wl.resolutions]


# ---------------------------------------------------------------------------------------------------------- services

@dataclass(frozen=True)
class CpuSplit:
    """Which cores each service may use; None = no pinning (the process floats over the whole machine)."""

    vision: str | None
    llm: str | None
    baseline: str | None
    mode: str = "split"  # split (disjoint lists), shared (vision and language on every core), none (no binding)

    @staticmethod
    def parse(spec: str) -> CpuSplit:
        every = usable_cpus()
        if spec == "none":
            return CpuSplit(None, None, None, "none")
        if spec == "shared":
            return CpuSplit(None, every, every, "shared")
        vision, _, llm = spec.partition(":")
        if not vision or not llm:
            raise argparse.ArgumentTypeError(f"--cpu-split wants shared, none or VISION_CPUS:LLM_CPUS, got {spec!r}")
        return CpuSplit(vision, llm, every)

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "vision_cpus": self.vision or "all (unpinned)", "llm_cpus": self.llm,
                "baseline_cpus": self.baseline, "vision_threads": count_cpus(self.vision or usable_cpus()),
                "llm_omp_threads": count_cpus(self.llm), "baseline_omp_threads": count_cpus(self.baseline),
                "router_and_client": "unpinned"}


def count_cpus(spec: str | None) -> int | None:
    """Number of CPUs in a taskset-style list ("0", "0-3,6")."""
    if spec is None:
        return None
    n = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def engine_env(cpus: str | None, kv_gib: int) -> dict[str, str]:
    """vLLM on CPU bound to `cpus` (dvd.procs.cpu_engine_env); None keeps vLLM's own `auto` binding."""
    return cpu_engine_env(cpus, kv_gib, bind=cpus is not None)


@contextlib.contextmanager
def baseline_server(model: Path, split: CpuSplit, args: argparse.Namespace, log_dir: Path) -> Iterator[str]:
    """Stock vLLM's OpenAI server on the full checkpoint (vision tower included), given the whole machine."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--trust-remote-code",
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(args.max_model_len),
            "--dtype", args.dtype, *args.baseline_arg]
    log_dir.mkdir(parents=True, exist_ok=True)
    quiet = open(os.devnull, "w")  # noqa: SIM115 - closed below; the log file keeps everything
    svc = Service("baseline", argv, env=engine_env(split.baseline, args.kv_cache_gib), sink=quiet,
                  log_file=log_dir / "baseline.log", cpus=split.baseline or None)
    try:
        svc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}/health"), timeout=ENGINE_START_TIMEOUT)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        svc.stop()
        quiet.close()


@contextlib.contextmanager
def dvd_stack(model: Path, split: CpuSplit, args: argparse.Namespace, log_dir: Path) -> Iterator[str]:
    """The DvD stack via router.local.start_stack, vision and language engine on the split's cores."""
    cpus = {k: v for k, v in (("vision", split.vision), ("llm", split.llm)) if v is not None and split.mode == "split"}
    service_env = {"llm": engine_env(split.llm, args.kv_cache_gib)}
    if split.vision is not None:
        service_env["vision"] = {"OMP_NUM_THREADS": str(count_cpus(split.vision))}
    with open(os.devnull, "w") as quiet, start_stack(
            model, 0, devices="cpu", max_model_len=args.max_model_len, sink=quiet, log_dir=log_dir,
            cpus=cpus, service_env=service_env, core_budget=args.core_budget == "on",
            vision_args=["--dtype", args.dtype, *args.vision_arg],
            llm_args=["--dtype", args.dtype, *args.llm_arg]) as stack:
        yield stack.base_url


# ------------------------------------------------------------------------------------------------------------ report

def fmt(v: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def gflop(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def goodput_label(targets: Mapping[str, float]) -> str:
    return " and ".join(f"{GOODPUT_LABELS[k]}<={v:g} ms" for k, v in targets.items()) or "no latency target"


def workload_title(wl: Workload) -> str:
    return "single-turn requests" if wl.kind == "single" else f"{wl.turns}-turn conversations"


def flops_note(summaries: list[dict[str, Any]], configs: Sequence[str]) -> str:
    """The vision/language FLOP ratio per request: the quantity to hold against the paper's 38B setting."""
    parts = []
    for c in configs:
        ratios = [f"{s['resolution']} px {s['vision_gflops_per_request'] / s['language_gflops_per_request']:.3g}"
                  for s in summaries if s["config"] == c and s["vision_gflops_per_request"] is not None
                  and s["language_gflops_per_request"]]
        if ratios:
            parts.append(f"{LABELS.get(c, c)} {', '.join(ratios)}")
    if not parts:
        return "No FLOP counts: no configuration had a checkpoint to read them from."
    return ("Vision / language model FLOPs per request here (dense, no caches): " + "; ".join(parts) + "; this "
            "ratio, not the absolute FLOPs, is what to hold against the paper's 38B setting (benchmarks/flops.py "
            "computes it from that checkpoint's config.json for the same resolutions and prompts): the larger it is, "
            "the larger the share of a colocated engine's work that DvD moves to its vision pool.")


def tables(summaries: list[dict[str, Any]], configs: Sequence[str], resolutions: Sequence[int],
           goodput: Mapping[str, float]) -> str:
    """Table 18's shape (req/s and speed-up over the baseline), goodput in the same shape, then every metric per
    cell and the FLOP ratio."""
    by = {(s["config"], s["resolution"]): s for s in summaries}
    head = "| configuration | " + " | ".join(f"{r} px" for r in resolutions) + " |"
    lines = ["Request throughput (req/s, speed-up over baseline)", "", head,
             "|---|" + "---|" * len(resolutions)]
    for c in configs:
        cells = []
        for r in resolutions:
            s, base = by.get((c, r)), by.get(("baseline", r))
            if s is None:
                cells.append("-")
                continue
            up = (f" ({s['throughput_rps'] / base['throughput_rps']:.2f}x)"
                  if base and base["throughput_rps"] > 0 and c != "baseline" else "")
            cells.append(f"{s['throughput_rps']:.3f}{up}")
        lines.append(f"| {LABELS.get(c, c)} | " + " | ".join(cells) + " |")
    lines += ["", f"Goodput (req/s meeting {goodput_label(goodput)}; share of requests)", "", head,
              "|---|" + "---|" * len(resolutions)]
    for c in configs:
        cells = []
        for r in resolutions:
            s = by.get((c, r))
            cells.append("-" if s is None else f"{s['goodput_rps']:.3f} ({s['goodput_share']:.0%})")
        lines.append(f"| {LABELS.get(c, c)} | " + " | ".join(cells) + " |")
    lines += ["", "| configuration | px | req/s | speed-up | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | "
              "output tok/s | visual tokens / image | goodput req/s (share) | vision / language GFLOP per request | "
              "failed / requests |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        for r in resolutions:
            s = by.get((c, r))
            if s is None:
                continue
            base = by.get(("baseline", r))
            up = f"{s['throughput_rps'] / base['throughput_rps']:.2f}x" if base and base["throughput_rps"] else "-"
            lines.append(
                f"| {LABELS.get(c, c)} | {r} | {s['throughput_rps']:.3f} | {up} | "
                f"{fmt(s['ttft_p50_s'], 1e3, 0)} / {fmt(s['ttft_p99_s'], 1e3, 0)} | "
                f"{fmt(s['tpot_p50_s'], 1e3, 1)} / {fmt(s['tpot_p99_s'], 1e3, 1)} | {s['output_tok_s']:.1f} | "
                f"{fmt(s['visual_tokens_per_image'], 1, 1)} | {s['goodput_rps']:.3f} ({s['goodput_share']:.0%}) | "
                f"{gflop(s['vision_gflops_per_request'])} / {gflop(s['language_gflops_per_request'])} | "
                f"{s['failed']} / {s['requests']} |")
    lines += ["", flops_note(summaries, configs)]
    return "\n".join(lines)


def plot(summaries: list[dict[str, Any]], configs: Sequence[str], resolutions: Sequence[int], path: Path,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in configs:
        pts = [(s["resolution"], s["throughput_rps"]) for s in summaries if s["config"] == c and s["throughput_rps"]]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS.get(c, c))
            for x, y in pts:
                ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xticks(list(resolutions), [f"{r} px" for r in resolutions])
    ax.set_yscale("log")
    ticks = FuncFormatter(lambda v, _pos: f"{v:.3g}")
    ax.yaxis.set_major_formatter(ticks)
    ax.yaxis.set_minor_formatter(ticks)
    ax.set_xlabel("image resolution (square)")
    ax.set_ylabel("request throughput (req/s, log)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------------- main

OUTPUT_LENS = {"chat": 128, "reasoning": 1024}  # output tokens of a chat answer, and of a reasoning model's


def output_len(text: str) -> int:
    return OUTPUT_LENS[text] if text in OUTPUT_LENS else int(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="small", help="non-Flash checkpoint (baseline and DvD): preset or directory")
    p.add_argument("--flash-model", default="small-flash", help="Flash checkpoint (DvD + ViR): preset or directory")
    p.add_argument("--resolutions", default="448,896,1344", help="square image sides in pixels, comma separated")
    p.add_argument("--num-requests", type=int, default=12,
                   help="measured requests per resolution (conversations with --workload multiturn)")
    p.add_argument("--concurrency", type=int, default=4, help="requests (multiturn: conversations) in flight at most")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals in req/s (inf: all requests at once, bounded by --concurrency); "
                        "multiturn: conversation starts")
    p.add_argument("--output-len", type=output_len, default=OUTPUT_LENS["chat"],
                   help="max_tokens, with ignore_eos: a number, or chat (128, a chat answer) or reasoning (1024, a "
                        "thinking model's answer)")
    p.add_argument("--workload", default="single", choices=WORKLOADS,
                   help="single: one image and prompt per request; multiturn: conversations of --turns turns, each "
                        "resending the history (image included) with the previous answer and a follow-up question")
    p.add_argument("--turns", type=int, default=3, help="turns per conversation with --workload multiturn")
    p.add_argument("--goodput", nargs="+", default=list(DEFAULT_GOODPUT), metavar="KEY:MS",
                   help="latency targets (keys ttft, tpot, e2el; milliseconds) a good request meets, as "
                        "`vllm bench serve --goodput`")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    p.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL",
                   help="benchmark a running deployment for configuration NAME (base URL ending in /v1) "
                        "instead of starting it; repeatable")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key for --endpoint servers")
    p.add_argument("--out", type=Path, default=None, help="results directory (default results/throughput-<time>)")
    p.add_argument("--cpu-split", default="shared", type=CpuSplit.parse,
                   help="shared: DvD's vision server and language engine both use every CPU (the baseline engine "
                        "too); VISION_CPUS:LLM_CPUS: disjoint cores for DvD; none: no binding at all")
    p.add_argument("--core-budget", choices=("on", "off"), default="on",
                   help="DvD on shared cores: the engine and the vision server split them only while both compute "
                        "(dvd/core_budget.py; dvd-local's default); off: all threads of both float over every core")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="compute dtype of every engine (baseline vLLM, DvD's language engine and vision server), the "
                        "same for all so that the comparison is of serving designs, not of precisions; auto: "
                        "bfloat16 on a GPU or a CPU with native bf16 (AVX512-BF16/AMX), float32 otherwise")
    p.add_argument("--image-format", default="JPEG", choices=("JPEG", "PNG"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE for each engine")
    p.add_argument("--baseline-arg", action="append", default=[], help="extra option for the stock vLLM server")
    p.add_argument("--llm-arg", action="append", default=[], help="extra option for llm_server")
    p.add_argument("--vision-arg", action="append", default=[], help="extra option for vision_server")
    args = p.parse_args(argv)
    args.resolutions = tuple(int(r) for r in args.resolutions.split(","))
    if args.dtype == "auto":
        args.dtype = auto_dtype()
    args.configs = tuple(c for c in args.configs.split(",") if c)
    args.endpoints = dict(e.split("=", 1) for e in args.endpoint)
    for c in (*args.configs, *args.endpoints):
        if c not in CONFIGS:
            p.error(f"unknown configuration {c!r} (choose from {', '.join(CONFIGS)})")
    if args.num_requests < 1 or args.concurrency < 1 or args.output_len < 2:
        p.error("--num-requests and --concurrency must be >= 1, --output-len >= 2 (TPOT needs two tokens)")
    if args.turns < 1:
        p.error("--turns must be >= 1")
    try:
        args.goodput = parse_goodput(args.goodput)
    except ValueError as exc:
        p.error(str(exc))
    return args


@contextlib.contextmanager
def serve(config: str, args: argparse.Namespace, out: Path) -> Iterator[str]:
    if config in args.endpoints:
        yield args.endpoints[config].rstrip("/")
    elif config == "baseline":
        with baseline_server(resolve_model(args.model), args.cpu_split, args, out / "logs") as url:
            yield url
    else:
        model = resolve_model(args.model if config == "dvd" else args.flash_model)
        with dvd_stack(model, args.cpu_split, args, out / "logs" / config) as url:
            yield url


def flops_model(config: str, args: argparse.Namespace) -> FlopsModel | None:
    """The configuration's checkpoint; for --endpoint configurations --model / --flash-model stand for what is served.

    ViR's router runs only in the Flash configuration; the baseline computes the same ViT as DvD, in its own process.
    """
    name = args.flash_model if config == "dvd-vir" else args.model
    try:
        return FlopsModel.from_checkpoint(resolve_model(name), args.resolutions, with_vir=config == "dvd-vir")
    except (OSError, ValueError, KeyError) as exc:
        log.warning("no FLOP counts for this configuration", extra={"config": config, "model": name,
                                                                    "error": str(exc)})
        return None


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging(fmt="text")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the progress bars
    args = parse_args(argv)
    out: Path = args.out or REPO / "results" / f"throughput-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    multiturn = args.workload == "multiturn"
    wl = Workload(args.resolutions, args.num_requests, args.output_len, args.concurrency, args.request_rate,
                  args.image_format, args.seed, args.workload, args.turns if multiturn else 1)
    record: dict[str, Any] = {
        "command": [sys.executable, *sys.argv] if argv is None else ["throughput.py", *argv],
        "started": datetime.now().isoformat(timespec="seconds"), "machine": machine(),
        "workload": {**asdict(wl), "request_rate": None if math.isinf(wl.request_rate) else wl.request_rate,
                     "prompt": PROMPT, "image_wrapper_tokens": IMAGE_WRAPPER_TOKENS,
                     "follow_ups": list(FOLLOW_UPS) if multiturn else []},
        "goodput_targets_ms": args.goodput, "dtype": args.dtype,
        "models": {"baseline": args.model, "dvd": args.model, "dvd-vir": args.flash_model},
        "endpoints": args.endpoints, "cpu_split": {**args.cpu_split.describe(), "note": CPU_SPLIT_NOTE},
        "core_budget": args.core_budget,
        "configs": {}, "summaries": [],
    }
    log.info("benchmark start", extra={"out": str(out), "configs": ",".join(args.configs),
                                       "resolutions": ",".join(map(str, args.resolutions)),
                                       "requests": args.num_requests, "concurrency": args.concurrency,
                                       "output_len": args.output_len})
    images = wl.images()
    t_all = time.perf_counter()
    for config in args.configs:
        t_start = time.perf_counter()
        log.info("starting configuration", extra={"config": config, "endpoint": args.endpoints.get(config)})
        flops = flops_model(config, args)
        with serve(config, args, out) as base_url:
            startup = time.perf_counter() - t_start
            log.info("configuration ready", extra={"config": config, "url": base_url, "startup_s": round(startup, 1)})
            cells = asyncio.run(drive(base_url, config, wl, images,
                                      args.api_key if config in args.endpoints else None, args.goodput, flops))
        record["configs"][config] = {
            "url": base_url, "startup_s": startup, "started_by_benchmark": config not in args.endpoints,
            "flops": asdict(flops) if flops else None,
            "cells": [{**{k: v for k, v in asdict(c).items() if k != "flops"},
                       "results": [{**asdict(r), "tpot": r.tpot} for r in c.results]} for c in cells]}
        record["summaries"] += [c.summary() for c in cells]
    record["wall_s"] = time.perf_counter() - t_all
    md = tables(record["summaries"], args.configs, args.resolutions, args.goodput)
    m = record["machine"]
    where = (f"{m['cpu_model']}, {m['memory_gib']} GiB"
             + (f", {', '.join(m['gpus'])}" if m["gpus"] else ", no GPU"))
    setup = ((f"{args.num_requests} conversations x {wl.turns} turns per resolution (a turn is a request), "
              f"concurrency {args.concurrency} conversations" if multiturn else
              f"{args.num_requests} requests per resolution, concurrency {args.concurrency}")
             + ("" if math.isinf(args.request_rate) else f", Poisson {args.request_rate} req/s")
             + f", {args.output_len} output tokens, model {args.model} / {args.flash_model}, {args.dtype} everywhere")
    (out / "results.json").write_text(json.dumps(record, indent=1))
    (out / "results.md").write_text(f"# Throughput, {workload_title(wl)} ({where})\n\n{setup}; CPU split: "
                                    f"{json.dumps(args.cpu_split.describe())}\n\n{md}\n\n{CPU_SPLIT_NOTE}\n")
    plot(record["summaries"], args.configs, args.resolutions, out / "throughput.png", f"{where}\n{setup}")
    print(f"\n{md}\n\n{where}; {setup}\nresults: {out} (results.json, results.md, throughput.png); "
          f"wall {record['wall_s']:.0f} s", flush=True)
    return 1 if any(s["failed"] for s in record["summaries"]) else 0


if __name__ == "__main__":
    sys.exit(main())
