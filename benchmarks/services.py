"""What the two-policy benchmarks (affinity.py, vir_pressure.py) share: the services they start, stopped together
with their output in log files, and the parts of their command line and figures that are the same."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from benchmarks.machine import cpu_model
from dvd.checkpoint import resolve_model
from dvd.logs import setup_logging
from dvd.procs import Service

log = logging.getLogger("benchmarks")


class Services:
    """Started services, stopped when the `services()` block ends; each one's output in `<log_dir>/<name>.log`
    (with --out), never on the terminal."""

    def __init__(self, stop: ExitStack, log_dir: Path | None, quiet: Any) -> None:
        self._stop = stop
        self._log_dir = log_dir
        self._quiet = quiet

    def logs(self, name: str) -> dict[str, Any]:
        return {"log_file": self._log_dir / f"{name}.log", "sink": self._quiet} if self._log_dir else \
            {"sink": self._quiet}

    def started(self, svc: Service) -> Service:
        self._stop.callback(svc.stop)
        return svc


@contextmanager
def services(log_dir: Path | None) -> Iterator[Services]:
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    with open(os.devnull, "w") as quiet, ExitStack() as stop:  # services stop before their sink closes
        yield Services(stop, log_dir, quiet)


def arguments(doc: str, model: str, model_help: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first line, defaults shown, and `--model`."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=model, help=model_help)
    return parser


def policy_arguments(doc: str, model: str, model_help: str, name: str, *, max_tokens: int,
                     resolution_help: str) -> argparse.ArgumentParser:
    """A benchmark that runs two policies in alternating rounds: its options beyond those of its own."""
    parser = arguments(doc, model, model_help)
    parser.add_argument("--resolution", type=int, default=896, help=resolution_help)
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens per answer")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both policies, order alternating")
    parser.add_argument("--out", type=Path, help=f"write {name}.json, {name}.md, {name}.png here")
    return parser


def parsed(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, Path]:
    """A policy benchmark's options, its progress lines set up, and its model (built or downloaded)."""
    args = parser.parse_args(argv)
    setup_logging(fmt="text")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return args, resolve_model(args.model)


def alternating(policies: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, policy) for `rounds` rounds of every policy, the order reversed each round (ABBA): whatever drifts
    over a run (caches, the host's other load) weighs on each policy alike."""
    for round_ in range(1, rounds + 1):
        for policy in policies if round_ % 2 else policies[::-1]:
            log.info("run", extra={"policy": policy, "round": round_})
            yield round_, policy


def rounds(runs: Sequence[Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each round of `alternating` and its runs by policy, for the ratios a report prints."""
    for round_ in sorted({r.round for r in runs}):
        yield round_, {r.policy: r for r in runs if r.round == round_}


def run_labels(runs: Sequence[Any]) -> list[str]:
    """A figure's label for each run of `alternating`."""
    return [f"{r.policy}\nround {r.round}" for r in runs]


def figure(title: str | None = None) -> tuple[Any, Any]:
    """A matplotlib figure and its axes, drawn without a display; `title` is given the CPU model, as every figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    if title is not None:
        ax.set_title(f"{title}\n{cpu_model()}", fontsize=9)
    return fig, ax


def save(fig: Any, path: Path) -> None:
    """Write a matplotlib figure and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: Path, name: str, record: dict[str, Any], text: str, draw: Callable[[Path], None]) -> None:
    """A benchmark's results: `name`.json (the record), .md (the report) and .png (`draw`) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    (out / f"{name}.md").write_text(text)
    draw(out / f"{name}.png")
