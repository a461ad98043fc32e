"""The package is complete on its own: a wheel built from the tracked files (no generated stubs in the tree)
carries the gRPC stubs, declares each node's dependencies as extras, and its services import from it alone. The
images install what the tests ran: every pin in the Dockerfiles and image requirement files is the lock's."""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_wheel_from_a_clean_tree_is_complete(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    assert not (tree / "dvd" / "v2").exists()  # generated, never tracked
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(tree)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("dvd_internvl-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = email.message_from_bytes(zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
        zf.extractall(tmp_path / "unpacked")
    assert {"dvd/v2/vision_pb2.py", "dvd/v2/llm_pb2_grpc.py", "dvd/v2/__init__.py"} <= names
    assert {"vision", "language", "router", "dev"} <= set(meta.get_all("Provides-Extra"))
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("grpcio-health-checking") for r in requires)
    assert any(r.startswith("vllm") and 'extra == "language"' in r for r in requires)
    # The unpacked wheel comes first on the path, ahead of this checkout's editable install.
    probe = "import vision_server.__main__ as v, router.app as r; print(v.__file__); print(r.__file__)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "unpacked")}
    out = subprocess.run([sys.executable, "-s", "-c", probe], capture_output=True, env=env, text=True, check=True,
                         cwd=tmp_path, timeout=300).stdout.split()
    assert all(p.startswith(str(tmp_path / "unpacked")) for p in out), out


def pins(text: str) -> dict[str, str]:
    """name -> version of every `name==version` in a requirements file or a Dockerfile, names normalised."""
    found = re.findall(r"(?<![\w.-])([A-Za-z0-9][\w.-]*)==([\w.+!-]+)", text)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in found}


def test_image_pins_equal_the_lock() -> None:
    lock = pins((REPO / "requirements" / "cpu.lock.txt").read_text())
    images = [REPO / "requirements" / "vision-gpu.txt", *sorted((REPO / "deploy").glob("Dockerfile.*"))]
    checked = 0
    for path in images:
        for name, version in pins(path.read_text()).items():
            assert lock.get(name) == version, f"{path.name}: {name}=={version}, the lock has {lock.get(name)}"
            checked += 1
    assert {"torch", "grpcio", "huggingface-hub"} <= set(pins(" ".join(p.read_text() for p in images)))
    assert checked > 20
    # The language image's vLLM is the one requirements/cuda.txt installs on GPU machines.
    vllm = pins((REPO / "requirements" / "cuda.txt").read_text())["vllm"]
    assert f"FROM vllm/vllm-openai:v{vllm}\n" in (REPO / "deploy" / "Dockerfile.language").read_text()
    # The router image installs under the lock as constraints (both stages), so every transitive pin is the lock's.
    assert (REPO / "deploy" / "Dockerfile.router").read_text().count("-c requirements/cpu.lock.txt") == 2
