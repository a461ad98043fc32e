"""Deterministic generated images and clips, encoded the way clients send them (tests and benchmarks share them).

Smooth gradients plus seeded noise: every tile has different content, JPEG sizes are realistic, and the same seed
gives the same bytes on every machine, so two benchmark runs (or two configurations) see identical inputs.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: survives JPEG and gives each tile different content."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 / max(width - 1, 1)), (y * 255 / max(height - 1, 1)),
                     ((x + y) * 127 / max(width + height - 2, 1))], axis=-1)
    noise = rng.normal(0, 24, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def image_bytes(width: int, height: int, seed: int = 0, fmt: str = "PNG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    make_image(width, height, seed).save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def video_bytes(width: int, height: int, frames: int, fps: float = 8.0, seed: int = 0, codec: str = "mp4v",
                suffix: str = ".mp4", images: list[Image.Image] | None = None) -> bytes:
    """A short clip of generated frames (each a different `make_image`, or `images` as given), encoded by OpenCV's
    FFmpeg: MPEG-4 in MP4 by default, `codec="MJPG", suffix=".avi"` for Motion JPEG, `"FFV1"` (AVI) lossless."""
    import tempfile

    import cv2

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/clip{suffix}"
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec), fps, (width, height))
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write {codec} video here")
        for i in range(frames):
            frame = images[i] if images is not None else make_image(width, height, seed * 1000 + i)
            writer.write(cv2.cvtColor(np.asarray(frame), cv2.COLOR_RGB2BGR))
        writer.release()
        with open(path, "rb") as f:
            return f.read()
