"""Model FLOPs of one request: the vision tower per tile, the language decoder per prompt and output.

Dense counts from the checkpoint's config.json (2 FLOPs per multiply-add, no caches): what a request costs the model
itself, so that a run on a small checkpoint can be placed next to the paper's regime, where the ratio of vision to
language compute decides how much a separate vision pool relieves the language engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vision_server.config import ModelConfig
from vision_server.preprocess import choose_grid, target_ratios


def vision_tile_flops(cfg: ModelConfig, with_vir: bool, compressed: bool = False) -> float:
    """Multiply-adds x 2 of one tile as the vision server computes it: patch embedding, ViT layers, the router
    (Flash, ViR on) and the one projector the tile needs (mlp2 for a compressed tile, mlp1 otherwise)."""
    d, m, h = cfg.vit_hidden, cfg.vit_mlp, cfg.llm_hidden
    side = cfg.image_size // cfg.patch_size
    n = side * side + 1
    f = 2 * side * side * 3 * cfg.patch_size**2 * d
    f += cfg.vit_layers * (2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d)
    r = int(1 / cfg.downsample_ratio)
    if compressed and cfg.flash:
        f += 2 * cfg.compressed_tokens_per_tile * (d * r**4 * 2 * h + 4 * h * h + 2 * h * h)
    else:
        f += 2 * cfg.tokens_per_tile * (d * r * r * h + h * h)
    if with_vir and cfg.flash:
        t = side * side
        f += 2 * (2 * t * 2 * d * d)  # keys and values over all tokens: attn1 once, attn2 once (reused 3 times)
        f += 4 * (4 * t * d + 4 * d * d)  # 4 one-query attentions: scores, values, q and out projections
        f += 4 * 2 * 8 * d * d + 4 * d  # gating blocks + gate
    return float(f)


def tiles_per_image(cfg: ModelConfig, width: int, height: int) -> int:
    """Tiles the vision server cuts from a width x height image: the grid (preprocess's choice) plus the thumbnail.

    The same rule as vision_server.service with the model's own tile limit (the benchmark sends no max_tiles), and
    as vLLM's colocated InternVL path, which preprocess reproduces.
    """
    max_num = cfg.max_tiles
    min_num = min(cfg.min_dynamic_patch if cfg.dynamic_image_size else 1, max_num)
    cols, rows = choose_grid(width, height, target_ratios(min_num, max_num), cfg.image_size)
    grid = cols * rows
    return grid + (1 if cfg.use_thumbnail and grid != 1 else 0)


def llm_config(config_json: Mapping[str, Any]) -> Mapping[str, Any]:
    """The decoder's config: InternVL nests it under `llm_config`; a bare decoder config is taken as is."""
    return config_json.get("llm_config") or config_json.get("text_config") or config_json


def language_flops(config_json: Mapping[str, Any], prompt_tokens: int, output_tokens: int) -> float:
    """Dense decoder FLOPs of one request: weights (2 x non-embedding parameters per token) plus attention.

    The decoder runs over the prompt and every generated token but the last (which is sampled, never fed back):
    prompt_tokens + output_tokens - 1 positions. The lm_head runs once per generated token: on the last prompt
    position for the first, on the fed-back tokens for the rest. Attention scores and values cost
    4 x layers x q_dim x context per position, with the context growing causally (position i sees i + 1 tokens).
    Prefix caching and speculative decoding are ignored: this is what the model computes without them.
    """
    c = llm_config(config_json)
    hidden, layers = int(c["hidden_size"]), int(c["num_hidden_layers"])
    heads = int(c["num_attention_heads"])
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or hidden // heads)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    per_layer = hidden * q_dim + 2 * hidden * kv_dim + q_dim * hidden + 3 * hidden * int(c["intermediate_size"])
    positions = prompt_tokens + max(output_tokens - 1, 0)
    weights = 2 * positions * layers * per_layer
    lm_head = 2 * output_tokens * hidden * int(c["vocab_size"])
    attention = 4 * layers * q_dim * positions * (positions + 1) // 2
    return float(weights + lm_head + attention)
