"""Two processes computing at once on one host's cores: what time-sharing costs against splitting them.

    python benchmarks/core_sharing.py                 # `small` ViT forward loops, 20 s per arrangement
    python benchmarks/core_sharing.py --seconds 5 --model tiny --out results/core_sharing

Each arrangement starts its processes, waits until every one has built its model and run a warm-up forward, then
lets them loop together for `--seconds`: tiles/s of each and of all. Arrangements (n = usable CPUs): one process with
n threads alone (the reference); two with n threads each, floating over every core (two OpenMP runtimes
time-sharing the cores); two with n/2 threads floating; two with n/2 threads pinned to disjoint halves (what the
core budget, dvd/core_budget.py, does while both stages compute). Rounds alternate. Writes core_sharing.json,
.md and .png with `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child(model: str, threads: int, cpus: str, seconds: float) -> None:
    if cpus != "all":
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    import torch

    from dvd.checkpoint import resolve_model
    from vision_server.config import ModelConfig
    from vision_server.model import build_model
    from vision_server.weights import load_vision_weights

    torch.set_num_threads(threads)
    ckpt = resolve_model(model)
    cfg = ModelConfig.from_checkpoint(ckpt)
    m = build_model(cfg, load_vision_weights(ckpt, cfg.flash), "cpu", torch.float32)
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.inference_mode():
        m.project(m.features(x), compressed=False)
        print("ready", flush=True)
        sys.stdin.readline()
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            m.project(m.features(x), compressed=False)
            n += 1
        print(json.dumps({"tiles_per_s": n / (time.perf_counter() - t0), "cpu_s": time.process_time() - c0}),
              flush=True)


def arrangement(model: str, procs: list[tuple[int, str]], seconds: float) -> list[dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "1000")}
    ps = [subprocess.Popen([sys.executable, __file__, "--child", model, str(t), c, str(seconds)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env) for t, c in procs]
    try:
        for p in ps:
            if p.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise RuntimeError("a child failed to start")
        for p in ps:
            p.stdin.write("\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        return [json.loads(p.stdout.readline()) for p in ps]  # type: ignore[union-attr]
    finally:
        for p in ps:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)

    from benchmarks.machine import cpu_model

    cpus = sorted(os.sched_getaffinity(0))
    n, half = len(cpus), max(1, len(cpus) // 2)
    low, high = ",".join(map(str, cpus[:half])), ",".join(map(str, cpus[half:] or cpus))
    arrangements = {
        f"1 process x {n} threads (alone)": [(n, "all")],
        f"2 x {n} threads, floating": [(n, "all"), (n, "all")],
        f"2 x {half} threads, floating": [(half, "all"), (half, "all")],
        f"2 x {half} threads, pinned to disjoint halves": [(half, low), (half, high)],
    }
    runs: dict[str, list[float]] = {k: [] for k in arrangements}
    for r in range(a.rounds):
        for name, procs in arrangements.items():
            res = arrangement(a.model, procs, a.seconds)
            runs[name].append(sum(x["tiles_per_s"] for x in res))
            print(f"round {r + 1}: {name:45} {runs[name][-1]:7.2f} tiles/s", file=sys.stderr, flush=True)
    where = cpu_model()
    alone = max(runs[next(iter(runs))])
    lines = [f"# Two processes on {n} CPUs: `{a.model}` ViT loops, float32 ({where})", "",
             "| arrangement | tiles/s, all processes (each round) | best / alone |", "|---|---|---|"]
    for name, xs in runs.items():
        lines.append(f"| {name} | {', '.join(f'{x:.2f}' for x in xs)} | {max(xs) / alone:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "core_sharing.json").write_text(json.dumps({"cpu": where, "model": a.model, "seconds": a.seconds,
                                                             "tiles_per_s": runs}, indent=1))
        (a.out / "core_sharing.md").write_text(md)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.barh(list(runs), [max(xs) for xs in runs.values()], color="#4c72b0")
        ax.set_xlabel("tiles/s, all processes (best round)")
        ax.set_title(where, fontsize=9)
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(a.out / "core_sharing.png", dpi=120)
        plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
