"""grpc.health.v1 on both gRPC servers: what compose healthchecks and Kubernetes' gRPC probes ask."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import psutil
import pytest

from dvd.health import check, main
from tests.conftest import start_llm

pytestmark = pytest.mark.timeout(600)


def test_both_servers_report_serving(vision_tiny: str, llm_tiny: str) -> None:
    for address, service in ((vision_tiny, "dvd.v1.VisionService"), (llm_tiny, "dvd.v1.LanguageService")):
        assert check(address) and check(address, service)
        assert main([address]) == 0  # the healthcheck command the compose files run
        with pytest.raises(grpc.RpcError) as info:
            check(address, "no.such.Service")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert main(["127.0.0.1:1"]) == 1  # nothing listening: unhealthy, not a crash


def test_dead_engine_is_not_serving(tiny_ckpt: Path) -> None:
    """vLLM's engine dies, the language server's port stays open: the standard health check must say so."""
    svc, address = start_llm("llm-doomed-engine", tiny_ckpt, "127.0.0.1:1")
    try:
        assert check(address)
        engines = [p for p in psutil.Process(svc.proc.pid).children(recursive=True)
                   if "EngineCore" in p.name() + " ".join(p.cmdline())]
        assert engines, "no vLLM engine process found"
        for p in engines:
            p.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and check(address):
            time.sleep(0.5)
        assert not check(address)
    finally:
        svc.stop()
