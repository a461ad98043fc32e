"""Preprocessing: decoding and InternVL tiling must give exactly vLLM's pixels (torch.equal)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from vllm.multimodal.media.image import ImageMediaIO
from vllm.transformers_utils.processors.internvl import InternVLImageProcessor, image_to_pixel_values_internvl

from dvd.errors import ServiceError
from tests.helpers.vision import encode, noise_image, png_header_only
from vision_server.preprocess import choose_grid, decode_image, target_ratios, tile_image

SIZES = [(1, 1), (2, 3), (13, 7), (448, 448), (449, 447), (896, 448), (448, 896), (1344, 896), (500, 333),
         (333, 500), (1000, 10), (10, 1000), (4000, 30), (30, 4000), (2400, 1800), (1, 700), (700, 1)]


def _vllm(image: Image.Image, min_num: int, max_num: int, use_thumbnail: bool) -> torch.Tensor:
    return image_to_pixel_values_internvl(image, input_size=448, min_num=min_num, max_num=max_num,
                                          use_thumbnail=use_thumbnail)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_tiles_equal_vllm(width: int, height: int) -> None:
    image = noise_image(width, height)
    ours = tile_image(image, image_size=448, min_num=1, max_num=12, use_thumbnail=True)
    assert torch.equal(ours.pixels, _vllm(image, 1, 12, True))
    assert ours.pixels.dtype == torch.float32


@pytest.mark.parametrize(("max_num", "min_num", "thumb"), [(1, 1, True), (2, 1, True), (6, 1, False), (6, 2, True),
                                                          (24, 1, True)])
@pytest.mark.parametrize(("width", "height"), [(1, 1), (1200, 500), (500, 1200), (2000, 1500), (90, 4000)])
def test_tiles_equal_vllm_max_num(width: int, height: int, max_num: int, min_num: int, thumb: bool) -> None:
    image = noise_image(width, height, seed=max_num)
    ours = tile_image(image, image_size=448, min_num=min_num, max_num=max_num, use_thumbnail=thumb)
    assert torch.equal(ours.pixels, _vllm(image, min_num, max_num, thumb))
    cols, rows = ours.grid
    assert ours.pixels.shape[0] == cols * rows + (1 if thumb and cols * rows > 1 else 0)


@pytest.mark.parametrize("max_tiles", [1, 4, 12])
def test_tiles_equal_vllm_image_processor(max_tiles: int) -> None:
    """The processor object vLLM's InternVL path instantiates, with a per-request max_dynamic_patch."""
    proc = InternVLImageProcessor(image_size=448, min_dynamic_patch=1, max_dynamic_patch=12, dynamic_image_size=True,
                                  use_thumbnail=True)
    images = [noise_image(1500, 700), noise_image(640, 480), noise_image(20, 20)]
    ref = proc(images, max_dynamic_patch=max_tiles)
    ours = [tile_image(im, image_size=448, min_num=1, max_num=max_tiles, use_thumbnail=True).pixels for im in images]
    assert torch.equal(torch.cat(ours), ref["pixel_values_flat"])
    assert [len(t) for t in ours] == ref["image_num_patches"].tolist()


def test_grid_choice_ties_prefer_larger_grid_when_image_is_big() -> None:
    ratios = target_ratios(1, 12)
    assert choose_grid(448, 448, ratios, 448) == (1, 1)
    assert choose_grid(2000, 2000, ratios, 448) == (3, 3)  # 1:1 ties; a big square image earns the 3x3 grid
    assert choose_grid(896, 448, ratios, 448) == (2, 1)


def _variants() -> list[tuple[str, bytes]]:
    rgba = noise_image(300, 200, "RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    return [
        ("png-rgb", encode(noise_image(640, 360), "PNG")),
        ("png-rgba", encode(rgba, "PNG")),
        ("png-la", encode(noise_image(120, 90, "LA"), "PNG")),
        ("png-palette-transparent", encode(rgba.convert("P"), "PNG", transparency=0)),
        ("jpeg", encode(noise_image(700, 500), "JPEG", quality=90)),
        ("jpeg-gray", encode(noise_image(500, 700, "L"), "JPEG")),
        ("jpeg-exif-rotated", encode(noise_image(600, 300), "JPEG", exif=exif)),
        ("webp", encode(noise_image(500, 260), "WEBP", lossless=True)),
        ("webp-rgba", encode(rgba, "WEBP", lossless=True)),
        ("gif", encode(noise_image(200, 150).convert("P"), "GIF")),
        ("gif-animated", encode(noise_image(64, 48).convert("P"), "GIF", save_all=True,
                                append_images=[noise_image(64, 48, seed=1).convert("P")])),
        ("bmp", encode(noise_image(333, 222), "BMP")),
    ]


@pytest.mark.parametrize(("name", "data"), _variants(), ids=[n for n, _ in _variants()])
def test_decode_matches_vllm_media_loader(name: str, data: bytes) -> None:
    """Bytes -> RGB exactly as vLLM's ImageMediaIO (alpha on white, EXIF orientation, first GIF frame)."""
    ref = ImageMediaIO().load_bytes(data).media
    ours = decode_image(data, max_pixels=10**8)
    assert ours.mode == "RGB" and ours.size == ref.size
    assert ours.tobytes() == ref.convert("RGB").tobytes()
    tiled = tile_image(ours, image_size=448, min_num=1, max_num=12, use_thumbnail=True)
    assert torch.equal(tiled.pixels, _vllm(ref, 1, 12, True))


def test_alpha_composited_on_white() -> None:
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert decode_image(encode(clear, "PNG"), max_pixels=100).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty"),
    (b"definitely not an image", "unsupported"),
    (encode(noise_image(40, 40), "TIFF"), "unsupported"),
    (encode(noise_image(400, 300), "JPEG")[:600], "truncated"),
    (encode(noise_image(400, 300), "PNG")[:-300], "truncated"),
    (png_header_only(20000, 20000), "decompression bomb"),
    (png_header_only(0, 10), "corrupt"),
], ids=["empty", "garbage", "tiff", "truncated-jpeg", "truncated-png", "bomb", "zero-width"])
def test_bad_bytes_raise_bad_image(data: bytes, message: str) -> None:
    with pytest.raises(ServiceError, match=message):
        decode_image(data, max_pixels=64_000_000)
