"""An EncodeRequest's checks: what can be refused before any work, with the field or file at fault."""

from __future__ import annotations

from dataclasses import dataclass

from dvd.errors import ServiceError
from dvd.v2 import vision_pb2
from vision_server.config import ModelConfig, ServerConfig
from vision_server.video import Sampling

# The client-facing name of EncodeOptions.video: vLLM's request field the gateway takes it from.
VIDEO_PARAM = "media_io_kwargs.video"


@dataclass(frozen=True)
class Checked:
    """What validation found out about a request, for the steps after it."""

    kinds: list[int]  # vision_pb2.MediaKind per file
    max_nums: list[int]  # per file, its most tiles: an image's grid budget, a video's sampled frames (at most)
    sampling: Sampling  # the request's frame sampling, the server's default filled in


def item_name(kind: int, index: int) -> str:
    return f"{'video' if kind == vision_pb2.MEDIA_KIND_VIDEO else 'image'} {index}"


def check(request: vision_pb2.EncodeRequest, cfg: ServerConfig, model: ModelConfig) -> Checked:
    """Refuse what can be refused before any work."""
    n = len(request.images)
    if n == 0:
        raise ServiceError("request has no images")
    media = cfg.media
    if n > media.max_images_per_request:
        raise ServiceError(f"request has {n} images and videos, the limit is {media.max_images_per_request}")
    kinds = media_kinds(request)
    for i, (data, kind) in enumerate(zip(request.images, kinds, strict=True)):
        limit = media.max_video_bytes if kind == vision_pb2.MEDIA_KIND_VIDEO else media.max_image_bytes
        if len(data) > limit:
            raise ServiceError(f"{item_name(kind, i)} is {len(data)} bytes, the limit is {limit}", item=i)
    sampling = video_sampling(request.options.video, cfg)
    model_max = model.max_tiles
    asked = request.options.max_tiles
    if asked > model_max:
        raise ServiceError(f"max_tiles {asked} is above the model's maximum of {model_max}")
    if request.options.vir not in vision_pb2.VirMode.values():
        raise ServiceError(f"unknown vir mode {request.options.vir}")
    if not 0.0 <= request.options.vir_pressure <= 1.0:
        raise ServiceError(f"vir_pressure {request.options.vir_pressure} is not in 0..1")
    caps = list(request.image_max_tiles) or [0] * n
    if len(caps) != n:
        raise ServiceError(f"image_max_tiles has {len(caps)} entries for {n} images")
    if (worst := max(caps)) > model_max:
        raise ServiceError(f"image_max_tiles {worst} is above the model's maximum of {model_max}")
    video_tiles = sampling.num_frames if sampling.num_frames > 0 else cfg.max_video_frames
    return Checked(kinds, [video_tiles if kind == vision_pb2.MEDIA_KIND_VIDEO else c or asked or model_max
                           for c, kind in zip(caps, kinds, strict=True)], sampling)


def media_kinds(request: vision_pb2.EncodeRequest) -> list[int]:
    kinds = list(request.kinds) or [vision_pb2.MEDIA_KIND_IMAGE] * len(request.images)
    if len(kinds) != len(request.images):
        raise ServiceError(f"kinds has {len(kinds)} entries for {len(request.images)} files")
    if unknown := set(kinds) - set(vision_pb2.MediaKind.values()):
        raise ServiceError(f"unknown media kind {min(unknown)}")
    return kinds


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
