"""Deterministic test images and clips, encoded the way clients send them (they live in benchmarks.media, shared with
benchmarks)."""

from benchmarks.media import data_url, image_bytes, make_image, video_bytes

__all__ = ["data_url", "image_bytes", "make_image", "video_bytes"]
