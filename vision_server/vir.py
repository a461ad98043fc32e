"""The ViR decision: which tiles of one request keep 64 rows instead of 256.

Kept apart from the model because it needs every tile of a request at once (the quantile is per request),
while the batcher computes tiles from many requests in whatever groups arrive.
"""

from __future__ import annotations

import torch


def decide_compression(p: torch.Tensor, relative_threshold: float, absolute_threshold: float) -> list[bool]:
    """Official rule: compress = (p > quantile(p, relative)) & (p >= absolute), p over all tiles of the request.

    With one tile the quantile is p itself, so a single tile is never compressed.
    """
    if p.dim() != 1:
        raise ValueError(f"expected a 1-D tensor of probabilities, got shape {tuple(p.shape)}")
    if p.numel() == 0:
        return []
    q = torch.quantile(p.float(), relative_threshold)
    return ((p > q) & (p >= absolute_threshold)).tolist()
