"""Encoded video bytes -> InternVL frame tiles, frame-identical to vLLM's colocated video path.

vLLM (0.32, its default `opencv` loader) opens the bytes with OpenCV's stream-buffered FFmpeg backend, reads the
frame count and rate (checking the count against an end-of-stream seek, which edit lists can shorten), samples
`num_frames` frame indices uniformly (fewer when `fps` asks for fewer), grabs every frame up to the last index and
keeps the sampled ones in RGB. InternVL then turns each frame into one 448 px tile: the image tiler with a budget of
one tile and no thumbnail. This module does the same with the same library, so the frames, and therefore the
embeddings, are those stock vLLM computes; tests compare the frames with vLLM's loader.

Unlike vLLM, which goes on with the frames it could read, a video that cannot be opened, has no frames, or loses a
sampled frame (corrupt data) is refused: an answer about a video the server did not see is worse than a 400. A clip
cut short is what its container makes of it, as in vLLM: an MP4 without its index cannot be opened (400), an AVI
shows the frames it still has.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from dvd.config import VIDEO_NUM_FRAMES
from dvd.errors import ServiceError
from vision_server.preprocess import Tiled, tile_image

# FFmpeg reports every damaged macroblock of a corrupt clip on stderr (thousands of lines for one bad request); the
# request's error says what matters. An operator can set these to see them.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")


@dataclass(frozen=True)
class VideoLimits:
    max_frames: int  # sampled frames of one video
    max_seconds: float  # duration of one video
    max_pixels: int  # width x height of one frame


@dataclass(frozen=True)
class Sampling:
    """vLLM's `media_io_kwargs["video"]`: `num_frames` (-1 = every frame) and `fps` (> 0: at most duration x fps)."""

    num_frames: int = VIDEO_NUM_FRAMES
    fps: float = -1.0


def sample_indices(total: int, duration: float, sampling: Sampling) -> list[int]:
    """vLLM's `VideoBackend.compute_frames_index_to_sample`: the fewer of num_frames and duration x fps, spread
    uniformly (every frame when that is all of them)."""
    count = total
    if sampling.num_frames > 0:
        count = min(sampling.num_frames, total)
    if sampling.fps > 0:
        count = min(count, math.floor(duration * sampling.fps))
    count = max(1, count)
    if count == total:
        return list(range(count))
    return np.linspace(0, total - 1, count, dtype=int).tolist()


def _open(stream: io.BytesIO):
    """vLLM's `open_video_capture`: the first stream-buffered backend this OpenCV can use (FFmpeg). The caller
    keeps `stream` alive until the capture is released (releasing a capture whose stream is gone crashes)."""
    import cv2
    import cv2.videoio_registry as vr

    api = None
    for backend in vr.getStreamBufferedBackends():
        if not vr.hasBackend(backend):
            continue
        if not vr.isBackendBuiltIn(backend):
            _, abi, version = vr.getStreamBufferedBackendPluginVersion(backend)
            if abi < 1 or (abi == 1 and version < 2):
                continue
        api = backend
        break
    if api is None:
        raise RuntimeError("this OpenCV has no stream-buffered video backend (FFmpeg)")
    cap = cv2.VideoCapture(stream, api, [])
    if not cap.isOpened():
        raise ServiceError("unsupported video format or corrupt data (the decoder could not open it)")
    return cap


def _frame_count(cap) -> int:
    """vLLM's `get_video_metadata` count: the header's, unless an end-of-stream seek proves fewer frames show."""
    import cv2

    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    if total > 0 and cap.set(cv2.CAP_PROP_POS_AVI_RATIO, 1.0):
        visible = int(cap.get(cv2.CAP_PROP_POS_FRAMES))
        at_end = not cap.grab()
        cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        if at_end and 0 < visible < total - 1:
            total = visible
    return total


def decode_video(data: bytes, sampling: Sampling, limits: VideoLimits,
                 convert: Callable[[np.ndarray], Any] = lambda frame: frame) -> tuple[list[Any], int, int]:
    """Bytes -> the sampled RGB frames (uint8, H x W x 3) passed through `convert` as each is read (so full-size
    frames are not all held at once), with the frame width and height."""
    import cv2

    if not data:
        raise ServiceError("empty video data")
    stream = io.BytesIO(data)
    cap = _open(stream)
    try:
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if width <= 0 or height <= 0:
            raise ServiceError(f"video frames have no size ({width}x{height})")
        if width * height > limits.max_pixels:
            raise ServiceError(f"video frames are {width}x{height} = {width * height} pixels, above the limit of "
                               f"{limits.max_pixels}")
        total = _frame_count(cap)
        fps = cap.get(cv2.CAP_PROP_FPS)
        duration = total / fps if fps > 0 else 0.0
        if total <= 0:
            raise ServiceError("the video has no frames the decoder can count")
        if duration > limits.max_seconds:
            raise ServiceError(f"the video lasts {duration:.1f}s, above the limit of {limits.max_seconds:g}s")
        # Every frame up to the last sampled one is decoded: bound that work as well as the duration.
        if total > limits.max_seconds * 120:
            raise ServiceError(f"the video has {total} frames, above the limit of {int(limits.max_seconds * 120)}")
        wanted = sample_indices(total, duration, sampling)
        if len(wanted) > limits.max_frames:
            raise ServiceError(f"{len(wanted)} frames would be sampled from the video, above the limit of "
                               f"{limits.max_frames} (ask for fewer with media_io_kwargs.video.num_frames)")
        return _read(cap, wanted, convert), width, height
    finally:
        cap.release()


def _read(cap, wanted: list[int], convert: Callable[[np.ndarray], Any]) -> list[Any]:
    """vLLM's `_read_frames_no_recovery`: grab each frame in order, retrieve the sampled ones."""
    import cv2

    targets = set(wanted)
    frames: list[Any] = []
    for idx in range(max(wanted) + 1):
        if not cap.grab():
            continue
        if idx in targets:
            ok, frame = cap.retrieve()
            if ok:
                frames.append(convert(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
    if len(frames) < len(targets):
        raise ServiceError(f"truncated or corrupt video: {len(frames)} of the {len(targets)} sampled frames could be "
                           "decoded")
    return frames


def preprocess_video(data: bytes, *, image_size: int, sampling: Sampling, limits: VideoLimits) -> Tiled:
    """Decode, sample and tile one video: one `image_size` tile per sampled frame, no thumbnail (vLLM's
    `video_to_pixel_values_internvl`)."""
    def tile(frame: np.ndarray) -> torch.Tensor:
        return tile_image(Image.fromarray(frame), image_size=image_size, min_num=1, max_num=1,
                          use_thumbnail=False).pixels

    tiles, width, height = decode_video(data, sampling, limits, tile)
    return Tiled(pixels=torch.cat(tiles), width=width, height=height, grid=(1, 1))
