"""InternViT + pixel shuffle + projectors (+ the Flash ViR router) in plain torch, driven by the checkpoint config.

Plain torch keeps the vision node free of vLLM; module and parameter names follow the checkpoint keys so that
`load_state_dict` is the whole loader. The maths mirrors vLLM's `intern_vit.py` / `internvl.py` and, for Flash,
the official remote code (`CrossAttentionPooling`, `Gating`, `extract_feature_flash`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vision_server.config import ModelConfig


class RMSNorm(nn.Module):
    """InternViT-6B's norm: statistics in float32, scale applied in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(dtype) * self.weight


def make_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    if norm_type == "rms_norm":
        return RMSNorm(dim, eps)
    if norm_type == "layer_norm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm_type {norm_type!r}")


def make_act(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unsupported hidden_act {name!r}")


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.vit_hidden
        self.grid = cfg.vit_image_size // cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, d))

    def _positions(self, h: int, w: int) -> torch.Tensor:
        """Bicubic resize of the position table when force_image_size differs from the ViT's own size."""
        pos = self.position_embedding
        if h * w == self.grid * self.grid:
            return pos
        grid = pos[:, 1:].float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        grid = grid.reshape(1, -1, h * w).permute(0, 2, 1).to(pos.dtype)
        return torch.cat([pos[:, :1], grid], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixels.to(dtype))
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(b, 1, -1).to(dtype), x], dim=1)
        return x + self._positions(h, w).to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.vit_hidden
        self.heads = cfg.vit_heads
        self.head_dim = d // self.heads
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)
        self.proj = nn.Linear(d, d)
        self.qk_normalization = cfg.qk_normalization
        if self.qk_normalization:
            self.q_norm = RMSNorm(d, cfg.norm_eps)
            self.k_norm = RMSNorm(d, cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.vit_hidden, cfg.vit_mlp)
        self.act = make_act(cfg.hidden_act)
        self.fc2 = nn.Linear(cfg.vit_mlp, cfg.vit_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.vit_hidden
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.norm1 = make_norm(cfg.norm_type, d, cfg.norm_eps)
        self.norm2 = make_norm(cfg.norm_type, d, cfg.norm_eps)
        self.ls1 = nn.Parameter(torch.ones(d))
        self.ls2 = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.vit_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class InternViT(nn.Module):
    """Only the layers up to `select_layer` exist, so their output is the selected hidden state."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(pixels))


def pixel_shuffle(x: torch.Tensor, scale: float, ps_version: str) -> torch.Tensor:
    """(N, W, H, C) -> (N, W*s, H*s, C/s^2), InternVL's token merge (v1 leaves the grid transposed)."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def make_mlp1(vit_hidden: int, llm_hidden: int, ratio: float) -> nn.Sequential:
    d_in = vit_hidden * int(1 / ratio) ** 2
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))


def make_mlp2(vit_hidden: int, llm_hidden: int, ratio: float) -> nn.Sequential:
    d_in = vit_hidden * int(1 / ratio) ** 4
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, 2 * llm_hidden), nn.GELU(), nn.Dropout(0.1),
                         nn.Linear(2 * llm_hidden, 2 * llm_hidden), nn.GELU(), nn.Dropout(0.1),
                         nn.Linear(2 * llm_hidden, llm_hidden))


