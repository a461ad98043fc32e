"""grpc.health.v1 on both gRPC servers: what compose healthchecks and Kubernetes' gRPC probes ask."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import grpc
import openai
import psutil
import pytest

from dvd.health import check, main
from dvd.procs import router
from dvd.v2 import vision_pb2_grpc
from tests.conftest import start_llm, start_vision
from tests.helpers.media import data_url, image_bytes
from tests.helpers.vision import collect, encode, noise_image, request

pytestmark = pytest.mark.timeout(600)


def test_both_servers_report_serving(vision_tiny: str, llm_tiny: str) -> None:
    for address, service in ((vision_tiny, "dvd.v2.VisionService"), (llm_tiny, "dvd.v2.LanguageService")):
        assert check(address) and check(address, service)
        assert main([address]) == 0  # the healthcheck command the compose files run
        with pytest.raises(grpc.RpcError) as info:
            check(address, "no.such.Service")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert main(["127.0.0.1:1"]) == 1  # nothing listening: unhealthy, not a crash


def test_dead_engine_is_not_serving(tiny_ckpt: Path) -> None:
    """vLLM's engine dies, the language server's port stays open: the standard health check must say so.

    Around it, a client behind the router gets 503s in OpenAI's error shape that name no internal host or port:
    with the vision pool dead from the start (its only server is 127.0.0.1:1), then the engine, then the whole
    language server."""
    svc, address = start_llm("llm-doomed-engine", tiny_ckpt, "127.0.0.1:1")
    front = router(address, name="router-doomed")
    inside = ("127.0.0.1", "localhost", address.rsplit(":", 1)[1])
    client = openai.OpenAI(base_url=f"{front.wait_http()}/v1", api_key="none", max_retries=0)

    def refused(content: str | list[dict[str, object]]) -> None:
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model=str(tiny_ckpt), max_tokens=2,
                                           messages=[{"role": "user", "content": content}])  # type: ignore[misc]
        body = json.dumps(err.value.body)
        assert err.value.status_code == 503 and err.value.response.headers.get("retry-after"), body
        assert not any(word in body for word in inside), body
        assert set(err.value.body) >= {"message", "type", "code"}  # type: ignore[arg-type]

    try:
        assert check(address)
        refused([{"type": "image_url", "image_url": {"url": data_url(image_bytes(64, 64))}},
                 {"type": "text", "text": "what is this?"}])
        engines = [p for p in psutil.Process(svc.proc.pid).children(recursive=True)
                   if "EngineCore" in p.name() + " ".join(p.cmdline())]
        assert engines, "no vLLM engine process found"
        for p in engines:
            p.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and check(address):
            time.sleep(0.5)
        assert not check(address)
        refused("hello")
        svc.stop()
        refused("hello")
    finally:
        svc.stop()
        front.stop()


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
