"""ViR under pressure vs fixed ViR: a Flash stack offered a multiple of its capacity, goodput beside req/s.

    python benchmarks/vir_pressure.py --out results/vir_pressure     # heavylm-flash, 3x capacity, 2 rounds
    python benchmarks/vir_pressure.py --model tiny-flash --seconds 20 --rounds 1

One Flash vision server, two language servers on the same checkpoint (one core each where the host has two), one
with `--vir-pressure-waiting N` and one without, and a router in front of each, all started once. Calibrated on the
fixed stack: the TTFT of requests sent one at a time (the SLO is `--slo-factor` x their p90, so the unloaded stack
meets it) and its capacity (completed req/s with `--concurrency` clients; each router admits that many at once and
queues `--queue` more, 429 beyond, the same for both). Each round then offers `--overload` x that capacity as Poisson
arrivals for `--seconds` to each stack in turn (order alternating across rounds), every request with an image of its
own. Per run, over first arrival to last answer: completed req/s, goodput (req/s whose TTFT met the SLO), TTFT p50 /
p90, mean prompt tokens, 429s, the highest pressure level seen. After each pressure run the level must read 0 again
and a new image must get the prompt tokens the fixed stack gives it. Writes JSON + markdown + a PNG with --out.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from benchmarks.affinity import counter
from benchmarks.machine import auto_dtype, cpu_model
from benchmarks.media import data_url, image_bytes
from benchmarks.services import alternating, figure, parsed, policy_arguments, rounds, run_labels, save, services, write
from benchmarks.throughput import RequestResult, chat_body, pct, send
from dvd.procs import cpu_engine_env, engine_cpus, free_port, language_server, router, vision_server

log = logging.getLogger("benchmarks.vir_pressure")
POLICIES = ("fixed", "pressure")
LEVEL = "dvd_llm_vir_pressure"


@dataclass
class Run:
    policy: str
    round: int
    offered_rps: float
    elapsed_s: float  # first arrival to last answer: rates are over the whole run, backlog included
    slo_s: float
    ttft: list[float]  # requests that completed
    prompt_tokens: list[int]
    outcomes: dict[str, int]  # "200", "429", "error"
    peak_level: float
    restored_s: float | None = None  # pressure runs: seconds until the level read 0 again
    restored_tokens: bool | None = None  # ... and a new image then got the fixed stack's prompt tokens

    @property
    def completed_rps(self) -> float:
        return len(self.ttft) / self.elapsed_s

    @property
    def goodput_rps(self) -> float:
        return sum(t <= self.slo_s for t in self.ttft) / self.elapsed_s


@dataclass
class Stack:
    routers: dict[str, str]  # policy -> base URL (…/v1)
    metrics: dict[str, str]  # policy -> its language server's /metrics
    images: Iterator[str] = field(default_factory=lambda: iter(()))

    def level(self, policy: str) -> float:
        return counter(httpx.get(self.metrics[policy], timeout=10).text, LEVEL)


@contextmanager
def stack(model: Path, waiting: int, admit: tuple[int, int], dtype: str, log_dir: Path | None) -> Iterator[Stack]:
    with services(log_dir) as up:
        started, logs = up.started, up.logs
        vision = started(vision_server(model, "--dtype", dtype, **logs("vision")))
        vision_address = vision.wait_grpc(300)
        ports = {policy: free_port() for policy in POLICIES}
        extra = {"fixed": (), "pressure": ("--vir-pressure-waiting", str(waiting))}
        llms = {policy: started(language_server(
            model, vision_address, "--max-model-len", "16384", "--served-model-name", "model", "--dtype", dtype,
            "--metrics-port", str(ports[policy]), *extra[policy], env=cpu_engine_env(engine_cpus(i), kv_gib=2),
            **logs(f"llm-{policy}")))
            for i, policy in enumerate(POLICIES)}
        routers = {}
        for policy, svc in llms.items():
            # Admission as an operator sets it for an SLO: about the concurrency the stack serves in time, a short
            # queue, 429 beyond (the last resort, the same for both).
            front = started(router(svc.wait_grpc(900), "--max-concurrency", str(admit[0]), "--max-queue",
                                   str(admit[1]),
                                   name=f"router-{policy}", **logs(f"router-{policy}")))
            routers[policy] = front.wait_http() + "/v1"
        yield Stack(routers, {p: f"http://127.0.0.1:{port}/metrics" for p, port in ports.items()})


def fresh_images(resolution: int, seed: int) -> Iterator[str]:
    k = seed
    while True:
        yield data_url(image_bytes(resolution, resolution, seed=k))
        k += 1


async def one(client: httpx.AsyncClient, base: str, image: str, max_tokens: int) -> RequestResult:
    return await send(client, base, chat_body("model", image, max_tokens), 0, time.perf_counter(), None)


async def calibrate(s: Stack, args: argparse.Namespace) -> tuple[float, float, list[float]]:
    """The fixed stack's unloaded TTFTs, the SLO they meet, and its capacity in completed req/s."""
    base = s.routers["fixed"]
    async with httpx.AsyncClient(timeout=600) as client:
        for policy in POLICIES:  # warm both engines and the vision server
            for _ in range(2):
                await one(client, s.routers[policy], next(s.images), args.max_tokens)
        unloaded = [await one(client, base, next(s.images), args.max_tokens) for _ in range(args.probes)]
        ttfts = [r.ttft for r in unloaded if r.ok and r.ttft is not None]
        assert len(ttfts) == args.probes, [r.error for r in unloaded]
        slo = args.slo_factor * (pct(ttfts, 90) or 0.0)
        images = [next(s.images) for _ in range(args.calibration_requests)]
        queue = iter(images)

        async def worker() -> int:
            done = 0
            for image in queue:
                done += (await one(client, base, image, args.max_tokens)).ok
            return done

        t0 = time.perf_counter()
        done = sum(await asyncio.gather(*(worker() for _ in range(args.concurrency))))
        capacity = done / (time.perf_counter() - t0)
    return slo, capacity, ttfts


