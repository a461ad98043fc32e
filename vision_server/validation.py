"""An EncodeRequest's checks: what can be refused before any work, with the field or file at fault."""

from __future__ import annotations

from dataclasses import dataclass

from dvd.errors import ServiceError
from dvd.media import most_tiles
from dvd.v2 import vision_pb2
from vision_server.config import ModelConfig, ServerConfig
from vision_server.video import Sampling

# The client-facing name of EncodeOptions.video: vLLM's request field the gateway takes it from.
VIDEO_PARAM = "media_io_kwargs.video"


@dataclass(frozen=True)
class Checked:
    """What validation found out about a request, for the steps after it."""

    max_tiles: list[int]  # per file, its most tiles: an image's grid budget, a video's sampled frames (at most)
    sampling: Sampling  # the request's frame sampling, the server's default filled in


def item_name(kind: int, index: int) -> str:
    return f"{'video' if kind == vision_pb2.MEDIA_KIND_VIDEO else 'image'} {index}"


def check(request: vision_pb2.EncodeRequest, cfg: ServerConfig, model: ModelConfig) -> Checked:
    """Refuse what can be refused before any work."""
    n = len(request.media)
    if n == 0:
        raise ServiceError("request has no images or videos")
    media = cfg.media
    if n > media.max_images_per_request:
        raise ServiceError(f"request has {n} images and videos, the limit is {media.max_images_per_request}")
    for i, m in enumerate(request.media):
        if m.kind not in vision_pb2.MediaKind.values():
            raise ServiceError(f"unknown media kind {m.kind}", item=i)
        limit = media.max_video_bytes if m.kind == vision_pb2.MEDIA_KIND_VIDEO else media.max_image_bytes
        if len(m.data) > limit:
            raise ServiceError(f"{item_name(m.kind, i)} is {len(m.data)} bytes, the limit is {limit}", item=i)
    sampling = video_sampling(request.options.video, cfg)
    model_max = model.max_tiles
    asked = request.options.max_tiles
    if asked > model_max:
        raise ServiceError(f"max_tiles {asked} is above the model's maximum of {model_max}")
    if request.options.vir not in vision_pb2.VirMode.values():
        raise ServiceError(f"unknown vir mode {request.options.vir}")
    if not 0.0 <= request.options.vir_pressure <= 1.0:
        raise ServiceError(f"vir_pressure {request.options.vir_pressure} is not in 0..1")
    if (worst := max(m.max_tiles for m in request.media)) > model_max:
        raise ServiceError(f"a file's max_tiles {worst} is above the model's maximum of {model_max}")
    return Checked(most_tiles(request.media, request.options, model_max, cfg.video_num_frames, cfg.max_video_frames),
                   sampling)


def video_sampling(video: vision_pb2.VideoSampling, cfg: ServerConfig) -> Sampling:
    """The request's frame sampling, the server's default filled in; a request for more frames than one request may
    have is refused before any decoding."""
    num_frames = video.num_frames or cfg.video_num_frames
    if num_frames < -1 or num_frames > cfg.max_video_frames:
        raise ServiceError(f"num_frames {num_frames} is not -1 (every frame) or 1..{cfg.max_video_frames}",
                           param=f"{VIDEO_PARAM}.num_frames")
    if not video.fps >= 0 or video.fps == float("inf"):
        raise ServiceError(f"fps {video.fps} is not a finite number >= 0", param=f"{VIDEO_PARAM}.fps")
    return Sampling(num_frames=num_frames, fps=video.fps or -1.0)
