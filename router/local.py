"""`dvd-local`: the whole DvD stack on one machine (vision server, language server, router) on free ports.

`start_stack()` is the reusable part (the benchmark starts the same stack); `main()` adds the console: wait for
Ctrl-C / SIGTERM, or with `--demo` ask one image question through the official `openai` client and exit.
"""

from __future__ import annotations

import base64
import io
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from dvd.checkpoint import resolve_model
from dvd.config import ROUTER_PORT, option, parse
from dvd.core_budget import ENV as CORE_BUDGET_ENV
from dvd.core_budget import CoreBudget
from dvd.procs import LOCALHOST, Service, cpu_engine_env, language_server, router, shared_cpu_env, vision_server

ENGINE_START_TIMEOUT = 600.0  # vLLM: ~45 s for the tiny model on 2 CPU cores, minutes for real weights


@dataclass
class Stack:
    model_dir: Path
    model: str  # the served model name, what requests put in "model"
    base_url: str  # http://host:port/v1, what an OpenAI client takes
    vision_address: str
    llm_address: str
    api_key: str | None = None
    services: list[Service] = field(default_factory=list)

    def dead(self) -> list[Service]:
        return [s for s in self.services if not s.alive()]


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@contextmanager
def start_stack(model: str | Path, port: int = 8000, *, host: str = "127.0.0.1", devices: str | None = None,
                max_model_len: int = 16384, api_key: str | None = None, router_args: Sequence[str] = (),
                llm_args: Sequence[str] = (), vision_args: Sequence[str] = (), sink: IO[str] | None = None,
                log_dir: Path | None = None, timeout: float = ENGINE_START_TIMEOUT,
                cpus: Mapping[str, str] | None = None,
                service_env: Mapping[str, Mapping[str, str]] | None = None,
                core_budget: bool = True) -> Iterator[Stack]:
    """Start vision -> language -> router, each waited on until ready; stop them all (reverse order) on exit.

    `port` is the router's HTTP port (0 = any free one: the Stack's base_url says which).
    A service that dies or stays unready raises RuntimeError/TimeoutError carrying its last log lines.
    `cpus` pins a service ("vision", "llm", "router") and every process it spawns to a CPU list ("0", "1-3")
    with `taskset`, `service_env` adds environment variables per service: the benchmark uses both to split one
    machine's cores between the services explicitly instead of letting them compete. Without `cpus`, on CPU,
    `core_budget` has the engine and the vision server split the cores only while both compute
    (dvd/core_budget.py).
    """
    model_dir = resolve_model(str(model))  # generates a preset checkpoint on first use
    # Clients name the model as the user did ("tiny", "OpenGVLab/InternVL3_5-8B", "/models/x"), as with `vllm serve`.
    served_name = str(model)
    devices = devices or ("cuda" if has_cuda() else "cpu")
    services: list[Service] = []
    budget = CoreBudget.create() if core_budget and devices == "cpu" and not cpus else None
    budget_env = {CORE_BUDGET_ENV: str(budget)} if budget else {}

    def launch(start: Callable[..., Service], *args: str, name: str, env: dict[str, str] | None = None,
               **kw: Any) -> Service:
        svc = start(*args, name=name, cpus=(cpus or {}).get(name), sink=sink,
                    env={**(env or {}), **(service_env or {}).get(name, {})},
                    log_file=log_dir / f"{name}.log" if log_dir else None, **kw)
        services.append(svc)
        return svc

    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    try:
        # Port 0 everywhere: each service binds any free port and reports it (no port picked here can be taken by
        # another process before the service binds it).
        vision = launch(vision_server, str(model_dir), *vision_args, name="vision", devices=devices,
                        env={**shared_cpu_env(), **budget_env} if devices == "cpu" else None)
        vision_address = f"{LOCALHOST}:{vision.wait_port('grpc', timeout)}"
        # On CPU vLLM would otherwise reserve most of the memory; on a GPU it shares the card with the vision server.
        # On CPU the engine and the vision server share every core (each takes what the other leaves idle).
        engine_env = {**cpu_engine_env(kv_gib=2), **budget_env} if devices == "cpu" else {}
        engine_opts = [] if devices == "cpu" else ["--gpu-memory-utilization", "0.7"]
        llm = launch(language_server, str(model_dir), vision_address, "--max-model-len", str(max_model_len),
                     "--served-model-name", served_name, *engine_opts, *llm_args, name="llm", env=engine_env)
        vision.wait_grpc(timeout)
        llm_address = llm.wait_grpc(timeout)
        front = launch(router, llm_address, *(["--api-key", api_key] if api_key else []), *router_args,
                       name="router", host=host, port=port)
        probe_host = LOCALHOST if host in ("0.0.0.0", "::") else host
        base = front.wait_http(60, host=probe_host)
        yield Stack(model_dir, served_name, f"{base}/v1", vision_address, llm_address, api_key, services)
    finally:
        for svc in reversed(services):
            svc.stop()
        if budget:
            budget.unlink(missing_ok=True)