async def overload(s: Stack, policy: str, round_: int, rate: float, slo: float, args: argparse.Namespace) -> Run:
    rng = random.Random(round_)  # the same arrival times for both policies of a round
    arrivals: list[float] = []
    t = rng.expovariate(rate)
    while t < args.seconds:
        arrivals.append(t)
        t += rng.expovariate(rate)
    images = [next(s.images) for _ in arrivals]  # encoded before the clock starts
    peak = 0.0
    running = True

    async def watch() -> None:
        nonlocal peak
        while running:
            peak = max(peak, await asyncio.to_thread(s.level, policy))
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch())
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        t0 = time.perf_counter()

        async def at(offset: float, image: str) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            return await one(client, s.routers[policy], image, args.max_tokens)

        results = await asyncio.gather(*(at(a, im) for a, im in zip(arrivals, images, strict=True)))
        elapsed = time.perf_counter() - t0
    running = False
    await watcher
    outcomes = Counter("200" if r.ok else "429" if (r.error or "").startswith("HTTP 429") else "error"
                       for r in results)
    ok = [r for r in results if r.ok]
    run = Run(policy, round_, rate, elapsed, slo, [r.ttft for r in ok if r.ttft is not None],
              [r.prompt_tokens or 0 for r in ok], dict(outcomes), peak)
    if policy == "pressure":
        run.restored_s, run.restored_tokens = await restored(s, args)
    return run


async def restored(s: Stack, args: argparse.Namespace) -> tuple[float | None, bool]:
    """Seconds until the pressure stack's level reads 0, and whether a new image then gets the fixed stack's
    prompt tokens (the request's own rule: no pressure applied)."""
    t0 = time.monotonic()
    while s.level("pressure") > 0:
        if time.monotonic() - t0 > 60:
            return None, False
        await asyncio.sleep(0.25)
    seconds = time.monotonic() - t0
    image = next(s.images)
    async with httpx.AsyncClient(timeout=600) as client:
        after = await one(client, s.routers["pressure"], image, args.max_tokens)
        reference = await one(client, s.routers["fixed"], image, args.max_tokens)
    return seconds, after.ok and reference.ok and after.prompt_tokens == reference.prompt_tokens


