"""The benchmarks run end to end and write sane artefacts; no timing is asserted (shared CI cores vary too much).

The throughput harness is pointed at the session's already running engines (`--endpoint`), so it starts none.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import affinity, churn, vir_pressure
from benchmarks.flops import language_flops, tiles_per_image, vision_tile_flops
from benchmarks.throughput import FOLLOW_UPS, PROMPT, Cell, FlopsModel, RequestResult, chat_body, is_good, parse_goodput
from dvd.checkpoint import PRESETS, build_config
from vision_server.config import ModelConfig
from vision_server.preprocess import tile_image

REPO = Path(__file__).resolve().parent.parent


def run_script(*argv: str, timeout: float = 600) -> str:
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_throughput_harness_against_running_endpoints(tmp_path: Path, colocated_tiny: str, router_tiny: str) -> None:
    out = tmp_path / "throughput"
    stdout = run_script("benchmarks/throughput.py", "--configs", "baseline,dvd", "--endpoint",
                        f"baseline={colocated_tiny}", "--endpoint", f"dvd={router_tiny}", "--resolutions", "448",
                        "--num-requests", "2", "--concurrency", "2", "--output-len", "4", "--model", "tiny",
                        "--out", str(out))
    assert "| baseline (vLLM colocated) |" in stdout and "| DvD |" in stdout

    record = json.loads((out / "results.json").read_text())
    assert record["machine"]["logical_cpus"] >= 1 and record["machine"]["cpu_model"]
    assert record["workload"]["num_requests"] == 2 and record["workload"]["output_len"] == 4
    assert record["workload"]["kind"] == "single" and record["workload"]["turns"] == 1
    assert record["goodput_targets_ms"] == {"ttft": 2000.0, "tpot": 100.0}
    assert "vision_cpus" in record["cpu_split"]
    assert {s["config"] for s in record["summaries"]} == {"baseline", "dvd"}
    for s in record["summaries"]:
        assert s["resolution"] == 448 and s["requests"] == 2 and s["failed"] == 0
        assert s["throughput_rps"] > 0 and s["ttft_p50_s"] > 0 and s["tpot_p50_s"] > 0
        assert s["visual_tokens_per_image"] == 256  # one 448 px tile, no thumbnail, no ViR
        assert 0 <= s["goodput_share"] <= 1 and 0 <= s["goodput_rps"] <= s["throughput_rps"]
        assert s["vision_gflops_per_request"] > 0 and s["language_gflops_per_request"] > 0
    vision = {s["config"]: s["vision_gflops_per_request"] for s in record["summaries"]}
    assert vision["baseline"] == vision["dvd"]  # the same ViT, one tile
    for config in ("baseline", "dvd"):
        cell = record["configs"][config]["cells"][0]
        assert not record["configs"][config]["started_by_benchmark"]
        assert record["configs"][config]["flops"]["tiles"] == {"448": 1}
        assert len(cell["results"]) == 2
        for r in cell["results"]:
            assert r["ok"] and r["completion_tokens"] == 4 and r["visual_tokens"] == 256
            assert 0 < r["ttft"] <= r["latency"] and r["token_times"]
            assert r["turn"] == 0 and r["conversation"] == r["index"] and r["text"]

    md = (out / "results.md").read_text()
    assert "448 px" in md and "DvD" in md and "| 0 / 2 |" in md
    assert md.startswith("# Throughput, single-turn requests")
    assert "Goodput (req/s meeting TTFT<=2000 ms and TPOT<=100 ms" in md
    assert "vision / language GFLOP per request" in md and "Vision / language model FLOPs per request here" in md
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_throughput_harness_multiturn(tmp_path: Path, router_tiny: str) -> None:
    out = tmp_path / "multiturn"
    stdout = run_script("benchmarks/throughput.py", "--configs", "dvd", "--endpoint", f"dvd={router_tiny}",
                        "--resolutions", "448", "--workload", "multiturn", "--turns", "2", "--num-requests", "1",
                        "--output-len", "4", "--model", "tiny", "--out", str(out))
    assert "| DvD |" in stdout and "1 conversations x 2 turns" in stdout

    record = json.loads((out / "results.json").read_text())
    assert record["workload"]["kind"] == "multiturn" and record["workload"]["turns"] == 2
    assert record["workload"]["follow_ups"] == list(FOLLOW_UPS)
    [s] = record["summaries"]
    assert s["requests"] == 2 and s["failed"] == 0 and s["throughput_rps"] > 0
    assert "goodput_rps" in s and 0 <= s["goodput_share"] <= 1
    assert s["visual_tokens_per_image"] == 256  # from turn 0 only
    assert s["vision_gflops_per_request"] > 0 and s["language_gflops_per_request"] > 0
    results = record["configs"]["dvd"]["cells"][0]["results"]
    assert [(r["conversation"], r["turn"], r["index"]) for r in results] == [(0, 0, 0), (0, 1, 1)]
    assert all(r["ok"] and r["completion_tokens"] == 4 for r in results)
    assert results[0]["visual_tokens"] == 256 and results[1]["visual_tokens"] is None
    # Turn 1 resends turn 0's prompt and image plus the answer and a follow-up question.
    assert results[1]["prompt_tokens"] > results[0]["prompt_tokens"] + 4
    assert results[1]["start"] >= results[0]["start"] + results[0]["latency"] - 1e-6  # turns are sequential

    md = (out / "results.md").read_text()
    assert md.startswith("# Throughput, 2-turn conversations") and "| 0 / 2 |" in md


def test_transfer_benchmark_tiny(tmp_path: Path) -> None:
    """Every path runs through the real sender and pool, each on the transport it names; the report is complete."""
    stdout = run_script("benchmarks/transfer.py", "--hidden", "64", "--images", "3", "--streams", "2",
                        "--copy-mib", "64", "--out", str(tmp_path), timeout=180)
    assert "x memcpy" in stdout and "tcp+tls / grpc+tls:" in stdout
    result = json.loads((tmp_path / "transfer.json").read_text())
    assert [r["name"] for r in result["paths"]] == ["shm", "tcp", "grpc", "shm+tls", "tcp+tls", "grpc+tls"]
    for r in result["paths"]:
        assert r["transports_used"] == [r["path"]]  # under mutual TLS too: the TCP data plane stays on
        assert r["bytes"] == 3 * 13 * 256 * 64 * 2 and r["ratio"] > 0 and r["cpu_seconds_per_gib"] > 0
    assert result["memcpy_bytes_per_s"] > 0
    assert (tmp_path / "transfer.md").read_text().count("| shm |") == 1 and (tmp_path / "transfer.png").stat().st_size


def test_vision_bench_tiny_against_vllm(tmp_path: Path) -> None:
    """Every side runs in one process (the service, our loop, vLLM's InternViT on the same tiles) and the report
    carries each side's tiles/s and MFU against both references."""
    stdout = run_script("benchmarks/vision_bench.py", "--model", "tiny", "--images", "2", "--image-size", "448x448",
                        "--repeats", "1", "--rounds", "1", "--batch-sizes", "1,2", "--lone-requests", "2",
                        "--concurrency", "2", "--matmul-n", "512", "--out", str(tmp_path), timeout=300)
    assert "vs vllm :" in stdout and "of the matmul" in stdout
    r = json.loads((tmp_path / "vision_bench.json").read_text())
    assert r["dtype"] in ("float32", "bfloat16") and r["gflop_per_tile"] > 0
    for side in ("service_tiles_per_s", "plain_tiles_per_s", "vllm_tiles_per_s", "matmul_flops", "peak_flops"):
        assert r[side] > 0, side
    assert r["service_vs_vllm"] == pytest.approx(r["service_tiles_per_s"] / r["vllm_tiles_per_s"])
    assert r["vllm_batch"] in (1, 2) and r["plain_batch"] in (1, 2)
    md = (tmp_path / "vision_bench.md").read_text()
    assert "| vLLM's InternViT |" in md and "| service |" in md
    assert (tmp_path / "vision_bench.png").stat().st_size


def test_core_sharing_tiny(tmp_path: Path) -> None:
    """Every arrangement runs its processes together and reports their combined rate."""
    stdout = run_script("benchmarks/core_sharing.py", "--model", "tiny", "--seconds", "1", "--rounds", "1",
                        "--out", str(tmp_path), timeout=240)
    r = json.loads((tmp_path / "core_sharing.json").read_text())
    assert len(r["tiles_per_s"]) == 4 and all(len(v) == 1 and v[0] > 0 for v in r["tiles_per_s"].values())
    assert "pinned to disjoint halves" in stdout and (tmp_path / "core_sharing.png").stat().st_size


def test_stage_timings_against_the_running_stack(tmp_path: Path, llm_tiny: str, router_tiny: str) -> None:
    """Both passes run (gRPC to the language server, the official client through the router) and every stage of
    every resolution is reported; the stages add up to no more than the time to the first token."""
    stdout = run_script("benchmarks/stage_timings.py", "--llm", llm_tiny, "--router", router_tiny, "--sizes",
                        "448,896", "--repeats", "2", "--output-len", "4", "--out", str(tmp_path), timeout=300)
    assert "| 448 |" in stdout and "| 896 |" in stdout
    record = json.loads((tmp_path / "stage_timings.json").read_text())
    assert record["machine"]["cpu_model"] in stdout
    rows = record["rows"]
    assert [r["px"] for r in rows] == [448, 896] and [r["visual_tokens"] for r in rows] == [256, 1280]
    for r in rows:
        assert r["vision_compute"]["p50"] > 0 and r["prefill"]["p50"] > 0 and r["ttft_router"]["p50"] > 0
        work = sum(r[k]["p50"] for k in ("vision_preprocess", "vision_queue", "vision_compute", "hop"))
        assert r["hop"]["p50"] >= 0 and work <= r["ttft_grpc"]["p50"]
    assert (tmp_path / "stage_timings.md").exists() and (tmp_path / "stage_timings.png").stat().st_size


# ------------------------------------------------------------------------------------------- pure pieces, no services

def timed(ttft: float, tpot: float, tokens: int = 16, ok: bool = True) -> RequestResult:
    return RequestResult(index=0, ok=ok, start=0.0, ttft=ttft, latency=ttft + tpot * (tokens - 1),
                         completion_tokens=tokens)


def test_goodput_targets_and_classification() -> None:
    targets = parse_goodput(["ttft:2000", "tpot:100"])
    assert targets == {"ttft": 2000.0, "tpot": 100.0}
    assert is_good(timed(1.0, 0.05), targets)
    assert is_good(timed(2.0, 0.1), targets)  # on the target counts, as vLLM (metric <= target)
    assert not is_good(timed(2.5, 0.05), targets)  # TTFT missed
    assert not is_good(timed(1.0, 0.2), targets)  # TPOT missed
    assert not is_good(timed(1.0, 0.05, ok=False), targets)  # a failed request is never good
    assert not is_good(timed(1.0, 0.05), {"e2el": 1000.0})  # 1.0 + 15 x 0.05 = 1.75 s end to end
    assert is_good(timed(1.0, 0.05), {"e2el": 1750.0 + 1e-6})
    assert is_good(timed(9.0, 9.0), {})  # no target: every successful request
    for bad in ("foo:1", "ttft", "ttft:-1", "tpot:x", "e2el:inf"):
        with pytest.raises(ValueError):
            parse_goodput([bad])

    results = [timed(1.0, 0.05), timed(3.0, 0.05), timed(1.0, 0.05, ok=False), timed(0.5, 0.01)]
    s = Cell("dvd", 448, 2.0, results, 10, (0.0, 0.0, 0.0), targets).summary()
    assert s["goodput_rps"] == pytest.approx(1.0) and s["goodput_share"] == pytest.approx(0.5)
    assert s["throughput_rps"] == pytest.approx(1.5)
    assert s["vision_gflops_per_request"] is None and s["language_gflops_per_request"] is None  # no checkpoint


def test_language_flops_by_hand() -> None:
    llm = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "intermediate_size": 16, "vocab_size": 10}
    # head_dim 8 / 2 = 4: q and o 8 x 8, k and v 8 x 4, gated MLP 3 x 8 x 16.
    params = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16
    positions = 5 + 3 - 1  # 5 prompt tokens, 3 generated: the last one is never fed back
    attention = sum(4 * 8 * (i + 1) for i in range(positions))
    expected = 2 * params * positions + 2 * 8 * 10 * 3 + attention
    assert language_flops(llm, 5, 3) == expected == 9440
    assert language_flops({"llm_config": llm}, 5, 3) == expected  # InternVL's nesting
    wide = language_flops(llm | {"head_dim": 8}, 5, 3)  # q_dim 16: more projection and attention work
    assert wide == 2 * positions * (8 * 16 * 2 + 8 * 8 * 2 + 3 * 8 * 16) + 2 * 8 * 10 * 3 + 4 * 16 * 28
    assert language_flops(llm, 6, 3) > language_flops(llm, 5, 3) < language_flops(llm, 5, 4)


