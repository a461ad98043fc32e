"""The compute dtype of every engine the project starts: vLLM's `--dtype auto`, so that DvD's vision server and
`vllm serve` compute the same numbers on the same checkpoint and device."""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def checkpoint_dtype(ckpt: Path) -> torch.dtype:
    """The dtype vLLM reads from an InternVL config: the root's, else the language model's, else the ViT's."""
    raw = json.loads((Path(ckpt) / "config.json").read_text())
    for section in (raw, raw.get("llm_config") or raw.get("text_config") or {}, raw.get("vision_config") or {}):
        name = section.get("dtype") or section.get("torch_dtype")
        if name:
            return DTYPES.get(str(name).removeprefix("torch."), torch.float32)
    return torch.float32


def supported_dtypes(device: str) -> list[torch.dtype]:
    """vLLM's platforms' supported dtypes, preferred first (CPU: x86 and aarch64 Linux; CUDA: by capability)."""
    if device.startswith("cuda"):
        major, _ = torch.cuda.get_device_capability(torch.device(device))
        return ([torch.bfloat16, torch.float16, torch.float32] if major >= 8
                else [torch.float16, torch.float32] if major >= 6 else [torch.float32])
    return [torch.bfloat16, torch.float16, torch.float32]


def auto_dtype(config_dtype: torch.dtype, device: str) -> torch.dtype:
    """vLLM's `--dtype auto` (vllm.config.model._resolve_auto_dtype): a float32 checkpoint runs in the device's
    preferred dtype, another in its own where the device supports it, else in the preferred one. On a CPU without
    native bf16 this is bf16 all the same, as `vllm serve` computes it there."""
    supported = supported_dtypes(device)
    if config_dtype == torch.float32:
        config_dtype = supported[0]
    return config_dtype if config_dtype in supported else supported[0]


def resolve_dtype(name: str, ckpt: Path, device: str) -> torch.dtype:
    """An engine's `--dtype` option: "auto" or one of DTYPES."""
    return auto_dtype(checkpoint_dtype(ckpt), device) if name == "auto" else DTYPES[name]
