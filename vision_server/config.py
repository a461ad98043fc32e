"""What the vision server needs to know: the checkpoint's vision facts and the operator's serving options."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvd.config import (
    EMPTY_MODEL,
    MAX_VIDEO_FRAMES,
    VIDEO_NUM_FRAMES,
    VISION_PORT,
    Deadlines,
    LogOptions,
    MediaLimits,
    option,
)
from dvd.dtype import DTYPES
from dvd.security import InternalAuth


@dataclass(frozen=True)
class ModelConfig:
    """The vision half of an InternVL3.5 (or -Flash) `config.json`, with InternVL's defaults where keys are absent."""

    name: str
    vit_hidden: int
    vit_layers: int  # layers actually run (select_layer applied)
    vit_heads: int
    vit_mlp: int
    patch_size: int
    vit_image_size: int
    image_size: int  # force_image_size: the tile side
    norm_type: str
    norm_eps: float
    qkv_bias: bool
    qk_normalization: bool
    hidden_act: str
    llm_hidden: int
    downsample_ratio: float
    ps_version: str
    min_dynamic_patch: int
    max_dynamic_patch: int
    dynamic_image_size: bool
    use_thumbnail: bool
    flash: bool
    vir_relative_threshold: float
    vir_absolute_threshold: float
    pooling_heads: int = 16

    @property
    def tokens_per_tile(self) -> int:
        side = self.image_size // self.patch_size
        return int(side * side * self.downsample_ratio**2)

    @property
    def compressed_tokens_per_tile(self) -> int:
        side = self.image_size // self.patch_size
        return int(side * side * self.downsample_ratio**4)

    @property
    def max_tiles(self) -> int:
        """Largest accepted `max_tiles` (grid tiles, thumbnail excluded), as vLLM resolves it."""
        return self.max_dynamic_patch if self.dynamic_image_size else 1

    @classmethod
    def from_checkpoint(cls, ckpt: Path, *, name: str | None = None) -> ModelConfig:
        raw: dict[str, Any] = json.loads((Path(ckpt) / "config.json").read_text())
        v = raw["vision_config"]
        llm = raw.get("llm_config") or raw.get("text_config") or {}
        layers = int(v["num_hidden_layers"])
        select = int(raw.get("select_layer", -1))
        run_layers = layers + select + 1 if select < 0 else select + 1
        if not 0 < run_layers <= layers:
            raise ValueError(f"select_layer {select} is out of range for {layers} ViT layers")
        return cls(
            name=name or Path(ckpt).name,
            vit_hidden=int(v["hidden_size"]),
            vit_layers=run_layers,
            vit_heads=int(v["num_attention_heads"]),
            vit_mlp=int(v["intermediate_size"]),
            patch_size=int(v.get("patch_size", 14)),
            vit_image_size=int(v.get("image_size", 448)),
            image_size=int(raw.get("force_image_size") or v.get("image_size", 448)),
            norm_type=str(v.get("norm_type", "layer_norm")),
            norm_eps=float(v.get("layer_norm_eps", 1e-6)),
            qkv_bias=bool(v.get("qkv_bias", True)),
            qk_normalization=bool(v.get("qk_normalization", False)),
            hidden_act=str(v.get("hidden_act", "gelu")),
            llm_hidden=int(llm["hidden_size"]),
            downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
            ps_version=str(raw.get("ps_version", "v2")),
            min_dynamic_patch=int(raw.get("min_dynamic_patch", 1)),
            max_dynamic_patch=int(raw.get("max_dynamic_patch", 12)),
            dynamic_image_size=bool(raw.get("dynamic_image_size", True)),
            use_thumbnail=bool(raw.get("use_thumbnail", True)),
            flash=bool(raw.get("flash_mode", False)),
            vir_relative_threshold=float(raw.get("flash_relative_threshold", 0.5)),
            vir_absolute_threshold=float(raw.get("flash_absolute_threshold", 0.0)),
        )


