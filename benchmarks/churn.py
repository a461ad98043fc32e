"""A language replica that leaves and joins mid-run under cache-affine routing: no request lost, and only the
leaving (joining) replica's share of the conversations moves.

    python benchmarks/churn.py --out results/churn        # tiny preset, 12 conversations x 6 turns, 3 replicas

One vision server, `--replicas` language servers on fixed ports and one router (`--routing affinity`) in front of
them. The conversations run in waves: every conversation's turn k together, each resending its history and image as
chat clients do. While wave `--leave-at` is in flight the last replica is stopped as Kubernetes stops a pod
(SIGTERM: it finishes what it holds and refuses new work; the router sends the rest elsewhere); before wave
`--join-at` it starts again on the same address. Each request's replica is read from the language servers' own
log lines ("request done", by the completion's id). Reported per wave: requests served and failed (one lost fails
the run), the conversations that changed replica since the wave before, and of those, how many had been on the
leaving replica (at the leave) or go to it (at the join): everything else stays where its cache is. Writes JSON +
markdown + a PNG with --out.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from benchmarks.machine import cpu_model
from benchmarks.media import data_url, image_bytes
from benchmarks.services import arguments, figure, save, services, write
from benchmarks.throughput import RequestResult, chat_body, send
from dvd.backend_pool import AFFINITY_BALANCE
from dvd.checkpoint import resolve_model
from dvd.logs import setup_logging
from dvd.procs import Service, cpu_engine_env, engine_cpus, free_port, language_server, router, vision_server

log = logging.getLogger("benchmarks.churn")


@dataclass
class Wave:
    turn: int
    event: str  # "", "leave" (the replica is stopped while this wave runs), "join" (it is back before it)
    served: int
    failed: list[str]  # errors of the requests that failed
    replicas: list[str]  # per conversation, the replica that served its turn ("?" when no log line says)
    moved: int = 0  # conversations whose replica differs from the wave before
    moved_share: int = 0  # of those, the ones the leaving / joining replica accounts for


def served_by(log_files: dict[str, list[Path]]) -> dict[str, str]:
    """Completion id -> replica name, from the language servers' "request done" lines."""
    out: dict[str, str] = {}
    for name, paths in log_files.items():
        for path in paths:
            for line in path.read_text(errors="replace").splitlines():
                start = line.find("{")
                if start < 0 or '"request done"' not in line:
                    continue
                try:
                    record = json.loads(line[start:])
                except json.JSONDecodeError:
                    continue
                out[record.get("request_id", "")] = name
    return out


def count_moves(waves: list[Wave], leaving: str) -> None:
    """Moves between consecutive waves, and how many of them the leaving (joining) replica accounts for."""
    for before, now in itertools.pairwise(waves):
        moved = [k for k, (a, b) in enumerate(zip(before.replicas, now.replicas, strict=True)) if a != b]
        now.moved = len(moved)
        now.moved_share = sum(before.replicas[k] == leaving or now.replicas[k] == leaving for k in moved)


