"""Encoded image bytes -> InternVL tiles, pixel-identical to vLLM's colocated path.

vLLM's serving path loads an image (format allowlist, EXIF orientation, RGB with alpha composited on white), then
`image_to_pixel_values_internvl` picks a tile grid, resizes, crops row-major, appends a thumbnail and normalises.
The language model was trained on exactly those pixels, so this module reproduces each step with the same Pillow
calls and the same float32 arithmetic as torchvision's ToTensor + Normalize (tests compare with torch.equal).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dvd.errors import ServiceError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class Tiled:
    pixels: torch.Tensor  # (tiles, 3, S, S) float32, grid tiles row-major then the thumbnail
    width: int
    height: int
    grid: tuple[int, int]  # (cols, rows)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> a loaded RGB image, or ServiceError with a message a client can act on."""
    if not data:
        raise ServiceError("empty image data")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = image.size
        if w <= 0 or h <= 0:
            raise ServiceError(f"image has zero size ({w}x{h})")
        if w * h > max_pixels:
            raise ServiceError(f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                               "(decompression bomb guard)")
        image = _exif_transpose(image)
        image.load()
        return to_rgb(image)
    except ServiceError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ServiceError(f"image rejected as a decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise ServiceError(f"unsupported image format or corrupt header (accepted: {', '.join(FORMATS)})") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ServiceError(f"corrupt or truncated image data: {e}") from e


def install_image_limits(max_pixels: int) -> None:
    """Align Pillow's own bomb guard (warning above the limit, error above twice it) with the server's limit."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _exif_transpose(image: Image.Image) -> Image.Image:
    """vLLM's `normalize_image`: apply the EXIF orientation, ignore broken EXIF."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """vLLM's `convert_image_mode(image, "RGB")`: transparency is composited on white, not dropped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        if image.mode != "RGBA":
            image = image.convert("RGBA")
        out = Image.new("RGB", image.size, (255, 255, 255))
        out.paste(image, mask=image.split()[3])
        return out
    return image.convert("RGB")


@cache
def target_ratios(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) grid with min_num <= cols*rows <= max_num, by tile count (stable order as vLLM)."""
    ratios = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
              if min_num <= i * j <= max_num}
    return tuple(sorted(ratios, key=lambda r: r[0] * r[1]))


def choose_grid(width: int, height: int, ratios: tuple[tuple[int, int], ...], image_size: int) -> tuple[int, int]:
    """Closest aspect ratio; on a tie the larger grid wins when the image has the pixels for it."""
    aspect = width / height
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for cols, rows in ratios:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def _normalize(arrays: list[np.ndarray]) -> torch.Tensor:
    """torchvision ToTensor + Normalize, the same float32 ops in the same order."""
    t = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    t = t.to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, -1, 1, 1)
    return t.sub_(mean).div_(std)


def tile_image(image: Image.Image, *, image_size: int, min_num: int, max_num: int, use_thumbnail: bool) -> Tiled:
    """InternVL dynamic tiling of an RGB image (vLLM's image_to_pixel_values_internvl)."""
    w, h = image.size
    cols, rows = choose_grid(w, h, target_ratios(min_num, max_num), image_size)
    resized = np.asarray(image.resize((image_size * cols, image_size * rows)))
    tiles = [resized[r * image_size:(r + 1) * image_size, c * image_size:(c + 1) * image_size]
             for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(np.asarray(image.resize((image_size, image_size))))
    return Tiled(pixels=_normalize(tiles), width=w, height=h, grid=(cols, rows))


def preprocess(data: bytes, *, image_size: int, min_num: int, max_num: int, use_thumbnail: bool,
               max_pixels: int) -> Tiled:
    """Decode and tile one encoded image."""
    image = decode_image(data, max_pixels)
    return tile_image(image, image_size=image_size, min_num=min_num, max_num=max_num, use_thumbnail=use_thumbnail)
