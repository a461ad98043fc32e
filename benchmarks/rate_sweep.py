"""SLO attainment against request rate, and goodput: the highest rate at which >= 90% of requests meet their SLOs.

    python benchmarks/rate_sweep.py                                  # small preset, every configuration, 896 px
    python benchmarks/rate_sweep.py --resolutions 448,896,1344 --rates 0.5,1,2,4
    python benchmarks/rate_sweep.py --endpoint baseline=http://a:8000/v1 --endpoint dvd=http://b:8000/v1

DistServe's measure (Zhong et al., OSDI 2024): requests arrive as a Poisson process at each rate; a request attains
its SLOs when its TTFT and its TPOT are both within their targets; a configuration's goodput is the highest rate
swept whose attainment is at least `--attainment` (90%). The SLOs are per resolution and, by default, derived from
the baseline's own unloaded latencies: `--slo-scale` times stock vLLM's TTFT p50 and TPOT p50 with one request at a
time (so the baseline runs first); `--slo ttft:MS tpot:MS` sets them instead. Rates default to multiples of the
baseline's unloaded capacity at that resolution (1 / its unloaded end-to-end p50), the same rates for every
configuration. Every rate sends images sent by no earlier request (caches would otherwise answer them), the same
ones to every configuration. Everything else (requests, images, output length, services, CPU split) is
throughput.py's.

Writes sweep.json, sweep.md and attainment.png (attainment against rate, one panel per resolution).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.machine import machine
from benchmarks.throughput import (
    LABELS,
    REPO,
    Workload,
    parse_goodput,
    pct,
    run_cell,
    serve,
    served_model,
    text_prompt_tokens,
)
from benchmarks.throughput import parse_args as throughput_args
from dvd.logs import setup_logging

log = logging.getLogger("benchmarks.rate_sweep")
DEFAULT_RATE_FACTORS = (0.5, 1.0, 1.5, 2.0, 3.0)  # x the baseline's unloaded capacity at the resolution


def goodput(points: Sequence[tuple[float, float]], attainment: float) -> float:
    """DistServe's goodput from (rate, attainment) points: the highest rate whose attainment meets the target, 0 when
    none does. Rates above a failing one still count when they meet it (noise at one rate does not hide the rest)."""
    return max((rate for rate, share in points if share >= attainment), default=0.0)


def derive_slos(unloaded: dict[str, Any], scale: float) -> dict[str, float]:
    """SLO targets in ms from an unloaded cell's summary: `scale` x TTFT p50 and x TPOT p50."""
    return {"ttft": scale * unloaded["ttft_p50_s"] * 1e3, "tpot": scale * unloaded["tpot_p50_s"] * 1e3}


async def measure(base_url: str, config: str, wl: Workload, resolution: int, images: list[str],
                  targets: dict[str, float], api_key: str | None = None) -> dict[str, Any]:
    """One cell (throughput.run_cell) against `targets`; its summary with the rate and attainment."""
    limits = httpx.Limits(max_connections=wl.concurrency + 4, max_keepalive_connections=wl.concurrency + 4)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0, connect=30.0), limits=limits,
                                 headers=headers) as client:
        model = await served_model(client, base_url)
        text_tokens = await text_prompt_tokens(client, base_url, model)
        cell = await run_cell(client, base_url, model, wl, resolution, images, config, text_tokens, targets, None)
    s = cell.summary()
    ok = cell.ok()
    s.update(rate=None if math.isinf(wl.request_rate) else wl.request_rate, attainment=s["goodput_share"],
             slo_ms=targets, e2e_p50_s=pct([r.latency for r in ok], 50))
    return s


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--rates", default="", help="req/s, comma separated (default: the baseline's unloaded capacity "
                                                 f"x {','.join(map(str, DEFAULT_RATE_FACTORS))} at each resolution)")
    own.add_argument("--slo-scale", type=float, default=5.0,
                     help="SLOs = this x the baseline's unloaded TTFT p50 and TPOT p50, per resolution")
    own.add_argument("--slo", nargs="+", default=[], metavar="KEY:MS",
                     help="fixed SLOs instead (keys ttft, tpot, e2el; ms), e.g. --slo ttft:2000 tpot:100")
    own.add_argument("--attainment", type=float, default=0.9, help="goodput: highest rate with this attainment")
    own.add_argument("--unloaded-requests", type=int, default=4, help="requests, one at a time, for the SLOs")
    mine, rest = own.parse_known_args(argv)
    defaults = ["--resolutions", "896", "--num-requests", "16"]
    args = throughput_args([*defaults, *rest])
    args.rates = tuple(float(r) for r in mine.rates.split(",") if r)
    args.slo_scale, args.attainment, args.unloaded_requests = mine.slo_scale, mine.attainment, mine.unloaded_requests
    args.slo = parse_goodput(mine.slo) if mine.slo else {}
    if not args.slo and "baseline" not in args.configs:
        own.error("SLOs derive from the baseline: include it in --configs or give --slo")
    if not args.rates and "baseline" not in args.configs:
        own.error("default rates derive from the baseline: include it in --configs or give --rates")
    if args.configs and "baseline" in args.configs and args.configs[0] != "baseline":
        args.configs = ("baseline", *(c for c in args.configs if c != "baseline"))  # it sets the SLOs and rates
    return args