def write_config(root: Path, flash: bool, **overrides: int) -> ModelConfig:
    root.mkdir()
    preset = replace(PRESETS["tiny"], **overrides)
    raw = build_config(preset, 2048, flash, {"<|endoftext|>": 0, "<|im_end|>": 1})
    (root / "config.json").write_text(json.dumps(raw))
    return ModelConfig.from_checkpoint(root)


def test_vision_flops_grow_with_tiles_router_and_size(tmp_path: Path) -> None:
    plain, flash = write_config(tmp_path / "plain", False), write_config(tmp_path / "flash", True)
    deeper = write_config(tmp_path / "deeper", False, vit_layers=4)
    assert vision_tile_flops(flash, True) > vision_tile_flops(flash, False) == vision_tile_flops(plain, False)
    assert vision_tile_flops(plain, True) == vision_tile_flops(plain, False)  # no router without Flash weights
    assert vision_tile_flops(deeper, False) > vision_tile_flops(plain, False)
    # Tiles per square image: the grid preprocess picks plus the thumbnail, checked against the tiler itself.
    tiles = [tiles_per_image(plain, side, side) for side in (448, 896, 1344)]
    assert tiles == [1, 5, 10]
    for side, n in zip((448, 896, 1344), tiles, strict=True):
        tiled = tile_image(Image.new("RGB", (side, side)), image_size=plain.image_size, min_num=1,
                           max_num=plain.max_tiles, use_thumbnail=plain.use_thumbnail)
        assert tiled.pixels.shape[0] == n
    model = FlopsModel.from_checkpoint(tmp_path / "flash", (448, 896, 1344), with_vir=True)
    per_request = [model.vision_gflops(r) for r in (448, 896, 1344)]
    assert per_request == sorted(per_request)
    assert per_request[0] == pytest.approx(vision_tile_flops(flash, False) / 1e9)  # one tile: the router is skipped
    assert per_request[1] == pytest.approx(5 * vision_tile_flops(flash, True) / 1e9)
    ok = RequestResult(index=0, ok=True, start=0.0, prompt_tokens=300, completion_tokens=4)
    assert model.language_gflops([ok]) == pytest.approx(language_flops(model.llm, 300, 4) / 1e9)


