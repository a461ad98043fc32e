"""Deterministic test images, encoded the way clients send them (they live in dvd.media, shared with benchmarks)."""

from dvd.media import data_url, image_bytes, make_image

__all__ = ["data_url", "image_bytes", "make_image"]