def report(runs: list[Run], calibration: dict[str, object], args: argparse.Namespace, out: Path | None) -> str:
    lines = [f"# ViR under pressure vs fixed ViR ({cpu_model()})", "",
             f"model {args.model} ({args.dtype}), {args.resolution} px images (one per request, never repeated), "
             f"{args.max_tokens} tokens per answer, `--vir-pressure-waiting {args.waiting}`; fixed stack unloaded "
             f"TTFT p50 {calibration['unloaded_p50']:.3f} s, p90 {calibration['unloaded_p90']:.3f} s; SLO TTFT <= "
             f"{calibration['slo_s']:.3f} s ({args.slo_factor} x p90); capacity {calibration['capacity_rps']:.3f} "
             f"req/s ({args.concurrency} clients; each router admits {args.concurrency}, queues {args.queue}); "
             f"offered {args.overload} x capacity for {args.seconds:.0f} s; rates over first arrival to last answer",
             "", "| round | policy | offered req/s | completed req/s | goodput req/s | TTFT p50 / p90 (s) | "
             "prompt tokens (mean) | outcomes | peak level |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.round} | {r.policy} | {r.offered_rps:.3f} | {r.completed_rps:.3f} | "
                     f"{r.goodput_rps:.3f} | {pct(r.ttft, 50) or 0:.2f} / {pct(r.ttft, 90) or 0:.2f} | "
                     f"{statistics.mean(r.prompt_tokens) if r.prompt_tokens else 0:.0f} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(r.outcomes.items()))} | {r.peak_level:.2f} |")
    lines.append("")
    for round_, by in rounds(runs):
        ratio = by["pressure"].goodput_rps / by["fixed"].goodput_rps if by["fixed"].goodput_rps else float("inf")
        rps = by["pressure"].completed_rps / by["fixed"].completed_rps if by["fixed"].completed_rps else float("inf")
        back = by["pressure"]
        lines.append(f"round {round_}: pressure / fixed: goodput {ratio:.2f}x, completed req/s {rps:.2f}x; level back "
                     f"to 0 after {back.restored_s if back.restored_s is not None else float('nan'):.1f} s, then "
                     f"the request's own rule: {back.restored_tokens}")
    text = "\n".join(lines) + "\n"
    if out:
        write(out, "vir_pressure", {
            "cpu": cpu_model(), "args": vars(args), "calibration": calibration,
            "runs": [asdict(r) | {"completed_rps": r.completed_rps, "goodput_rps": r.goodput_rps} for r in runs]},
            text, lambda path: plot(runs, path))
    return text


def plot(runs: list[Run], path: Path) -> None:
    fig, ax = figure("ViR under pressure vs fixed, offered load above capacity")
    x = range(len(runs))
    ax.bar([i - 0.2 for i in x], [r.completed_rps for r in runs], 0.4, label="completed req/s")
    ax.bar([i + 0.2 for i in x], [r.goodput_rps for r in runs], 0.4, label="goodput req/s (TTFT SLO met)")
    ax.set_xticks(list(x), run_labels(runs))
    ax.legend(fontsize=8)
    save(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = policy_arguments(__doc__, "heavylm-flash", "a Flash preset, directory or hub repo id", "vir_pressure",
                              max_tokens=8, resolution_help="image side (896: 4 tiles + thumbnail)")
    parser.add_argument("--waiting", type=int, default=1, help="the pressure stack's --vir-pressure-waiting")
    parser.add_argument("--overload", type=float, default=3.0, help="offered load, a multiple of capacity")
    parser.add_argument("--seconds", type=float, default=60.0, help="arrival window of each run")
    parser.add_argument("--slo-factor", type=float, default=2.0, help="TTFT SLO = this x the unloaded p90")
    parser.add_argument("--probes", type=int, default=6, help="unloaded requests, one at a time")
    parser.add_argument("--concurrency", type=int, default=2, help="clients measuring capacity; also each router's "
                        "--max-concurrency (what the stack serves within the SLO)")
    parser.add_argument("--queue", type=int, default=0, help="each router's --max-queue")
    parser.add_argument("--calibration-requests", type=int, default=16, help="requests measuring capacity")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                        help="every engine's compute dtype; auto: bfloat16 where the device computes it natively")
    parser.add_argument("--timeout", type=float, default=300.0, help="client timeout per request, seconds")
    args, model = parsed(parser, argv)
    runs: list[Run] = []
    if args.dtype == "auto":
        args.dtype = auto_dtype()
    logs = args.out / "logs" if args.out else None
    with stack(model, args.waiting, (args.concurrency, args.queue), args.dtype, logs) as s:
        s.images = fresh_images(args.resolution, seed=1)
        slo, capacity, unloaded = asyncio.run(calibrate(s, args))
        calibration = {"slo_s": slo, "capacity_rps": capacity, "unloaded_p50": pct(unloaded, 50),
                       "unloaded_p90": pct(unloaded, 90)}
        log.info("calibrated", extra=calibration)
        runs += [asyncio.run(overload(s, policy, round_, args.overload * capacity, slo, args))
                 for round_, policy in alternating(POLICIES, args.rounds)]
    print(report(runs, calibration, args, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
