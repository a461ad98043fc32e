"""Certificates and connection checks for the security tests; holds no tests itself."""

from __future__ import annotations

import secrets
import socket
import ssl
import subprocess
from pathlib import Path

import grpc
import pytest

REPO = Path(__file__).resolve().parent.parent.parent


def make_pki(folder: Path, service: str = "node", *names: str) -> dict[str, str]:
    """A service certificate from the deployment's own script (its CA made in folder/ca on first use); the
    InternalAuth environment for it."""
    subprocess.run(["bash", str(REPO / "deploy" / "make-certs.sh"), str(folder), service, *names], check=True,
                   capture_output=True, timeout=60)
    return {"DVD_TLS_CERT": str(folder / service / "node.pem"), "DVD_TLS_KEY": str(folder / service / "node.key"),
            "DVD_TLS_CA": str(folder / service / "ca.pem")}


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
