"""Cache-affine routing vs least load: multi-turn chats over two language replicas behind one vision server.

    python benchmarks/affinity.py                                 # small preset, 8 conversations x 4 turns
    python benchmarks/affinity.py --model tiny --conversations 4 --turns 3 --out results/affinity

One vision server, two language servers (one core each where the host has two or more), and one router per policy
(`--routing affinity`, `--routing least-load`) in front of both, all started once. Each policy's run gets images of
its own (no cache is warm for it); its conversations run concurrently, the turns of one in order, every turn
resending the history with its image as chat clients do. Each round runs both policies, in alternating order
across rounds. Per run: p50 / p90 TTFT of first turns and of later turns, the vision server's Encode calls per
distinct image (its `dvd_vision_requests` counter) and the images its ViT encoded (its cache of recent encodings
serves the rest: `dvd_vision_embedding_cache_lookups{result="miss"}`), the language servers' embedding-cache hits,
and how the router chose (`dvd_router_routed`). The ratio that matters, affinity / least-load of later turns' p50
TTFT, is taken within each round. Writes JSON + markdown + a PNG with --out.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import statistics
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from benchmarks.machine import cpu_model
from benchmarks.media import data_url, image_bytes
from benchmarks.services import alternating, figure, parsed, policy_arguments, rounds, run_labels, save, services, write
from benchmarks.throughput import chat_body, pct, send
from dvd.procs import cpu_engine_env, engine_cpus, free_port, language_server, router, vision_server

log = logging.getLogger("benchmarks.affinity")
POLICIES = ("affinity", "least-load")


@dataclass
class Run:
    policy: str
    round: int
    first_ttft: list[float]
    later_ttft: list[float]
    encodes: float  # the vision server's Encode calls during the run
    vit_encodes: float  # images it ran the ViT for (the others came from its cache of recent encodings)
    images: int  # distinct images sent
    cache_hits: float  # embedding-cache hits on the language servers during the run
    routed: dict[str, float]  # the router's choices during the run


def p(values: list[float], q: float) -> float:
    """throughput.py's percentile; a run always has TTFTs to measure."""
    value = pct(values, q)
    assert value is not None, "no TTFTs"
    return value


def counter(text: str, name: str, label: str = "") -> float:
    """Sum of a Prometheus counter's samples (those whose labels contain `label`)."""
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") and label in line) or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def routed(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^dvd_router_routed_total\{choice="(\w+)"\} (\S+)$', text, re.M)}


@dataclass
class Stack:
    routers: dict[str, str]  # policy -> base URL
    metrics: dict[str, str]  # "vision", "llm0", "llm1", policy -> /metrics URL

    def scrape(self) -> dict[str, str]:
        return {name: httpx.get(url, timeout=10).text for name, url in self.metrics.items()}


@contextmanager
def stack(model: Path, log_dir: Path | None) -> Iterator[Stack]:
    with services(log_dir) as up:
        started, logs = up.started, up.logs
        metrics = {name: free_port() for name in ("vision", "llm0", "llm1")}
        vision = started(vision_server(model, "--metrics-port", str(metrics["vision"]), **logs("vision")))
        vision_address = vision.wait_grpc(300)
        llms = [started(language_server(model, vision_address, "--max-model-len", "16384", "--served-model-name",
                                        "model", "--metrics-port", str(metrics[f"llm{i}"]),
                                        env=cpu_engine_env(engine_cpus(i), kv_gib=2), **logs(f"llm{i}")))
                for i in range(2)]
        addresses = ",".join(svc.wait_grpc(900) for svc in llms)
        routers, urls = {}, {name: f"http://127.0.0.1:{port}/metrics" for name, port in metrics.items()}
        for policy in POLICIES:
            svc = started(router(addresses, "--routing", policy, "--metrics-port", "0", name=f"router-{policy}",
                                 **logs(f"router-{policy}")))
            routers[policy] = svc.wait_http() + "/v1"
            urls[policy] = f"http://127.0.0.1:{svc.wait_port('metrics')}/metrics"
        yield Stack(routers, urls)