async def run(args: argparse.Namespace, log_dir: Path) -> list[Wave]:
    model = resolve_model(args.model)
    leaving = f"llm{args.replicas - 1}"
    with services(log_dir) as up:
        vision = up.started(vision_server(model, **up.logs("vision")))
        vision_address = vision.wait_grpc(300)
        ports = [free_port() for _ in range(args.replicas)]
        logs: dict[str, list[Path]] = {f"llm{i}": [] for i in range(args.replicas)}
        services_by_name: dict[str, Service] = {}  # the replica's current process

        def replica(i: int, run_no: int) -> None:
            name = f"llm{i}" + (f"-{run_no}" if run_no else "")
            extra = up.logs(name)
            logs[f"llm{i}"].append(extra["log_file"])
            svc = up.started(language_server(model, vision_address, "--max-model-len", "16384",
                                             "--served-model-name", "model", port=ports[i], name=name,
                                             env=cpu_engine_env(engine_cpus(i), kv_gib=1), **extra))
            services_by_name[f"llm{i}"] = svc

        for i in range(args.replicas):
            replica(i, 0)
        for svc in services_by_name.values():
            svc.wait_grpc(900)
        gateway = up.started(router(",".join(f"127.0.0.1:{p}" for p in ports), "--routing", "affinity",
                                    "--affinity-balance", str(args.affinity_balance), **up.logs("router")))
        base_url = gateway.wait_http() + "/v1"
        images = [data_url(image_bytes(args.resolution, args.resolution * 3 // 4, seed=5000 + k))
                  for k in range(args.conversations)]
        answers: list[list[str]] = [[] for _ in images]
        results: list[list[RequestResult]] = []
        events: list[str] = []
        async with httpx.AsyncClient(timeout=600) as client:
            for turn in range(args.turns):
                event = "leave" if turn == args.leave_at else "join" if turn == args.join_at else ""
                if event == "join":
                    replica(args.replicas - 1, 1)
                    services_by_name[leaving].wait_grpc(900)
                    await asyncio.sleep(args.health_wait)  # the router's next health probe finds it ready
                wave = asyncio.gather(*(send(client, base_url, chat_body("model", image, args.max_tokens, answers[k]),
                                             k, 0.0, None) for k, image in enumerate(images)))
                stopped = None
                if event == "leave":  # while the wave is in flight, as a rollout or a scale-down stops a pod: SIGTERM
                    await asyncio.sleep(args.leave_after)  # to the main process only, as a container runtime sends it
                    proc = services_by_name[leaving].proc
                    proc.send_signal(signal.SIGTERM)
                    stopped = asyncio.create_task(asyncio.to_thread(proc.wait, 300))
                wave_results = await wave
                if stopped is not None:
                    log.info("replica stopped", extra={"replica": leaving, "exit": await stopped})
                for k, res in enumerate(wave_results):
                    if res.ok:
                        answers[k].append(res.text)
                results.append(wave_results)
                events.append(event)
                log.info("wave done", extra={"turn": turn, "event": event,
                                             "failed": sum(not r.ok for r in wave_results)})
        by_id = served_by(logs)
    waves = [Wave(turn, event, sum(r.ok for r in rs), [r.error or "" for r in rs if not r.ok],
                  [by_id.get(r.id, "?") for r in rs])
             for turn, (event, rs) in enumerate(zip(events, results, strict=True))]
    count_moves(waves, leaving)
    return waves


def report(waves: list[Wave], args: argparse.Namespace) -> str:
    leaving = f"llm{args.replicas - 1}"
    lines = [f"# A replica leaving and joining under cache-affine routing ({cpu_model()})", "",
             f"`{args.model}`, {args.conversations} conversations x {args.turns} turns in waves, {args.replicas} "
             f"language replicas behind one router (`--routing affinity`); {leaving} stopped (SIGTERM) "
             f"{args.leave_after:g} s into wave {args.leave_at}, started again before wave {args.join_at}.", "",
             "| wave | event | served | failed | conversations per replica | moved since the wave before | "
             f"of those, {leaving}'s share |", "|---|---|---|---|---|---|---|"]
    for w in waves:
        counts = {name: w.replicas.count(name) for name in sorted(set(w.replicas))}
        lines.append(f"| {w.turn} | {w.event or '-'} | {w.served} | {len(w.failed)} | "
                     f"{', '.join(f'{n} {c}' for n, c in counts.items())} | {w.moved if w.turn else '-'} | "
                     f"{w.moved_share if w.turn else '-'} |")
    lost = sum(len(w.failed) for w in waves)
    # The wave it leaves in (its requests not yet routed go elsewhere), the first without it, the first with it again.
    membership = {args.leave_at, args.leave_at + 1, args.join_at}
    at_events = [w for w in waves if w.turn in membership]
    quiet = [w for w in waves[1:] if w.turn not in membership]
    lines += ["", f"Requests lost: {lost} of {args.conversations * args.turns}. At the membership changes (waves "
              f"{', '.join(str(w.turn) for w in at_events)}): {sum(w.moved_share for w in at_events)} conversations "
              f"moved off or onto {leaving}, {sum(w.moved - w.moved_share for w in at_events)} others moved. "
              f"Between waves with no change ({', '.join(str(w.turn) for w in quiet)}): "
              f"{sum(w.moved for w in quiet)} moved (the load bound spilling a wave's burst: "
              f"`--affinity-balance {args.affinity_balance:g}`)."]
    return "\n".join(lines) + "\n"


def plot(waves: list[Wave], path: Path) -> None:
    fig, ax = figure()
    names = sorted({n for w in waves for n in w.replicas})
    bottom = [0] * len(waves)
    for name in names:
        counts = [w.replicas.count(name) for w in waves]
        ax.bar([w.turn for w in waves], counts, bottom=bottom, label=name)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    for w in waves:
        if w.event:
            ax.annotate(w.event, (w.turn, bottom[w.turn]), ha="center", va="bottom")
    ax.set_xlabel("wave (turn)")
    ax.set_ylabel("conversations served")
    ax.legend()
    save(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = arguments(__doc__ or "", "tiny", "checkpoint directory or preset")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--conversations", type=int, default=12)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--leave-at", type=int, default=2, help="the wave during which the last replica is stopped")
    p.add_argument("--leave-after", type=float, default=0.5, help="seconds into that wave")
    p.add_argument("--join-at", type=int, default=4, help="the wave before which it starts again")
    p.add_argument("--health-wait", type=float, default=4.0, help="seconds for the router to see it ready")
    p.add_argument("--affinity-balance", type=float, default=AFFINITY_BALANCE,
                   help="the router's load bound: a wave's burst spills conversations past it (moves of their own)")
    p.add_argument("--resolution", type=int, default=896)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--out", type=Path, help="write churn.json, .md and .png here (the replicas' logs are needed to "
                                            "tell which one served each request: without --out they go to a "
                                            "temporary folder)")
    args = p.parse_args(argv)
    setup_logging()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        log_dir = (args.out / "logs") if args.out else Path(tmp)
        waves = asyncio.run(run(args, log_dir))
    text = report(waves, args)
    print(text)
    if args.out:
        write(args.out, "churn", {"args": vars(args) | {"out": str(args.out)}, "cpu": cpu_model(),
                                  "waves": [asdict(w) for w in waves]}, text, lambda path: plot(waves, path))
    return 0 if not any(w.failed for w in waves) else 1


if __name__ == "__main__":
    sys.exit(main())
