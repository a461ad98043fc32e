"""The one place where embeddings become wire bytes and back: raw little-endian bfloat16, row-major.

Never pickle or torch.save across a service boundary: raw bytes plus explicit shape metadata is language- and
version-independent, and costs nothing to decode (a view over the received buffer).
"""

from __future__ import annotations

import sys

import torch

BF16_BYTES = 2


def encode_bf16(t: torch.Tensor) -> bytes:
    """A 2-D tensor -> raw little-endian bf16 bytes."""
    if t.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(t.shape)}")
    data = t.detach().to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16)
    if sys.byteorder != "little":
        data = data.byteswap()
    return data.numpy().tobytes()


def decode_bf16(data: bytes, rows: int, cols: int) -> torch.Tensor:
    """Raw little-endian bf16 bytes -> a (rows, cols) bf16 tensor; raises ValueError on a size mismatch."""
    if rows <= 0 or cols <= 0:
        raise ValueError(f"invalid embedding shape ({rows}, {cols})")
    expected = rows * cols * BF16_BYTES
    if len(data) != expected:
        raise ValueError(f"embedding payload has {len(data)} bytes, expected {expected} for ({rows}, {cols}) bf16")
    t = torch.frombuffer(bytearray(data), dtype=torch.int16)
    if sys.byteorder != "little":
        t = t.byteswap()
    return t.view(torch.bfloat16).view(rows, cols)
