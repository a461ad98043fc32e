"""The media rules both sides of an Encode call apply, written once: how many tiles a file can have at most, so the
vision server admits a request by its worst case and the language server sizes its shared-memory offer by the same
count (the limits themselves, files and bytes per request, are `dvd.config.MediaLimits`)."""

from __future__ import annotations

from collections.abc import Sequence

from dvd.v2 import vision_pb2

# The OpenAI content part that carries each kind of file: its type, and the key its URL is under.
MEDIA_PARTS = {"image_url": vision_pb2.MEDIA_KIND_IMAGE, "video_url": vision_pb2.MEDIA_KIND_VIDEO}


def frames_at_most(asked: int, default_frames: int, max_frames: int) -> int:
    """A video's sampled frames at most: as many as asked, the server's default when not asked (0), its maximum
    for every frame (-1)."""
    return asked if asked > 0 else default_frames if asked == 0 else max_frames


def most_tiles(media: Sequence[vision_pb2.Media], options: vision_pb2.EncodeOptions, model_max_tiles: int,
               default_frames: int, max_frames: int) -> list[int]:
    """Per file, its most tiles: an image's grid budget (its own cap, else the request's, else the model's), a
    video's sampled frames (one tile each)."""
    frames = frames_at_most(options.video.num_frames, default_frames, max_frames)
    return [frames if m.kind == vision_pb2.MEDIA_KIND_VIDEO else m.max_tiles or options.max_tiles or model_max_tiles
            for m in media]


def tiles_bound(media: Sequence[vision_pb2.Media], most: Sequence[int]) -> int:
    """The request's tiles at most: `most_tiles`, plus an image's thumbnail."""
    return sum(n + (m.kind != vision_pb2.MEDIA_KIND_VIDEO) for m, n in zip(media, most, strict=True))
