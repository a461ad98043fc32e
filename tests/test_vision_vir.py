"""The ViR router's decision: the official per-request rule, on hand-checkable numbers and through the service."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dvd.v2 import vision_pb2
from tests.helpers.vision import encode, encode_sync, noise_image, request
from vision_server.vir import decide_compression


@pytest.mark.parametrize(("p", "rel", "absolute", "expected"), [
    ([0.9, 0.1, 0.5, 0.7], 0.5, 0.3, [True, False, False, True]),  # median 0.6
    ([0.9, 0.1, 0.5, 0.7], 0.5, 0.8, [True, False, False, False]),  # the absolute floor removes 0.7
    ([0.9, 0.1, 0.5, 0.7], 0.0, 0.0, [True, False, True, True]),  # strictly above the minimum
    ([0.9, 0.1, 0.5, 0.7], 1.0, 0.0, [False, False, False, False]),  # nothing is above the maximum
    ([0.2, 0.2, 0.2], 0.5, 0.0, [False, False, False]),  # ties: nobody is above the quantile
    ([0.99], 0.0, 0.0, [False]),  # one tile: the quantile is the tile itself
    ([0.4, 0.6], 0.5, 0.6, [False, True]),  # >= on the absolute threshold
    ([], 0.5, 0.5, []),
])
def test_decision_rule(p: list[float], rel: float, absolute: float, expected: list[bool]) -> None:
    assert decide_compression(torch.tensor(p), rel, absolute) == expected


def test_decision_uses_linear_quantile_like_torch() -> None:
    p = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    # 0.3-quantile with linear interpolation = 0.22: the three upper tiles are compressed.
    assert decide_compression(p, 0.3, 0.0) == [False, False, True, True, True]


def test_single_tile_request_never_compressed(vision_tiny_flash: str) -> None:
    got = encode_sync(vision_tiny_flash, request([encode(noise_image(448, 448), "PNG")]))
    assert [(t.shape[0], t.compressed) for t in got.tiles] == [(256, False)]


def test_vir_off_keeps_256_rows_and_same_bytes(vision_tiny_flash: str) -> None:
    data = encode(noise_image(1000, 600, seed=3), "PNG")
    off = encode_sync(vision_tiny_flash, request([data], vir=vision_pb2.VIR_MODE_OFF))
    auto = encode_sync(vision_tiny_flash, request([data], vir=vision_pb2.VIR_MODE_AUTO))
    assert len(off.tiles) == len(auto.tiles) == 7
    assert all(t.shape[0] == 256 and not t.compressed for t in off.tiles)
    assert off.summary.images[0].num_tokens == 7 * 256
    assert 0 < auto.summary.images[0].num_compressed_tiles < 7, "the tiny Flash router should split this image"
    for a, o in zip(auto.tiles, off.tiles, strict=True):
        if not a.compressed:
            assert auto.payload(a) == off.payload(o)


def test_non_flash_checkpoint_is_never_compressed(vision_tiny: str) -> None:
    got = encode_sync(vision_tiny, request([encode(noise_image(1000, 600, seed=3), "PNG")],
                                           vir=vision_pb2.VIR_MODE_AUTO))
    assert all(t.shape[0] == 256 and not t.compressed for t in got.tiles)


def test_service_decision_is_per_request_over_all_images(vision_tiny_flash: str, tiny_flash_ckpt: Path) -> None:
    """Recompute the request's probabilities locally: the service's choices are the rule over all its tiles."""
    from vision_server.config import ModelConfig
    from vision_server.model import build_model
    from vision_server.preprocess import preprocess
    from vision_server.weights import load_vision_weights

    images = [encode(noise_image(900, 500, seed=s), "PNG") for s in (5, 6)]
    got = encode_sync(vision_tiny_flash, request(images))
    cfg = ModelConfig.from_checkpoint(tiny_flash_ckpt)
    model = build_model(cfg, load_vision_weights(tiny_flash_ckpt, True), "cpu", torch.float32)
    pixels = torch.cat([preprocess(d, image_size=448, min_num=1, max_num=12, use_thumbnail=True,
                                   max_pixels=10**8).pixels for d in images])
    out = model(pixels, with_vir=True)
    expected = decide_compression(out.p_compress, cfg.vir_relative_threshold, cfg.vir_absolute_threshold)
    assert [t.compressed for t in got.tiles] == expected
    assert any(expected) and not all(expected)
    for tile, small, e64, e256 in zip(got.tiles, expected, out.emb64, out.emb256, strict=True):
        assert tile.shape[0] == (64 if small else 256)
        ref = (e64 if small else e256).to(torch.bfloat16)
        assert torch.equal(got.tensor(tile), ref)
    per_image = [sum(t.shape[0] for t in got.image_tiles(i)) for i in range(2)]
    assert [s.num_tokens for s in got.summary.images] == per_image
