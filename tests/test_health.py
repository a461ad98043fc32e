"""grpc.health.v1 on both gRPC servers: what compose healthchecks and Kubernetes' gRPC probes ask."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import psutil
import pytest

from dvd.health import check, main
from dvd.v1 import vision_pb2_grpc
from tests.conftest import start_llm, start_vision
from tests.helpers.vision import collect, encode, noise_image, request

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


def test_a_draining_server_says_not_serving_and_finishes_its_calls(tiny_ckpt: Path) -> None:
    """SIGTERM with a call in flight: health answers NOT_SERVING (not a refused connection) while the call runs to
    its end, new calls are refused UNAVAILABLE (callers retry elsewhere), then the server exits on its own."""
    svc, address = start_vision("vision-draining", tiny_ckpt)
    try:
        images = [encode(noise_image(1344, 1344, seed=i), "PNG") for i in range(16)]  # 10 tiles each
        # This client reads one message and then stops reading: HTTP/2 flow control (its window kept small) holds
        # the call open on the server for as long as the test likes.
        options = [("grpc.http2.bdp_probe", 0), ("grpc.max_send_message_length", 256 * 2**20)]
        with grpc.insecure_channel(address, options=options) as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            call = stub.Encode(request(images), timeout=120)
            first = next(call)
            os.killpg(svc.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while check(address) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not check(address)  # NOT_SERVING, answered: a refused connection would raise here
            with pytest.raises(grpc.RpcError) as refused:
                collect(stub.Encode(request(images[:1]), timeout=30))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert svc.alive()  # still draining: the first call has not been read to its end
            rest = collect(call)
        tiles = list(first.tiles) + rest.tiles  # every tile of every image, whole
        assert len(first.raw_tile_contents) == len(first.tiles)
        assert all(len(rest.payload(t)) == t.nbytes > 0 for t in rest.tiles)
        assert rest.summary is not None and {t.image_index for t in tiles} == set(range(16))
        assert all(sum(t.image_index == i for t in tiles) == t.num_tiles > 1 for i in range(16) for t in tiles
                   if t.image_index == i)
        assert svc.proc.wait(30) == 0
    finally:
        svc.stop()
