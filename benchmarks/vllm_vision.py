"""vLLM's own InternVL vision half (InternVisionModel -> pixel_shuffle -> mlp1), built from a checkpoint.

The reference nobody here wrote: the fidelity tests compare our embeddings to it, and vision_bench times our ViT
against it on the same tiles and dtype. vLLM's builders, loader hooks and `extract_feature` are called as its
model runner calls them; only the language model is left out (a stand-in object carries the vision attributes).
"""

from __future__ import annotations

import functools
import importlib.util
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

_CONTEXTS: list[object] = []


@functools.cache
def init_vllm() -> None:
    """vLLM's layers need a (single-rank) distributed group and a current config, once per process."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    from dvd.procs import free_port

    # The config stays current for the life of the process (vLLM's layers read it when built and run): the
    # context is entered and kept referenced, never exited.
    _CONTEXTS.append(set_current_vllm_config(VllmConfig()))
    _CONTEXTS[-1].__enter__()
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
    initialize_model_parallel(1, 1)


def _tensors(ckpt: Path, prefixes: tuple[str, ...]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    from vision_server.weights import shard_map

    for fname, names in sorted(shard_map(ckpt).items()):
        keep = [n for n in names if n.startswith(prefixes)]
        if keep:
            with safe_open(str(ckpt / fname), framework="pt") as f:
                for n in keep:
                    yield n, f.get_tensor(n)


def vllm_extract_feature(ckpt: Path, dtype: torch.dtype, device: str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """`pixels (N, 3, H, W) -> (N, tokens, llm_hidden)` by vLLM's InternVLChatModel.extract_feature."""
    from transformers import AutoConfig
    from vllm.model_executor.models.internvl import InternVLChatModel

    init_vllm()
    ckpt = Path(ckpt)
    cfg = AutoConfig.from_pretrained(ckpt, trust_remote_code=True)
    ns = types.SimpleNamespace(downsample_ratio=cfg.downsample_ratio, ps_version=cfg.ps_version)
    with torch.device(device):
        vit = InternVLChatModel._init_vision_model(ns, cfg, quant_config=None, prefix="vision_model").to(dtype)
        names = {n for n, _ in vit.named_parameters()}  # layers past select_layer are not built
        loaded = vit.load_weights((k, v.to(dtype)) for k, v in
                                  ((k.removeprefix("vision_model."), v) for k, v in
                                   _tensors(ckpt, ("vision_model.",))) if k in names)
        if loaded != names:
            raise ValueError(f"vLLM's InternVisionModel left unloaded: {sorted(names - loaded)[:5]}")
        for m in vit.modules():  # what vLLM's loader does after loading (the CPU GEMM dispatch packs weights)
            qm = getattr(m, "quant_method", None)
            if qm is not None and hasattr(qm, "process_weights_after_loading"):
                qm.process_weights_after_loading(m)
        mlp1 = InternVLChatModel._init_mlp1(ns, cfg).to(dtype)
        mlp1.load_state_dict({k.removeprefix("mlp1."): v.to(dtype) for k, v in _tensors(ckpt, ("mlp1.",))})
    ns.vision_model, ns.mlp1 = vit.eval(), mlp1.eval()
    ns.pixel_shuffle = functools.partial(InternVLChatModel.pixel_shuffle, ns)

    @torch.inference_mode()
    def extract(pixels: torch.Tensor) -> torch.Tensor:
        return InternVLChatModel.extract_feature(ns, pixels.to(device=device, dtype=dtype))

    return extract


def vllm_available() -> bool:
    """False on a machine that has torch but no vLLM (the GPU check runs there)."""
    return importlib.util.find_spec("vllm") is not None