def markdown(record: dict[str, Any]) -> str:
    res_lines = []
    for resolution, per in record["resolutions"].items():
        rates = per["rates"]
        slo = ", ".join(f"{k.upper()} <= {v:.0f} ms" for k, v in per["slo_ms"].items())
        res_lines += [f"### {resolution} px (SLOs: {slo}; {per['slo_source']})", "",
                      "| configuration | " + " | ".join(f"{r:.3g} req/s" for r in rates) + " | goodput (req/s) |",
                      "|---|" + "---|" * (len(rates) + 1)]
        for config, cells in per["configs"].items():
            shares = {c["rate"]: c["attainment"] for c in cells}
            row = " | ".join(f"{100 * shares[r]:.0f}%" if r in shares else "" for r in rates)
            res_lines.append(f"| {LABELS.get(config, config)} | {row} | {per['goodput'][config]:.3g} |")
        res_lines.append("")
    return "\n".join(res_lines)


def plot(record: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(record["resolutions"].items())
    fig, axes = plt.subplots(1, len(items), figsize=(5.5 * len(items), 4.2), squeeze=False)
    for ax, (resolution, per) in zip(axes[0], items, strict=True):
        for config, cells in per["configs"].items():
            pts = sorted((c["rate"], 100 * c["attainment"]) for c in cells)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS.get(config, config))
        ax.axhline(100 * record["attainment_target"], color="grey", linestyle="--", linewidth=1)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_title(f"{resolution} px", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    width = int(5.5 * len(items) * 14)  # characters that fit across the figure at this font size
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.splitlines()), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging(fmt="text")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    out: Path = args.out or REPO / "results" / f"sweep-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    base = Workload(args.resolutions, args.num_requests, args.output_len, args.num_requests, math.inf,
                    args.image_format, args.seed)
    # Every rate sends images no earlier request sent (and the unloaded pass its own): a resent image would be
    # served from the language server's embedding cache or vLLM's prefix cache, and the sweep would measure caches.
    # The same images go to every configuration.
    n_rates = len(args.rates) or len(DEFAULT_RATE_FACTORS)
    unloaded_images = {r: [base.image_url(r, i) for i in range(args.unloaded_requests)] for r in args.resolutions}
    rate_images = {r: [[base.image_url(r, 1000 * (k + 1) + i) for i in range(args.num_requests)]
                       for k in range(n_rates)] for r in args.resolutions}
    per_res: dict[int, dict[str, Any]] = {r: {"configs": {}, "rates": list(args.rates), "slo_ms": dict(args.slo),
                                              "slo_source": "given (--slo)"} for r in args.resolutions}
    t_all = time.perf_counter()
    for config in args.configs:
        key = args.api_key if config in args.endpoints else None
        with serve(config, args, out) as base_url:
            for resolution in args.resolutions:
                per = per_res[resolution]
                if config == "baseline":
                    unloaded_wl = replace(base, num_requests=args.unloaded_requests, concurrency=1)
                    unloaded = asyncio.run(measure(base_url, config, unloaded_wl, resolution,
                                                   unloaded_images[resolution], {}, key))
                    per["unloaded"] = unloaded
                    if not args.slo:
                        per["slo_ms"] = derive_slos(unloaded, args.slo_scale)
                        per["slo_source"] = f"{args.slo_scale:g}x stock vLLM's unloaded TTFT and TPOT p50"
                    if not args.rates:
                        capacity = 1.0 / unloaded["e2e_p50_s"]
                        per["rates"] = [round(f * capacity, 3) for f in DEFAULT_RATE_FACTORS]
                cells = []
                for k, rate in enumerate(per["rates"]):
                    wl = replace(base, request_rate=rate, seed=args.seed + int(rate * 1000))
                    s = asyncio.run(measure(base_url, config, wl, resolution, rate_images[resolution][k],
                                            per["slo_ms"], key))
                    log.info("rate done", extra={"config": config, "resolution": resolution, "rate": rate,
                                                 "attainment": round(s["attainment"], 3),
                                                 "throughput_rps": round(s["throughput_rps"], 3)})
                    cells.append(s)
                per["configs"][config] = cells
    for per in per_res.values():
        per["goodput"] = {c: goodput([(s["rate"], s["attainment"]) for s in cells], args.attainment)
                          for c, cells in per["configs"].items()}
    m = machine()
    setup = (f"{args.num_requests} requests per rate, Poisson arrivals, {args.output_len} output tokens, model "
             f"{args.model} / {args.flash_model}, {args.dtype}; goodput = highest rate with >= "
             f"{100 * args.attainment:.0f}% attainment")
    record = {"command": ["rate_sweep.py", *(argv if argv is not None else sys.argv[1:])], "machine": m,
              "started": datetime.now().isoformat(timespec="seconds"), "wall_s": time.perf_counter() - t_all,
              "attainment_target": args.attainment, "setup": setup, "workload": asdict(base),
              "cpu_split": args.cpu_split.describe(), "core_budget": args.core_budget, "resolutions": per_res}
    md = markdown(record)
    (out / "sweep.json").write_text(json.dumps(record, indent=1, default=str))
    where = f"{m['cpu_model']}, {m['memory_gib']} GiB" + (f", {', '.join(m['gpus'])}" if m["gpus"] else ", no GPU")
    (out / "sweep.md").write_text(f"# SLO attainment and goodput ({where})\n\n{setup}\n\n{md}\n")
    plot(record, out / "attainment.png", f"{where}\n{setup}")
    print(f"\n{md}\n{where}; {setup}\nresults: {out} (sweep.json, sweep.md, attainment.png); wall "
          f"{record['wall_s']:.0f} s", flush=True)
    failed = sum(c["failed"] for per in per_res.values() for cells in per["configs"].values() for c in cells)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
