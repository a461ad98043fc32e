"""A throwaway certificate authority for the TLS tests: a CA and node certificates valid for 127.0.0.1/localhost."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_pki(folder: Path, name: str = "dvd") -> dict[str, str]:
    """Write `{name}-ca.pem`, `{name}-node.pem` and `{name}-node.key`; the InternalAuth env for them."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(f"{name} test CA")).issuer_name(_name(f"{name} test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    node_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    node = (x509.CertificateBuilder().subject_name(_name(f"{name} node")).issuer_name(ca.subject)
            .public_key(node_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    paths = {"DVD_TLS_CA": folder / f"{name}-ca.pem", "DVD_TLS_CERT": folder / f"{name}-node.pem",
             "DVD_TLS_KEY": folder / f"{name}-node.key"}
    paths["DVD_TLS_CA"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["DVD_TLS_CERT"].write_bytes(node.public_bytes(serialization.Encoding.PEM))
    paths["DVD_TLS_KEY"].write_bytes(_pem_key(node_key))
    return {k: str(v) for k, v in paths.items()}