class CrossAttentionPooling(nn.Module):
    """One learned query attends over a tile's tokens: attn1/norm1, then attn2/norm2 three times (as shipped)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.query_token = nn.Parameter(torch.zeros(1, dim))
        self.attn1 = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2 = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)

    @staticmethod
    def _keys_values(attn: nn.MultiheadAttention, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) -> per-head K and V, (B, heads, T, D/heads): the expensive half of an attention call."""
        d, h = attn.embed_dim, attn.num_heads
        w, b = attn.in_proj_weight, attn.in_proj_bias
        bsz, t, _ = tokens.shape
        k = F.linear(tokens, w[d:2 * d], b[d:2 * d] if b is not None else None)
        v = F.linear(tokens, w[2 * d:], b[2 * d:] if b is not None else None)
        return (k.view(bsz, t, h, d // h).transpose(1, 2), v.view(bsz, t, h, d // h).transpose(1, 2))

    @staticmethod
    def _attend(attn: nn.MultiheadAttention, query: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """nn.MultiheadAttention's maths for a (B, 1, D) query over precomputed K/V."""
        d, h = attn.embed_dim, attn.num_heads
        w, b = attn.in_proj_weight, attn.in_proj_bias
        q = F.linear(query, w[:d], b[:d] if b is not None else None)
        q = q.view(q.shape[0], 1, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return attn.out_proj(out.transpose(1, 2).reshape(q.shape[0], 1, d))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) tokens (every tile has the same T, so no padding mask) -> (B, D).

        attn2 runs three times over the same tokens, so its keys and values are projected once: the router
        then costs about half of four full attention calls, with the same maths.
        """
        out = self.query_token.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        out = self.norm1(self._attend(self.attn1, out, self._keys_values(self.attn1, tokens)))
        kv2 = self._keys_values(self.attn2, tokens)
        for _ in range(3):
            out = self.norm2(self._attend(self.attn2, out, kv2))
        return out.squeeze(1)


def _gating_block(d: int, mid: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, mid), nn.GELU(), nn.Dropout(0.1), nn.Linear(mid, d), nn.Dropout(0.1),
                         nn.LayerNorm(d))


class Gating(nn.Module):
    """Four residual MLP blocks and a 2-way head: softmax probabilities, class 0 = "compress"."""

    def __init__(self, d: int, expansion: int = 4) -> None:
        super().__init__()
        self.block1 = _gating_block(d, d * expansion)
        self.block2 = _gating_block(d, d * expansion)
        self.block3 = _gating_block(d, d * expansion)
        self.block4 = _gating_block(d, d * expansion)
        self.gate = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.block1, self.block2, self.block3, self.block4):
            x = x + block(x)
        return torch.softmax(self.gate(x), dim=-1)


@dataclass
class TileOutputs:
    """One forward over B tiles; rows are in the model dtype, on the model's device."""

    emb256: torch.Tensor  # (B, 256, H)
    emb64: torch.Tensor | None  # (B, 64, H), Flash with the router on
    p_compress: torch.Tensor | None  # (B,) probability of class 0


class VisionModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = InternViT(cfg)
        self.mlp1 = make_mlp1(cfg.vit_hidden, cfg.llm_hidden, cfg.downsample_ratio)
        if cfg.flash:
            self.mlp2 = make_mlp2(cfg.vit_hidden, cfg.llm_hidden, cfg.downsample_ratio)
            self.pooling_before_gating = CrossAttentionPooling(cfg.vit_hidden, cfg.pooling_heads)
            self.gating = Gating(cfg.vit_hidden)

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Strict load; ViT layers past select_layer are not part of this model and are skipped."""
        n = self.cfg.vit_layers
        state = {}
        for name, t in tensors.items():
            if name.startswith("vision_model.encoder.layers.") and int(name.split(".")[3]) >= n:
                continue
            state[name] = t
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model config: missing={missing[:8]} "
                             f"unexpected={unexpected[:8]}")

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, side, side, D): the ViT tokens without CLS, as a grid."""
        x = self.vision_model(pixels)[:, 1:, :]
        side = int(x.shape[1] ** 0.5)
        return x.reshape(x.shape[0], side, side, -1)

    def project(self, grid: torch.Tensor, compressed: bool) -> torch.Tensor:
        ratio = self.cfg.downsample_ratio ** 2 if compressed else self.cfg.downsample_ratio
        x = pixel_shuffle(grid, ratio, self.cfg.ps_version)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return (self.mlp2 if compressed else self.mlp1)(x)

    def route(self, grid: torch.Tensor, n: int) -> torch.Tensor:
        """P(compress) of the first n tiles, one tile per call.

        The router's GEMMs have one row per tile; with several rows BLAS may handle a row by its position (a tile's
        probability can change with its slot in a batch), so each tile gets the same shape alone.
        """
        tokens = grid.reshape(grid.shape[0], -1, grid.shape[-1])
        probs = [self.gating(self.pooling_before_gating(tokens[i:i + 1])) for i in range(n)]
        return torch.cat(probs)[:, 0]

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, with_vir: bool = False) -> TileOutputs:  # type: ignore[override]
        """Every output at once (the reference path).

        The server does not use it: it projects router tiles only after the request-wide decision, with the one
        projector each tile needs (see DeviceRunner).
        """
        grid = self.features(pixels)
        emb256 = self.project(grid, compressed=False)
        if not (with_vir and self.cfg.flash):
            return TileOutputs(emb256, None, None)
        return TileOutputs(emb256, self.project(grid, compressed=True), self.route(grid, pixels.shape[0]))


def compile_vit(model: VisionModel) -> None:
    """The ViT through inductor with a symbolic batch size: one graph for every group size, built by the first
    forward (the warm-up). Per-row kernels keep a tile's bytes independent of its neighbours; the start-up
    batch-invariance check still proves it on the device. Freezing folds the weights into the graph as constants
    (pre-packed for oneDNN on CPU): the server never trains or reloads them."""
    import torch._inductor.config as inductor

    inductor.freezing = True
    model.vision_model = torch.compile(model.vision_model, dynamic=True)  # type: ignore[assignment]


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], device: str, dtype: torch.dtype) -> VisionModel:
    model = VisionModel(cfg)
    model.load_checkpoint_tensors(tensors)
    return model.to(device=device, dtype=dtype).eval()
