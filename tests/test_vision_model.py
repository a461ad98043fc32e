"""The vision model against vLLM's own InternVL vision path, the Flash router, and the weights loader.

vLLM's reference runs in a subprocess (this file, run as a script): it needs vLLM's distributed state (world size
1, gloo) and a VllmConfig context, process-global state that must not leak into the test session.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def vllm_reference(image_path: str, jobs: list[tuple[str, str]]) -> None:
    """vLLM end to end for each (checkpoint, output) pair: media loader -> InternVLImageProcessor ->
    InternVisionModel -> pixel_shuffle -> mlp1, in float32 and bfloat16."""
    from transformers import AutoConfig
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.transformers_utils.processors.internvl import InternVLImageProcessor

    from benchmarks.vllm_vision import vllm_extract_feature

    for ckpt, out_path in jobs:
        cfg = AutoConfig.from_pretrained(ckpt, trust_remote_code=True)
        image = ImageMediaIO().load_bytes(Path(image_path).read_bytes()).media
        proc = InternVLImageProcessor(image_size=cfg.force_image_size, min_dynamic_patch=cfg.min_dynamic_patch,
                                      max_dynamic_patch=cfg.max_dynamic_patch,
                                      dynamic_image_size=cfg.dynamic_image_size, use_thumbnail=cfg.use_thumbnail)
        pixels = proc(image)["pixel_values_flat"]
        out: dict[str, torch.Tensor] = {"pixels": pixels}
        for dtype in (torch.float32, torch.bfloat16):
            out[str(dtype)] = vllm_extract_feature(Path(ckpt), dtype)(pixels)
        torch.save(out, out_path)


def make_vit6b_style(tiny: Path, out: Path) -> Path:
    """The tiny checkpoint rewired the InternViT-6B way: RMSNorm, qk-normalisation, no qkv bias, and also
    select_layer=-2 and pixel-shuffle v1, so every config switch of the model meets vLLM's implementation."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():
        if f.suffix in (".json", ".py") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    config = json.loads((tiny / "config.json").read_text())
    config["vision_config"].update(norm_type="rms_norm", qk_normalization=True, qkv_bias=False)
    config.update(select_layer=-2, ps_version="v1")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(6)
    tensors = {}
    for k, v in load_file(str(tiny / "model.safetensors")).items():
        if k.startswith("language_model.") or k.endswith(("norm1.bias", "norm2.bias", "qkv.bias")):
            continue
        tensors[k] = v
        if k.endswith("attn.proj.weight"):
            d = v.shape[0]
            for norm in ("q_norm", "k_norm"):
                w = 1 + 0.2 * torch.randn(d, generator=gen)
                tensors[k.replace("proj.weight", f"{norm}.weight")] = w.to(torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def vllm_refs(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """One subprocess (vLLM's import is the slow part) computes the references for both checkpoints."""
    from tests.helpers.vision import encode, noise_image

    tmp = tmp_path_factory.mktemp("vllm_ref")
    ckpts = {"tiny": tiny_ckpt, "vit6b-style": make_vit6b_style(tiny_ckpt, tmp / "vit6b-style")}
    data = encode(noise_image(900, 600), "JPEG", quality=92)  # 3x2 grid + thumbnail
    (tmp / "image.jpg").write_bytes(data)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    jobs = [f"{ckpt}={tmp / name}.pt" for name, ckpt in ckpts.items()]
    proc = subprocess.run([sys.executable, __file__, str(tmp / "image.jpg"), *jobs], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: {"bytes": data, "ckpt": ckpt, **torch.load(tmp / f"{name}.pt")} for name, ckpt in ckpts.items()}


def _model(ckpt: Path, dtype: torch.dtype) -> object:
    from vision_server.config import ModelConfig
    from vision_server.model import build_model
    from vision_server.weights import load_vision_weights

    cfg = ModelConfig.from_checkpoint(ckpt)
    return build_model(cfg, load_vision_weights(ckpt, cfg.flash), "cpu", dtype)


@pytest.mark.parametrize("variant", ["tiny", "vit6b-style"])
def test_embeddings_equal_vllm_float32(vllm_refs: dict, variant: str) -> None:
    vllm_ref = vllm_refs[variant]
    ref = vllm_ref[str(torch.float32)]
    ours = _model(vllm_ref["ckpt"], torch.float32)(vllm_ref["pixels"]).emb256
    assert ours.shape == ref.shape == (7, 256, 128)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("variant", ["tiny", "vit6b-style"])
def test_embeddings_equal_vllm_bfloat16(vllm_refs: dict, variant: str) -> None:
    """Both in bf16 end to end: equal up to bf16 rounding noise accumulated over the layers."""
    vllm_ref = vllm_refs[variant]
    ref = vllm_ref[str(torch.bfloat16)].float()
    ours = _model(vllm_ref["ckpt"], torch.bfloat16)(vllm_ref["pixels"]).emb256.float()
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 1e-2, rel


def test_service_bytes_match_vllm(vision_tiny: str, vllm_refs: dict) -> None:
    """Image bytes through the running service at --dtype float32 (the suite's) vs vLLM's fp32 path rounded to bf16:
    at most one bf16 step apart."""
    from tests.helpers.vision import encode_sync, request

    vllm_ref = vllm_refs["tiny"]
    got = encode_sync(vision_tiny, request([vllm_ref["bytes"]]))
    ref = vllm_ref[str(torch.float32)]
    assert len(got.tiles) == ref.shape[0]
    ours = torch.stack([got.tensor(t) for t in got.tiles]).float()
    ref_bf16 = ref.to(torch.bfloat16).float()
    # One bf16 step, plus fp32 noise for values that cancel to near zero.
    tol = ref_bf16.abs() * 2**-7 + 1e-5 * ref.abs().max()
    assert ((ours - ref_bf16).abs() <= tol).all()
    assert (ours == ref_bf16).float().mean() > 0.99


def test_the_default_dtype_is_closer_to_vllms_own_vit(tiny_ckpt: Path, vllm_refs: dict) -> None:
    """A service at its default dtype (vLLM's `--dtype auto`: the checkpoint's bf16) against vLLM's own ViT at its
    default: closer to it than a float32 ViT rounded to bf16, which is what the rule is for (dvd/dtype.py; the bf16
    ViTs still differ by batching and op order)."""
    from tests.conftest import start_vision
    from tests.helpers.vision import encode_sync, request

    svc, address = start_vision("vision-default-dtype", tiny_ckpt, env={"DVD_VISION_DTYPE": ""})
    try:
        vllm_ref = vllm_refs["tiny"]
        got = encode_sync(address, request([vllm_ref["bytes"]]))
    finally:
        svc.stop()
    ref = vllm_ref[str(torch.bfloat16)].float()
    assert len(got.tiles) == ref.shape[0]
    ours = torch.stack([got.tensor(t) for t in got.tiles]).float()
    float32_path = vllm_ref[str(torch.float32)].to(torch.bfloat16).float()

    def rel(x: torch.Tensor) -> float:
        return float((x - ref).norm() / ref.norm())

    print(f"relative distance to vLLM's bf16 ViT: service {rel(ours):.2e}, a float32 ViT {rel(float32_path):.2e}")
    assert rel(ours) < 0.5 * rel(float32_path)


def _official_router(tensors: dict[str, torch.Tensor], tokens: torch.Tensor, heads: int = 16) -> torch.Tensor:
    """The official CrossAttentionPooling + Gating, written out with functional ops (attn2/norm2 three times)."""
    import torch.nn.functional as F

    def w(name: str) -> torch.Tensor:
        return tensors[name].float()

    def attn(k: int, q: torch.Tensor) -> torch.Tensor:
        pre = f"pooling_before_gating.attn{k}."
        out, _ = F.multi_head_attention_forward(
            q.transpose(0, 1), tokens.transpose(0, 1), tokens.transpose(0, 1), q.shape[-1], heads,
            w(pre + "in_proj_weight"), w(pre + "in_proj_bias"), None, None, False, 0.0, w(pre + "out_proj.weight"),
            w(pre + "out_proj.bias"), training=False, need_weights=False,
            key_padding_mask=torch.zeros(tokens.shape[:2], dtype=torch.bool))
        return out.transpose(0, 1)

    def ln(name: str, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], w(name + ".weight"), w(name + ".bias"))

    x = w("pooling_before_gating.query_token").unsqueeze(0).expand(tokens.shape[0], -1, -1)
    x = ln("pooling_before_gating.norm1", attn(1, x))
    for _ in range(3):
        x = ln("pooling_before_gating.norm2", attn(2, x))
    x = x.squeeze(1)
    for b in range(1, 5):
        pre = f"gating.block{b}."
        h = F.linear(F.gelu(F.linear(x, w(pre + "0.weight"), w(pre + "0.bias"))), w(pre + "3.weight"),
                     w(pre + "3.bias"))
        x = x + ln(pre + "5", h)
    logits = F.linear(ln("gating.gate.0", x), w("gating.gate.1.weight"), w("gating.gate.1.bias"))
    return torch.softmax(logits, -1)[:, 0]


def test_router_matches_official_formulation(tiny_flash_ckpt: Path) -> None:
    from vision_server.weights import load_vision_weights

    model = _model(tiny_flash_ckpt, torch.float32)
    pixels = torch.randn(3, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        grid = model.features(pixels)
        ours = model(pixels, with_vir=True)
    tensors = load_vision_weights(tiny_flash_ckpt, flash=True)
    ref = _official_router(tensors, grid.reshape(3, -1, grid.shape[-1]))
    torch.testing.assert_close(ours.p_compress, ref, rtol=1e-5, atol=1e-6)
    assert ours.emb64 is not None and ours.emb64.shape == (3, 64, 128)


def test_loader_reads_only_vision_tensors_from_shards(tiny_flash_ckpt: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from dvd.checkpoint import make_checkpoint
    from vision_server import weights

    sharded = make_checkpoint("tiny", tmp_path / "sharded", flash=True, shard_size_mb=0.5)
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 3
    opened: list[str] = []
    real_open = weights.safe_open

    def spy(path: str, **kw: object) -> object:
        opened.append(Path(path).name)
        return real_open(path, **kw)

    monkeypatch.setattr(weights, "safe_open", spy)
    got = weights.load_vision_weights(sharded, flash=True)
    monkeypatch.undo()

    assert not any(k.startswith("language_model.") for k in got)
    assert not any(k.startswith(("pooling_before_gating.attn3", "pooling_before_gating.norm4")) for k in got)
    vision_shards = {f for k, f in weight_map.items() if weights.wanted(k, flash=True)}
    assert set(opened) == vision_shards and len(vision_shards) < len(set(weight_map.values()))
    single = weights.load_vision_weights(tiny_flash_ckpt, flash=True)
    assert got.keys() == single.keys()
    assert all(torch.equal(got[k], single[k]) for k in got)
    plain = weights.load_vision_weights(sharded, flash=False)
    assert not any(k.startswith(weights.FLASH_PREFIXES) for k in plain)
    _model(sharded, torch.float32)  # loads strictly


def test_unused_pooling_layers_are_accepted_and_ignored(tiny_flash_ckpt: Path) -> None:
    """attn3/norm3/attn4/norm4 ship in Flash checkpoints; the official forward never runs them."""
    from safetensors import safe_open

    from vision_server.weights import load_vision_weights, shard_map

    in_file = [k for names in shard_map(tiny_flash_ckpt).values() for k in names]
    assert "pooling_before_gating.attn4.in_proj_weight" in in_file
    tensors = load_vision_weights(tiny_flash_ckpt, flash=True)
    assert not [k for k in tensors if k.startswith(("pooling_before_gating.attn3", "pooling_before_gating.norm3",
                                                    "pooling_before_gating.attn4", "pooling_before_gating.norm4"))]
    model = _model(tiny_flash_ckpt, torch.float32)
    assert not hasattr(model.pooling_before_gating, "attn3")
    with safe_open(str(tiny_flash_ckpt / "model.safetensors"), framework="pt") as f:
        attn2 = f.get_tensor("pooling_before_gating.attn2.in_proj_weight").float()
    assert torch.equal(model.pooling_before_gating.attn2.in_proj_weight, attn2)


if __name__ == "__main__":
    vllm_reference(sys.argv[1], [tuple(job.split("=", 1)) for job in sys.argv[2:]])