def test_multiturn_request_bodies() -> None:
    image = "data:image/jpeg;base64,AAAA"
    first = chat_body("m", image, 4)
    assert first == chat_body("m", image, 4, [])  # turn 0 is the single-turn request
    assert [m["role"] for m in first["messages"]] == ["user"]
    body = chat_body("m", image, 4, ["answer one", "answer two"])
    msgs = body["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[0] == first["messages"][0]  # the image resent, in the first user message only
    with_image = [i for i, m in enumerate(msgs) if isinstance(m["content"], list)
                  and any(p["type"] == "image_url" for p in m["content"])]
    assert with_image == [0] and msgs[0]["content"][1]["image_url"]["url"] == image
    assert msgs[0]["content"][0]["text"] == PROMPT
    assert [msgs[1]["content"], msgs[3]["content"]] == ["answer one", "answer two"]
    assert [msgs[2]["content"][0]["text"], msgs[4]["content"][0]["text"]] == list(FOLLOW_UPS[:2])
    assert body["max_tokens"] == 4 and body["stream"] and body["ignore_eos"]


def test_goodput_is_the_highest_rate_that_meets_the_attainment() -> None:
    from benchmarks.rate_sweep import derive_slos, goodput

    points = [(0.5, 1.0), (1.0, 0.95), (2.0, 0.6), (4.0, 0.1)]
    assert goodput(points, 0.9) == 1.0
    assert goodput(points, 0.99) == 0.5
    assert goodput([(1.0, 0.5)], 0.9) == 0.0
    assert derive_slos({"ttft_p50_s": 0.2, "tpot_p50_s": 0.01}, 5) == pytest.approx({"ttft": 1000.0, "tpot": 50.0})


def test_rate_sweep_against_running_endpoints(tmp_path: Path, colocated_tiny: str, router_tiny: str) -> None:
    """SLOs from the baseline's unloaded latencies, rates from its unloaded capacity, the same for DvD; attainment
    per rate, goodput per configuration, JSON + markdown + PNG."""
    out = tmp_path / "sweep"
    stdout = run_script("benchmarks/rate_sweep.py", "--configs", "dvd,baseline", "--endpoint",
                        f"baseline={colocated_tiny}", "--endpoint", f"dvd={router_tiny}", "--resolutions", "448",
                        "--num-requests", "3", "--output-len", "4", "--unloaded-requests", "2", "--model", "tiny",
                        "--out", str(out))
    assert "| DvD |" in stdout and "goodput (req/s)" in stdout
    record = json.loads((out / "sweep.json").read_text())
    per = record["resolutions"]["448"]
    assert list(per["configs"]) == ["baseline", "dvd"]  # the baseline first: it sets SLOs and rates
    unloaded = per["unloaded"]
    assert per["slo_ms"]["ttft"] == pytest.approx(5 * unloaded["ttft_p50_s"] * 1e3)
    assert per["slo_ms"]["tpot"] == pytest.approx(5 * unloaded["tpot_p50_s"] * 1e3)
    assert len(per["rates"]) == 5 and per["rates"] == sorted(per["rates"]) and per["rates"][0] > 0
    for config, cells in per["configs"].items():
        assert [c["rate"] for c in cells] == per["rates"]
        for c in cells:
            assert c["requests"] == 3 and c["failed"] == 0 and 0 <= c["attainment"] <= 1
        met = [c["rate"] for c in cells if c["attainment"] >= 0.9]
        assert per["goodput"][config] == (max(met) if met else 0.0)
    assert (out / "attainment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SLOs: TTFT <=" in (out / "sweep.md").read_text()


def test_affinity_report_reads_the_services_counters(tmp_path: Path) -> None:
    """benchmarks/affinity.py's figures come from the services' own Prometheus counters and its report has the
    ratio per round (the run itself needs two engines: README, "Benchmarks")."""
    metrics = "\n".join(['# TYPE dvd_vision_requests_total counter',
                         'dvd_vision_requests_total{model_name="m",status="OK"} 7.0',
                         'dvd_vision_requests_total{model_name="m",status="CANCELLED"} 1.0',
                         'dvd_llm_embedding_cache_lookups_total{model_name="m",result="hit"} 5.0',
                         'dvd_llm_embedding_cache_lookups_total{model_name="m",result="miss"} 3.0',
                         'dvd_vision_embedding_cache_lookups_total{model_name="m",result="miss"} 2.0',
                         'dvd_router_routed_total{choice="owner"} 9.0', 'dvd_router_routed_total{choice="spill"} 2.0'])
    assert affinity.counter(metrics, "dvd_vision_requests_total") == 8.0
    assert affinity.counter(metrics, "dvd_llm_embedding_cache_lookups_total", 'result="hit"') == 5.0
    assert affinity.counter(metrics, "dvd_vision_embedding_cache_lookups_total", 'result="miss"') == 2.0
    assert affinity.routed(metrics) == {"owner": 9.0, "spill": 2.0}
    runs = [affinity.Run(policy, 1, [3.0, 4.0], later, encodes=enc, vit_encodes=2.0, images=2, cache_hits=2.0,
                         routed={"none": 6.0})
            for policy, later, enc in (("affinity", [0.5, 0.6, 0.7], 2.0), ("least-load", [0.5, 2.0, 4.0], 3.0))]
    args = argparse.Namespace(model="tiny", conversations=2, turns=4, resolution=448, max_tokens=8)
    text = affinity.report(runs, args, tmp_path)
    assert "| 1 | least-load | 3.500 / 3.900 | 2.000 / 3.600 / 2.167 | 1.50 / 1.00 |" in text
    assert "affinity / least-load: p50 0.30x, mean 0.28x" in text
    assert json.loads((tmp_path / "affinity.json").read_text())["runs"][0]["policy"] == "affinity"
    assert (tmp_path / "affinity.png").stat().st_size > 0


def test_vir_pressure_report_has_goodput_beside_rate_and_the_restoration(tmp_path: Path) -> None:
    """benchmarks/vir_pressure.py's figures: goodput counts only requests within the TTFT SLO, and the ratio is
    taken per round (the run itself needs two engines: README, "Benchmarks")."""
    fixed = vir_pressure.Run("fixed", 1, 3.0, 10.0, 2.0, [1.0, 1.5, 3.0, 9.0], [900] * 4, {"200": 4, "429": 6}, 0.0)
    bent = vir_pressure.Run("pressure", 1, 3.0, 10.0, 2.0, [1.0, 1.2, 1.9, 1.4, 2.5], [700] * 5, {"200": 5}, 1.0,
                            restored_s=3.5, restored_tokens=True)
    assert (fixed.goodput_rps, fixed.completed_rps, bent.goodput_rps) == (0.2, 0.4, 0.4)
    args = argparse.Namespace(model="tiny-flash", dtype="float32", resolution=896, max_tokens=8, waiting=2,
                              slo_factor=2.0, concurrency=4, queue=0, overload=3.0, seconds=10.0)
    calibration = {"slo_s": 2.0, "capacity_rps": 1.0, "unloaded_p50": 0.8, "unloaded_p90": 1.0}
    text = vir_pressure.report([fixed, bent], calibration, args, tmp_path)
    assert "| 1 | pressure | 3.000 | 0.500 | 0.400 |" in text
    assert "round 1: pressure / fixed: goodput 2.00x, completed req/s 1.25x; level back to 0 after 3.5 s" in text
    assert json.loads((tmp_path / "vir_pressure.json").read_text())["runs"][1]["goodput_rps"] == 0.4
    assert (tmp_path / "vir_pressure.png").stat().st_size > 0


def test_churn_reads_each_requests_replica_and_counts_only_membership_moves(tmp_path: Path) -> None:
    """churn.py: which replica served a request comes from the language servers' own "request done" lines (a
    restarted replica's second log included); a conversation moves when its replica differs from the wave before,
    and the report tells the leaving replica's share from the others' and from the quiet waves' spills."""
    line = ('{{"time": "t", "level": "INFO", "logger": "llm_server.service", "message": "request done", '
            '"request_id": "{}", "images": 1}}\n')
    (tmp_path / "llm0.log").write_text("[llm0] " + line.format("a") + "not json {\n" + line.format("b"))
    (tmp_path / "llm1.log").write_text(line.format("c"))
    (tmp_path / "llm1-1.log").write_text(line.format("d") + '{"message": "refused", "request_id": "e"}\n')
    by_id = churn.served_by({"llm0": [tmp_path / "llm0.log"], "llm1": [tmp_path / "llm1.log", tmp_path / "llm1-1.log"]})
    assert by_id == {"a": "llm0", "b": "llm0", "c": "llm1", "d": "llm1"}
    replicas = [["llm0", "llm2", "llm2"], ["llm1", "llm2", "llm2"], ["llm1", "llm2", "llm0"],
                ["llm1", "llm0", "llm0"], ["llm1", "llm2", "llm0"], ["llm0", "llm2", "llm0"]]
    events = ["", "", "leave", "", "join", ""]
    waves = [churn.Wave(k, e, 3, [], r) for k, (e, r) in enumerate(zip(events, replicas, strict=True))]
    churn.count_moves(waves, "llm2")
    assert [(w.moved, w.moved_share) for w in waves[1:]] == [(1, 0), (1, 1), (1, 1), (1, 1), (1, 0)]
    args = argparse.Namespace(model="tiny", conversations=3, turns=6, replicas=3, leave_after=0.5, leave_at=2,
                              join_at=4, affinity_balance=0.25)
    text = churn.report(waves, args)
    assert "Requests lost: 0 of 18" in text
    assert "(waves 2, 3, 4): 3 conversations moved off or onto llm2, 0 others moved" in text
    assert "no change (1, 5): 2 moved" in text