async def conversation(client: httpx.AsyncClient, base_url: str, image: str, turns: int,
                       max_tokens: int) -> list[float]:
    """One chat, turn after turn, as `throughput.py --workload multiturn` sends it; the TTFT of each turn."""
    answers: list[str] = []
    ttfts: list[float] = []
    for turn in range(turns):
        res = await send(client, base_url, chat_body("model", image, max_tokens, answers), turn, 0.0, None)
        if not res.ok or res.ttft is None:
            raise RuntimeError(f"turn {turn} failed: {res.error}")
        ttfts.append(res.ttft)
        answers.append(res.text)
    return ttfts


async def run_policy(s: Stack, policy: str, round_: int, args: argparse.Namespace) -> Run:
    seed0 = 1000 * (round_ * len(POLICIES) + POLICIES.index(policy))  # images of its own: no warm cache
    images = [data_url(image_bytes(args.resolution, args.resolution * 3 // 4, seed=seed0 + k))
              for k in range(args.conversations)]
    before = s.scrape()
    async with httpx.AsyncClient(timeout=600) as client:
        results = await asyncio.gather(*(conversation(client, s.routers[policy], image, args.turns, args.max_tokens)
                                         for image in images))
    after = s.scrape()

    def delta(name: str, metric: str, label: str = "") -> float:
        return counter(after[name], metric, label) - counter(before[name], metric, label)

    return Run(policy, round_, [r[0] for r in results], [t for r in results for t in r[1:]],
               encodes=delta("vision", "dvd_vision_requests_total"),
               vit_encodes=delta("vision", "dvd_vision_embedding_cache_lookups_total", 'result="miss"'),
               images=len(images),
               cache_hits=sum(delta(f"llm{i}", "dvd_llm_embedding_cache_lookups_total", 'result="hit"')
                              for i in range(2)),
               routed={k: v - routed(before[policy]).get(k, 0.0) for k, v in routed(after[policy]).items()})


def plot(runs: list[Run], path: Path) -> None:
    fig, ax = figure("Cache-affine routing vs least load")
    ax.boxplot([r.later_ttft for r in runs], tick_labels=run_labels(runs))
    ax.set_ylabel("TTFT of turns 2+ (s)")
    save(fig, path)


def report(runs: list[Run], args: argparse.Namespace, out: Path | None) -> str:
    lines = [f"# Cache-affine routing vs least load ({cpu_model()})", "",
             f"model {args.model}, {args.conversations} conversations x {args.turns} turns per run, "
             f"{args.resolution} px images, {args.max_tokens} tokens per answer, 2 language replicas, 1 vision server",
             "", "| round | policy | TTFT p50 / p90, first turns (s) | TTFT p50 / p90 / mean, later turns (s) | "
             "vision calls / ViT encodes per image | embedding-cache hits | router choices |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.round} | {r.policy} | {p(r.first_ttft, 50):.3f} / {p(r.first_ttft, 90):.3f} | "
                     f"{p(r.later_ttft, 50):.3f} / {p(r.later_ttft, 90):.3f} / "
                     f"{statistics.mean(r.later_ttft):.3f} | {r.encodes / r.images:.2f} / "
                     f"{r.vit_encodes / r.images:.2f} | "
                     f"{r.cache_hits:.0f} | {', '.join(f'{k} {v:.0f}' for k, v in sorted(r.routed.items()))} |")
    lines.append("")
    for round_, by in rounds(runs):
        ratio = p(by["affinity"].later_ttft, 50) / p(by["least-load"].later_ttft, 50)
        mean = statistics.mean(by["affinity"].later_ttft) / statistics.mean(by["least-load"].later_ttft)
        lines.append(f"round {round_}: later turns' TTFT, affinity / least-load: p50 {ratio:.2f}x, mean {mean:.2f}x")
    text = "\n".join(lines) + "\n"
    if out:
        write(out, "affinity", {"cpu": cpu_model(), "args": vars(args), "runs": [asdict(r) for r in runs]}, text,
              lambda path: plot(runs, path))
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = policy_arguments(__doc__, "small", "a preset (tiny, small), a directory or a hub repo id", "affinity",
                              max_tokens=16, resolution_help="image width (height 3/4 of it)")
    parser.add_argument("--conversations", type=int, default=8, help="concurrent conversations per run")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation")
    args, model = parsed(parser, argv)
    runs: list[Run] = []
    with stack(model, args.out / "logs" if args.out else None) as s:
        runs += [asyncio.run(run_policy(s, policy, round_, args)) for round_, policy in alternating(POLICIES,
                                                                                                     args.rounds)]
    print(report(runs, args, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
