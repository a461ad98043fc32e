"""The generated InternVL3.5-shaped checkpoints: layout, determinism, and that stock vLLM serves them."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import openai
import pytest
from safetensors import safe_open

from dvd.checkpoint import PRESETS, SPECIAL_TOKENS, make_checkpoint
from tests.helpers.media import data_url, image_bytes


def digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def test_same_arguments_give_identical_files(tmp_path: Path) -> None:
    a = make_checkpoint("tiny", tmp_path / "a", flash=True, seed=3)
    b = make_checkpoint("tiny", tmp_path / "b", flash=True, seed=3)
    c = make_checkpoint("tiny", tmp_path / "c", flash=True, seed=4)
    assert digests(a) == digests(b)
    assert digests(a)["model.safetensors"] != digests(c)["model.safetensors"]


def test_cli_writes_a_sharded_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    subprocess.run([sys.executable, "-m", "dvd.checkpoint", "--preset", "tiny", "--out", str(out),
                    "--shard-size-mb", "0.5"], check=True, capture_output=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)


def test_layout_matches_internvl(tiny_ckpt: Path, tiny_flash_ckpt: Path) -> None:
    config = json.loads((tiny_flash_ckpt / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"] and config["model_type"] == "internvl_chat"
    assert config["auto_map"]["AutoConfig"] == "configuration_internvl_chat.InternVLChatConfig"
    assert (tiny_flash_ckpt / "configuration_internvl_chat.py").exists()
    assert config["llm_config"]["head_dim"] in (64, 128)
    assert config["llm_config"]["max_position_embeddings"] >= 16384
    assert {"flash_mode", "flash_relative_threshold", "flash_absolute_threshold"} <= set(config)
    assert config["ps_version"] == "v2" and config["downsample_ratio"] == 0.5 and config["force_image_size"] == 448
    with safe_open(tiny_flash_ckpt / "model.safetensors", "pt") as f:
        flash_keys = set(f.keys())
    with safe_open(tiny_ckpt / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        mlp1 = f.get_tensor("mlp1.1.weight")
    d = PRESETS["tiny"].vit_hidden
    assert mlp1.shape == (PRESETS["tiny"].llm_hidden, 4 * d)
    for required in ("vision_model.embeddings.class_embedding", "vision_model.encoder.layers.0.attn.qkv.weight",
                     "vision_model.encoder.layers.0.ls1", "mlp1.3.weight", "language_model.lm_head.weight",
                     "language_model.model.layers.0.self_attn.q_norm.weight"):
        assert required in keys
    extra = flash_keys - keys
    assert {k.split(".")[0] for k in extra} == {"mlp2", "pooling_before_gating", "gating"}
    for unused in ("attn3", "norm3", "attn4", "norm4"):
        assert any(f"pooling_before_gating.{unused}." in k for k in extra)
    assert {"mlp2.0.weight", "mlp2.1.weight", "mlp2.4.weight", "mlp2.7.weight", "gating.gate.1.weight"} <= extra
    tok = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())
    assert "chat_template" in tok
    vocab = json.loads((tiny_ckpt / "tokenizer.json").read_text())["added_tokens"]
    assert set(SPECIAL_TOKENS) <= {t["content"] for t in vocab}


async def test_stock_vllm_answers_an_image_question(colocated_tiny: str) -> None:
    """Stock vLLM (its own vision path) serves the plain checkpoint; greedy output is not degenerate."""
    client = openai.AsyncOpenAI(base_url=colocated_tiny, api_key="none")
    answers = []
    for seed, (w, h) in enumerate([(448, 448), (800, 600), (300, 900)]):
        content = [{"type": "image_url", "image_url": {"url": data_url(image_bytes(w, h, seed=seed))}},
                   {"type": "text", "text": f"Question {seed}: what do you see?"}]
        r = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                                 max_tokens=24, temperature=0, extra_body={"return_token_ids": True})
        answers.append(r.choices[0].token_ids)
    for tokens in answers:
        assert len(tokens) >= 8 and len(set(tokens)) > 2, "greedy decoding collapsed into one repeated token"
    assert len({tuple(a) for a in answers}) == 3, "different images and questions gave the same answer"


@pytest.mark.timeout(600)
def test_stock_vllm_loads_the_flash_variant(tiny_flash_ckpt: Path, tmp_path: Path) -> None:
    """vLLM has no home for the ViR weights; the project's plugin (installed entry point) drops them on load."""
    script = tmp_path / "flash.py"
    script.write_text(textwrap.dedent(f"""
        from PIL import Image
        from vllm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM(model={str(tiny_flash_ckpt)!r}, trust_remote_code=True, max_model_len=4096,
                      enforce_eager=True, max_num_seqs=4)
            msgs = [{{"role": "user", "content": [
                {{"type": "image_pil", "image_pil": Image.new("RGB", (900, 500), (120, 30, 200))}},
                {{"type": "text", "text": "What is in the image?"}}]}}]
            out = llm.chat(msgs, SamplingParams(max_tokens=8, temperature=0))[0]
            print("RESULT", len(out.prompt_token_ids), len(out.outputs[0].token_ids))
    """))
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=540,
                          env={**__import__("os").environ, **env})
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and result, proc.stderr[-3000:]
    prompt_len, generated = map(int, result[0].split()[1:])
    assert prompt_len > 3 * 256 and generated == 8


def test_vision8b_has_internvl35_8b_vision_shapes(tmp_path: Path) -> None:
    """The real-size preset: InternViT-300M (304M parameters), 256 tokens of hidden 4096 per tile through mlp1."""
    import math

    from dvd.checkpoint import build_config, weight_shapes
    from vision_server.config import ModelConfig

    p = PRESETS["vision8b"]
    shapes = weight_shapes(p, 4096, flash=True)
    vit = sum(math.prod(v) for k, v in shapes.items() if k.startswith("vision_model."))
    assert abs(vit - 304e6) / 304e6 < 0.01
    assert shapes["mlp1.1.weight"] == (4096, 4 * 1024) and shapes["mlp2.1.weight"] == (8192, 16 * 1024)
    (tmp_path / "config.json").write_text(json.dumps(build_config(p, 4096, True, dict.fromkeys(SPECIAL_TOKENS, 0))))
    cfg = ModelConfig.from_checkpoint(tmp_path)
    assert (cfg.vit_hidden, cfg.vit_layers, cfg.vit_heads, cfg.vit_mlp) == (1024, 24, 16, 4096)
    assert (cfg.llm_hidden, cfg.tokens_per_tile, cfg.compressed_tokens_per_tile, cfg.flash) == (4096, 256, 64, True)
