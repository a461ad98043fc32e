"""Read only the vision tensors of a checkpoint: the language model (most of the bytes) is never touched."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger("vision_server.weights")

BASE_PREFIXES = ("vision_model.", "mlp1.")
FLASH_PREFIXES = ("mlp2.", "pooling_before_gating.", "gating.")
# Shipped in Flash checkpoints, never used by the official forward (it reuses attn2/norm2 three times).
UNUSED_PREFIXES = tuple(f"pooling_before_gating.{m}{k}." for m in ("attn", "norm") for k in (3, 4))


def wanted(name: str, flash: bool) -> bool:
    """Whether a tensor name belongs to the vision side the server runs."""
    if name.startswith(UNUSED_PREFIXES):
        return False
    return name.startswith(BASE_PREFIXES + FLASH_PREFIXES if flash else BASE_PREFIXES)


def shard_map(ckpt: Path) -> dict[str, list[str]]:
    """file -> tensor names, from `model.safetensors.index.json` or the single `model.safetensors`."""
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        files: dict[str, list[str]] = defaultdict(list)
        for name, fname in json.loads(index.read_text())["weight_map"].items():
            files[fname].append(name)
        return dict(files)
    single = ckpt / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{ckpt} has neither model.safetensors nor model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return {single.name: list(f.keys())}


def load_vision_weights(ckpt: Path, flash: bool) -> dict[str, torch.Tensor]:
    """The vision tensors by their checkpoint names; shards holding none of them are not even opened."""
    ckpt = Path(ckpt)
    out: dict[str, torch.Tensor] = {}
    opened = 0
    for fname, names in sorted(shard_map(ckpt).items()):
        keep = [n for n in names if wanted(n, flash)]
        if not keep:
            continue
        opened += 1
        with safe_open(str(ckpt / fname), framework="pt") as f:
            for n in keep:
                out[n] = f.get_tensor(n)
    if not any(n.startswith("vision_model.") for n in out):
        raise ValueError(f"{ckpt} contains no vision_model.* tensors")
    log.info("vision weights read", extra={"ckpt": str(ckpt), "tensors": len(out), "shards_opened": opened,
                                           "mbytes": round(sum(t.numel() * t.element_size()
                                                               for t in out.values()) / 2**20, 1)})
    return out
