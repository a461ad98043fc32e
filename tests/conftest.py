"""Session-scoped services shared by the whole suite: every engine starts once (vLLM takes ~45 s on 2 cores)."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dvd.checkpoint import resolve_model
from dvd.core_budget import ENV as CORE_BUDGET_ENV
from dvd.core_budget import CoreBudget
from dvd.procs import (
    Service,
    cpu_engine_env,
    engine_cpus,
    free_port,
    http_ok,
    language_server,
    router,
    vision_server,
)
from dvd.security import InternalAuth
from dvd.shm_orphans import shm_entries, unused
from tests.span_collector import SpanCollector

REPO = Path(__file__).resolve().parent.parent
# The tests' vision servers compute every request: their tests send one image many times and check the ViT's work
# (batching, ViR, transports, traces). The cache of recent encodings has its own servers (test_vision_cache.py).
# The suite's vision servers compute in float32: on a CPU without native bf16 the default (vLLM's rule: the
# checkpoint's bf16, emulated) made the whole suite a third slower; tests/test_dtype.py and test_vision_model.py
# start their own at the default.
VISION_ENV = {"OMP_NUM_THREADS": "1", "DVD_VISION_EMBEDDING_CACHE_GB": "0", "DVD_VISION_DTYPE": "float32"}
_engines = itertools.count()
VLLM_START_TIMEOUT = 300
METRICS_URLS: dict[str, str] = {}
LANGUAGE_SERVICES: dict[str, Service] = {}  # address -> the language server started there by start_llm
SERVICES: dict[str, Service] = {}  # name -> the session's shared services (their output lines: Service.tail)


SHM_AT_START: set[str] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    SHM_AT_START.update(shm_entries())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The suite ends with /dev/shm as it began: every service it started (several SIGKILLed on purpose) is gone by
    now, session fixtures included, and whatever they left in shared memory must have been removed by their
    launcher (dvd.procs.Service) or the surviving side of the data plane. Entries a live process still uses belong
    to something else running on this machine (the suite's own processes are gone: test_procs checks that)."""
    left = sorted(unused(shm_entries() - SHM_AT_START))
    if left:
        sys.stderr.write(f"\nFAILED: the test suite left {len(left)} entries in /dev/shm: {', '.join(left[:10])}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def checkpoint_root() -> Path:
    root = Path(os.environ.get("DVD_CHECKPOINT_DIR", REPO / ".checkpoints"))
    os.environ["DVD_CHECKPOINT_DIR"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_ckpt(checkpoint_root: Path) -> Path:
    return resolve_model("tiny")


@pytest.fixture(scope="session")
def tiny_flash_ckpt(checkpoint_root: Path) -> Path:
    return resolve_model("tiny-flash")


def engine_env() -> dict[str, str]:
    """vLLM on CPU for one test engine: a 1 GiB KV budget (it would reserve most of the memory) and a core of its
    own, round-robin (several engines share 2 cores here; dvd.procs.engine_cpus says why they must not share one)."""
    return cpu_engine_env(engine_cpus(next(_engines)), kv_gib=1)


def start_vision(name: str, model: Path, *extra: str, env: dict[str, str] | None = None,
                 auth: InternalAuth | None = None) -> tuple[Service, str]:
    """A vision server on port 0 with the tests' defaults; `env` adds variables, `auth` is what probes it."""
    svc = vision_server(model, *extra, name=name, env={**VISION_ENV, **(env or {})})
    return svc, svc.wait_grpc(120, auth)


def start_llm(name: str, model: Path, vision: str, *extra: str, env: dict[str, str] | None = None,
              auth: InternalAuth | None = None) -> tuple[Service, str]:
    """A language server on port 0 with the tests' defaults (`extra`: its options, e.g. --served-model-name)."""
    svc = language_server(model, vision, "--max-model-len", "16384", *extra, name=name,
                          env={**engine_env(), **(env or {})})
    address = svc.wait_grpc(VLLM_START_TIMEOUT, auth)
    LANGUAGE_SERVICES[address] = svc
    return svc, address


@pytest.fixture(scope="session")
def session_core_budget() -> Iterator[Path]:
    """The core budget `vision_tiny` and `llm_tiny` share, as dvd-local's vision server and engine do on CPU."""
    path = CoreBudget.create()
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def span_collector() -> Iterator[SpanCollector]:
    """Where the session's shared stack (vision_tiny, llm_tiny, router_tiny) exports its traces."""
    collector = SpanCollector()
    yield collector
    collector.stop()


@pytest.fixture(scope="session")
def vision_tiny(tiny_ckpt: Path, session_core_budget: Path, span_collector: SpanCollector) -> Iterator[str]:
    """Address of a vision server on the tiny (non-Flash) checkpoint (metrics: `vision_tiny_metrics`)."""
    metrics_port = free_port()
    svc, address = start_vision("vision-tiny", tiny_ckpt, "--metrics-port", str(metrics_port),
                                env={CORE_BUDGET_ENV: str(session_core_budget), **span_collector.env()})
    METRICS_URLS[address] = f"http://127.0.0.1:{metrics_port}/metrics"
    SERVICES["vision-tiny"] = svc
    yield address
    svc.stop()


@pytest.fixture(scope="session")
def vision_tiny_metrics(vision_tiny: str) -> str:
    return METRICS_URLS[vision_tiny]


@pytest.fixture(scope="session")
def vision_tiny_flash(tiny_flash_ckpt: Path) -> Iterator[str]:
    """Address of a vision server on the tiny Flash checkpoint (ViR router on)."""
    svc, address = start_vision("vision-tiny-flash", tiny_flash_ckpt)
    yield address
    svc.stop()


@pytest.fixture(scope="session")
def llm_tiny(tiny_ckpt: Path, vision_tiny: str, session_core_budget: Path,
             span_collector: SpanCollector) -> Iterator[str]:
    """Address of a language server (served as `tiny`, also answering to `tiny-alias` as `vllm serve --served-model-name
    tiny tiny-alias` does) on the tiny checkpoint, fed by the tiny vision server; vLLM's spans go to the collector."""
    metrics_port = free_port()
    svc, address = start_llm("llm-tiny", tiny_ckpt, vision_tiny, "--served-model-name", "tiny", "tiny-alias",
                             "--metrics-port", str(metrics_port), "--otlp-traces-endpoint",
                             f"http://127.0.0.1:{span_collector.port}",
                             env={CORE_BUDGET_ENV: str(session_core_budget), **span_collector.env()})
    METRICS_URLS[address] = f"http://127.0.0.1:{metrics_port}/metrics"
    SERVICES["llm-tiny"] = svc
    yield address
    svc.stop()


@pytest.fixture(scope="session")
def llm_tiny_flash(tiny_flash_ckpt: Path, vision_tiny_flash: str) -> Iterator[str]:
    """DvD + ViR: a language server on the Flash checkpoint, fed by the Flash vision server; ViR bends when more
    than 2 requests wait for their first token (the tests send one at a time, except test_vir_pressure.py's burst).
    Metrics: METRICS_URLS[address]."""
    metrics_port = free_port()
    svc, address = start_llm("llm-tiny-flash", tiny_flash_ckpt, vision_tiny_flash, "--served-model-name", "tiny-flash",
                             "--vir-pressure-waiting", "2", "--metrics-port", str(metrics_port))
    METRICS_URLS[address] = f"http://127.0.0.1:{metrics_port}/metrics"
    yield address
    svc.stop()


@pytest.fixture(scope="session")
def llm_tiny_service(llm_tiny: str) -> Service:
    """The process of `llm_tiny` (with the engine processes it started)."""
    return LANGUAGE_SERVICES[llm_tiny]


@pytest.fixture(scope="session")
def llm_tiny_metrics(llm_tiny: str) -> str:
    """The Prometheus URL of `llm_tiny`."""
    return METRICS_URLS[llm_tiny]


@pytest.fixture(scope="session")
def router_tiny(llm_tiny: str, span_collector: SpanCollector) -> Iterator[str]:
    """Base URL (`http://127.0.0.1:P/v1`) of the gateway in front of `llm_tiny` (open: no API key)."""
    svc = router(llm_tiny, "--allow-private-image-urls", name="router-tiny", env=span_collector.env())
    SERVICES["router-tiny"] = svc
    yield f"{svc.wait_http()}/v1"
    svc.stop()


def start_stock_vllm(name: str, model: Path, *extra: str, wait: bool = True) -> tuple[Service, str]:
    """Stock vLLM's OpenAI server on the full checkpoint (served as `tiny`), the reference DvD must match; `extra`
    adds server options. Returns the service and its base URL (`http://127.0.0.1:P/v1`), once it is ready unless
    `wait` is false (then `wait_stock_vllm`: another engine may start meanwhile)."""
    port = free_port()
    svc = Service(name, [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                         "--trust-remote-code", "--port", str(port), "--host", "127.0.0.1", "--max-model-len", "16384",
                         "--served-model-name", "tiny", "--limit-mm-per-prompt", '{"image": 8, "video": 2}', *extra],
                  env=engine_env())
    url = f"http://127.0.0.1:{port}/v1"
    if wait:
        wait_stock_vllm(svc, url)
    return svc, url


def wait_stock_vllm(svc: Service, url: str) -> None:
    svc.wait_ready(lambda: http_ok(f"{url.removesuffix('/v1')}/health"), timeout=VLLM_START_TIMEOUT)


@pytest.fixture(scope="session")
def colocated_tiny(tiny_ckpt: Path) -> Iterator[str]:
    """Base URL of stock vLLM's OpenAI server on the full tiny checkpoint: the reference DvD must match."""
    # per-request max_dynamic_patch: the reference for image_url.detail
    svc, url = start_stock_vllm("vllm-colocated", tiny_ckpt, "--trust-request-mm-kwargs")
    yield url
    svc.stop()
