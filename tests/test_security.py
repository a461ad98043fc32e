"""Security between the nodes: the internal token is checked before any handler runs, and the TLS settings come
all or none. Mutual TLS end to end (gRPC and the data port) is checked on the compose stack (test_deploy.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dvd.security import InternalAuth
from dvd.v2 import vision_pb2, vision_pb2_grpc
from tests.conftest import start_vision
from tests.helpers.router import png_bytes
from tests.helpers.security import code_of, make_pki
from tests.helpers.vision import collect, request

TOKEN = "internal-s3cret"
PNG = png_bytes((300, 200))


def encode(auth: InternalAuth, address: str, images: list[bytes]) -> int:
    """Tiles returned by one Encode call over a channel built from `auth`."""
    with auth.channel(address) as channel:
        return len(collect(vision_pb2_grpc.VisionServiceStub(channel).Encode(request(images), timeout=60)).tiles)


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
            assert code_of(lambda s=stub: s.Metadata(vision_pb2.MetadataRequest(), timeout=5)) == \
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