def demo_image_data_url() -> str:
    """A generated picture (sun, sky, grass, a house) as a PNG data URL: no files, no network."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (640, 480), (135, 190, 235))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 330, 640, 480), fill=(70, 160, 60))
    draw.ellipse((480, 40, 580, 140), fill=(250, 210, 40))
    draw.rectangle((180, 220, 360, 360), fill=(180, 60, 50))
    draw.polygon([(160, 220), (270, 140), (380, 220)], fill=(110, 40, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run_demo(stack: Stack) -> str:
    """One image question through the official client, exactly as a user of the API would ask it."""
    from openai import OpenAI

    client = OpenAI(base_url=stack.base_url, api_key=stack.api_key or "not-needed")
    model = stack.model
    question = "What is in this image?"
    reply = client.chat.completions.create(
        model=model, max_tokens=48, temperature=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": demo_image_data_url()}},
                                               {"type": "text", "text": question}]}])
    usage = reply.usage
    return (f"model: {model}\nquestion: {question}\nanswer: {reply.choices[0].message.content!r}\n"
            f"finish_reason: {reply.choices[0].finish_reason}; prompt tokens (visual included): "
            f"{usage.prompt_tokens if usage else '?'}; completion tokens: {usage.completion_tokens if usage else '?'}")


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass(frozen=True)
class LocalConfig:
    model: str = option("tiny", "tiny, tiny-flash, small, small-flash, a checkpoint directory or a Hugging Face "
                                "repo id (served under that name, as `vllm serve` does)")
    port: int = option(ROUTER_PORT, "the router's HTTP port (0 = any free port)")
    host: str = option("127.0.0.1", "address the router listens on")
    devices: str | None = option(None, "vision devices: cpu, cuda, cuda:0,cuda:1 (default: cuda if any)")
    max_model_len: int = option(16384, "the language engine's context length")
    api_key: str | None = option(None, "Bearer key clients must send to the router",
                                 env=("DVD_API_KEY", "VLLM_API_KEY"))
    vision_args: str = option("", "more vision server options, one string (e.g. --vision-args=\"--max-batch-tiles 8\")")
    llm_args: str = option("", "more language server and vLLM options, one string "
                               "(e.g. --llm-args=\"--reasoning-parser qwen3 --enable-auto-tool-choice\")")
    router_args: str = option("", "more router options, one string")
    log_dir: str | None = option(None, "also write each service's log to DIR/NAME.log")
    demo: bool = option(False, "ask one image question, print the answer, shut down")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(LocalConfig, argv, prog="dvd-local", description=__doc__.splitlines()[0])
    signal.signal(signal.SIGTERM, _terminate)
    try:
        with start_stack(args.model, args.port, host=args.host, devices=args.devices,
                         max_model_len=args.max_model_len, api_key=args.api_key,
                         log_dir=Path(args.log_dir) if args.log_dir else None,
                         vision_args=shlex.split(args.vision_args), llm_args=shlex.split(args.llm_args),
                         router_args=shlex.split(args.router_args)) as stack:
            if args.demo:
                print(run_demo(stack), flush=True)
                return 0
            print(f"dvd-local: serving model {stack.model!r} ({stack.model_dir}) at {stack.base_url} (Ctrl-C to stop)",
                  flush=True)
            while not stack.dead():
                time.sleep(1.0)
            for svc in stack.dead():
                print(f"dvd-local: {svc.name} exited with code {svc.proc.returncode}:\n" + svc.last_lines(20),
                      file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("dvd-local: stopped", file=sys.stderr)
        return 0
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        print(f"dvd-local: could not start the stack: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
