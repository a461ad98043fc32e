"""Builds the gRPC stubs (dvd/v2) from protos/ into the package, so `pip install .[vision]` (or any wheel) is
complete without a separate step. Everything else about the package is in pyproject.toml."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def build_stubs() -> None:
    protos = sorted((ROOT / "protos" / "dvd" / "v2").glob("*.proto"))
    if not protos:  # building from an sdist: the stubs are already in dvd/v2
        return
    from grpc_tools import protoc

    out = ROOT / "dvd" / "v2"
    out.mkdir(exist_ok=True)
    args = ["protoc", f"-I{ROOT / 'protos'}", f"--python_out={ROOT}", f"--grpc_python_out={ROOT}",
            f"--pyi_out={ROOT}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on protos/dvd/v2")
    (out / "__init__.py").touch()


build_stubs()
setup()
