"""The benchmarks run end to end and write sane artefacts; no timing is asserted (shared CI cores vary too much).

The throughput harness is pointed at the session's already running engines (`--endpoint`), so it starts none.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_script(*argv: str, timeout: float = 600) -> str:
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_throughput_harness_against_running_endpoints(tmp_path: Path, colocated_tiny: str, router_tiny: str) -> None:
    out = tmp_path / "throughput"
    stdout = run_script("benchmarks/throughput.py", "--configs", "baseline,dvd", "--endpoint",
                        f"baseline={colocated_tiny}", "--endpoint", f"dvd={router_tiny}", "--resolutions", "448",
                        "--num-requests", "2", "--concurrency", "2", "--output-len", "4", "--out", str(out))
    assert "| baseline (vLLM colocated) |" in stdout and "| DvD |" in stdout

    record = json.loads((out / "results.json").read_text())
    assert record["machine"]["logical_cpus"] >= 1 and record["machine"]["cpu_model"]
    assert record["workload"]["num_requests"] == 2 and record["workload"]["output_len"] == 4
    assert "vision_cpus" in record["cpu_split"]
    assert {s["config"] for s in record["summaries"]} == {"baseline", "dvd"}
    for s in record["summaries"]:
        assert s["resolution"] == 448 and s["requests"] == 2 and s["failed"] == 0
        assert s["throughput_rps"] > 0 and s["ttft_p50_s"] > 0 and s["tpot_p50_s"] > 0
        assert s["visual_tokens_per_image"] == 256  # one 448 px tile, no thumbnail, no ViR
    for config in ("baseline", "dvd"):
        cell = record["configs"][config]["cells"][0]
        assert not record["configs"][config]["started_by_benchmark"]
        assert len(cell["results"]) == 2
        for r in cell["results"]:
            assert r["ok"] and r["completion_tokens"] == 4 and r["visual_tokens"] == 256
            assert 0 < r["ttft"] <= r["latency"] and r["token_times"]

    md = (out / "results.md").read_text()
    assert "448 px" in md and "DvD" in md and "| 0 / 2 |" in md
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transfer_benchmark_tiny(tmp_path: Path) -> None:
    out = tmp_path / "transfer.json"
    stdout = run_script("benchmarks/transfer.py", "--hidden", "64", "--tiles", "4", "--streams", "2",
                        "--out", str(out), timeout=180)
    assert "ratio gRPC / memcpy" in stdout
    result = json.loads(out.read_text())
    assert result["tiles"] == 8 and result["bytes"] == 8 * 256 * 64 * 2
    assert result["grpc_bytes_per_s"] > 0 and result["memcpy_bytes_per_s"] > 0 and result["ratio"] > 0
