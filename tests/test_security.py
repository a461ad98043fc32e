"""Security between the nodes: the internal token is checked before any handler runs, and mutual TLS works
end to end (vision -> language -> router) with certificates from deploy/make-certs.sh."""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from openai import OpenAI

from dvd.procs import Service, router
from dvd.security import InternalAuth
from dvd.v1 import llm_pb2, llm_pb2_grpc, vision_pb2, vision_pb2_grpc
from tests.conftest import start_llm, start_vision
from tests.helpers.router import data_url, png_bytes, user_message
from tests.helpers.vision import collect, encode_with, request

TOKEN = "internal-s3cret"
REPO = Path(__file__).resolve().parent.parent
PNG = png_bytes((300, 200))


def encode(auth: InternalAuth, address: str, images: list[bytes]) -> int:
    """Tiles returned by one Encode call over a channel built from `auth`."""
    with auth.channel(address) as channel:
        return len(collect(vision_pb2_grpc.VisionServiceStub(channel).Encode(request(images), timeout=60)).tiles)


def make_pki(folder: Path) -> dict[str, str]:
    """A CA and a node certificate from the deployment's own script; the InternalAuth environment for them."""
    subprocess.run(["bash", str(REPO / "deploy" / "make-certs.sh"), str(folder)], check=True, capture_output=True,
                   timeout=60)
    return {"DVD_TLS_CERT": str(folder / "node.pem"), "DVD_TLS_KEY": str(folder / "node.key"),
            "DVD_TLS_CA": str(folder / "ca.pem")}


def data_port_answers(port: int, tls: ssl.SSLContext | None) -> bool:
    """Whether the data port sends anything to a peer that introduces itself with some ticket."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            conn = tls.wrap_socket(raw) if tls else raw
            conn.sendall(secrets.token_bytes(16))
            return bool(conn.recv(1))
        except (OSError, ssl.SSLError):
            return False


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code()


@pytest.fixture(scope="module")
def vision_with_token(tiny_ckpt: Path) -> Iterator[str]:
    svc, address = start_vision("vision-token", tiny_ckpt, env={"DVD_INTERNAL_TOKEN": TOKEN},
                                auth=InternalAuth())  # standard health needs no token
    yield address
    svc.stop()


def test_token_is_checked_before_any_handler(vision_with_token: str) -> None:
    address = vision_with_token
    corrupt = [b"not an image"]  # a handler that ran would answer INVALID_ARGUMENT
    for auth in (InternalAuth(), InternalAuth(internal_token="wrong")):
        assert code_of(lambda a=auth: encode(a, address, corrupt)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda a=auth: encode(a, address, [PNG])) == grpc.StatusCode.UNAUTHENTICATED
        with auth.channel(address) as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            assert code_of(lambda s=stub: s.Health(vision_pb2.VisionHealthRequest(), timeout=5)) == \
                grpc.StatusCode.UNAUTHENTICATED
    good = InternalAuth(internal_token=TOKEN)
    assert code_of(lambda: encode(good, address, corrupt)) == grpc.StatusCode.INVALID_ARGUMENT
    assert encode(good, address, [PNG]) > 0
    from dvd.health import check

    assert check(address, auth=InternalAuth())  # probes (kubelet, compose) carry no secret


def test_tls_settings_come_all_or_none(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with pytest.raises(ValueError, match="all of"):
        InternalAuth(tls_cert=pki["DVD_TLS_CERT"], tls_key=pki["DVD_TLS_KEY"])


def test_mutual_tls_and_token_through_the_whole_stack(tiny_ckpt: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    env = {**pki, "DVD_INTERNAL_TOKEN": TOKEN}
    node = InternalAuth(internal_token=TOKEN, tls_cert=pki["DVD_TLS_CERT"], tls_key=pki["DVD_TLS_KEY"],
                        tls_ca=pki["DVD_TLS_CA"])
    services: list[Service] = []
    try:
        vision, vision_address = start_vision("vision-tls", tiny_ckpt, env=env, auth=node)
        services.append(vision)
        assert encode(node, vision_address, [PNG]) > 0
        # A client that does not present a certificate signed by the CA never gets a connection.
        stranger = make_pki(tmp_path / "stranger")
        rogue = InternalAuth(internal_token=TOKEN, tls_cert=stranger["DVD_TLS_CERT"],
                             tls_key=stranger["DVD_TLS_KEY"], tls_ca=pki["DVD_TLS_CA"])
        assert code_of(lambda: encode(rogue, vision_address, [PNG])) == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(vision_address) as plain:
            stub = vision_pb2_grpc.VisionServiceStub(plain)
            assert code_of(lambda: stub.Health(vision_pb2.VisionHealthRequest(), timeout=5)) == \
                grpc.StatusCode.UNAVAILABLE
        # The TCP data plane stays on under TLS, with the same certificates: a language node on another host (no
        # shared memory here) gets its tiles over it; a peer without a certificate the CA signed gets nothing.
        encoded = asyncio.run(encode_with(vision_address, "auto", [PNG], auth=node, shm_budget_bytes=0))
        assert set(encoded.bytes_by_transport) == {"tcp"}
        with node.channel(vision_address) as channel:
            data_port = vision_pb2_grpc.VisionServiceStub(channel).Health(vision_pb2.VisionHealthRequest(),
                                                                          timeout=5).data_port
        assert data_port and not data_port_answers(data_port, None)
        assert not data_port_answers(data_port, rogue.ssl_context(server_side=False))

        llm, llm_address = start_llm("llm-tls", tiny_ckpt, vision_address, "--served-model-name", "tiny",
                                     env=env, auth=node)
        services.append(llm)
        with InternalAuth(tls_cert=pki["DVD_TLS_CERT"], tls_key=pki["DVD_TLS_KEY"],
                          tls_ca=pki["DVD_TLS_CA"]).channel(llm_address) as channel:  # TLS, no token
            stub = llm_pb2_grpc.LanguageServiceStub(channel)
            assert code_of(lambda: stub.Health(llm_pb2.LanguageHealthRequest(), timeout=5)) == \
                grpc.StatusCode.UNAUTHENTICATED

        front = router(llm_address, "--health-interval", "0.5", name="router-tls", env=env)
        services.append(front)
        client = OpenAI(base_url=f"{front.wait_http()}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="tiny", max_tokens=4, temperature=0,
            messages=[user_message("What is this?", images=(data_url(PNG),))])
        assert reply.choices[0].message.content and reply.usage and reply.usage.prompt_tokens > 256
    finally:
        for svc in reversed(services):
            svc.stop()