@dataclass(frozen=True)
class ServerConfig:
    """Serving options, independent of the checkpoint; also the command line (dvd.config)."""

    model: str = option(help="checkpoint directory, preset (tiny, tiny-flash, small, ...) or Hugging Face repo id")
    revision: str | None = option(None, "the repo's branch, tag or commit (as vLLM's --revision); pin the same on "
                                        "both nodes")
    port: int = option(VISION_PORT, "gRPC port (0 = any free port, reported to a launcher)")
    host: str = option("0.0.0.0", "address gRPC, the data port and metrics listen on")
    data_port: int = option(
        0, "TCP port embedding bytes are sent from to language servers on other hosts (0 = any "
        "free port, advertised through Health; -1 = no TCP data plane). Same host: shared memory")
    devices: tuple[str, ...] = option(("cpu",), "cpu, cuda (all GPUs) or cuda:0,cuda:1,...")
    dtype: str = option("auto", "auto: as vLLM's --dtype auto for the checkpoint and device (a bf16 checkpoint: "
                               "bf16 on a CPU or an Ampere or later GPU)", choices=("auto", *DTYPES),
                        env="DVD_VISION_DTYPE")
    max_batch_tiles: int = option(0, "tiles per forward at most (0 = 4 on CPU, 32 on GPU)")
    batching: str = option(
        "auto", "variable: each forward runs on exactly the waiting tiles; padded: on fixed zero-padded "
        "micro-batches; auto: variable where a start-up check proves it gives every tile the bytes it gets alone, "
        "padded otherwise (batcher.py)", choices=("auto", "variable", "padded"))
    micro_batch_tiles: int = option(0, "padded batching's fixed forward shape in tiles (0 = 4 on CPU, 8 on GPU)")
    compile: bool = option(False, "torch.compile the ViT (inductor, batch size dynamic): compiled at start-up, "
                                  "before the batch-invariance check, so the check covers the compiled graph")
    max_wait_ms: float = option(0.0, "how long a tile may wait for company before a free device starts "
                                     "(0 = never waits)")
    max_image_pixels: int = option(64_000_000, "decompression bomb guard (also for one video frame)")
    max_video_frames: int = option(MAX_VIDEO_FRAMES,
                                   "sampled frames of one request's videos together (a frame is one tile)")
    max_video_seconds: float = option(600.0, "duration of one video (its frames are decoded up to the last sampled)")
    video_num_frames: int = option(VIDEO_NUM_FRAMES,
                                   "frames sampled from a video whose request does not say (vLLM's default)")
    max_queue_tiles: int = option(4096, "RESOURCE_EXHAUSTED beyond this backlog")
    embedding_cache_gb: float = option(
        1.0, "host memory for what this server encoded recently (0 = off): an image that comes back through another "
        "language replica (a spilled or moved conversation) is sent again without a ViT pass",
        env="DVD_VISION_EMBEDDING_CACHE_GB")
    embedding_cache_ttl: float = option(300.0, "seconds an encoded image stays in that cache, used or not",
                                        env="DVD_VISION_EMBEDDING_CACHE_TTL")
    vir_relative_threshold: float | None = option(None, "override the checkpoint's value")
    vir_absolute_threshold: float | None = option(None, "override the checkpoint's value")
    vir_pressure_floor: float = option(
        0.1, "the lowest relative threshold a language server's pressure level (--vir-pressure-waiting) may move "
        "ViR's decision to: at full pressure about 1 - floor of a request's tiles keep 64 rows",
        env="DVD_VIR_PRESSURE_FLOOR")
    metrics_port: int = option(0, "Prometheus port (0 = off)")
    media: MediaLimits = field(default_factory=MediaLimits)
    deadlines: Deadlines = field(default_factory=Deadlines)
    logs: LogOptions = field(default_factory=LogOptions)
    internal: InternalAuth = field(default_factory=InternalAuth)
    preprocess_threads: int = option(factory=lambda: min(8, os.cpu_count() or 2),
                                     help="threads decoding and tiling images (Pillow releases the GIL while resizing)")

    def __post_init__(self) -> None:
        if not self.model.strip():  # compose passes "${MODEL:-}": the refusal belongs at start, not in `config`
            raise ValueError(EMPTY_MODEL)

    def on_gpu(self) -> bool:
        return any(d.startswith("cuda") for d in self.devices)

    def resolved_micro_batch(self) -> int:
        """The padded forward shape (only used with padded batching)."""
        if self.micro_batch_tiles > 0:
            return self.micro_batch_tiles
        return 8 if self.on_gpu() else 4

    def resolved_max_batch(self) -> int:
        """On CPU a tile's 1025 tokens already fill the cores; larger batches only spill the caches
        (docs/performance.md, "Settings behind the code")."""
        if self.max_batch_tiles > 0:
            return self.max_batch_tiles
        return 32 if self.on_gpu() else 4
