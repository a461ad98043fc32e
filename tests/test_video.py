"""Video through DvD: frames sampled as vLLM samples them, checked against vLLM's own loader and against stock
vLLM's OpenAI server on the same checkpoint (prompt tokens, greedy tokens, logprobs), plus the bad inputs."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import openai
import pytest
import torch

from dvd.errors import ServiceError
from dvd.v2 import llm_pb2_grpc, vision_pb2
from tests.helpers.llm import assert_logprobs_close, chat_request, text, video
from tests.helpers.media import data_url, image_bytes, make_image, video_bytes
from tests.helpers.vision import media
from vision_server.video import Sampling, VideoLimits, decode_video, preprocess_video, sample_indices

pytestmark = pytest.mark.timeout(600)

# Two clips of different lengths, sizes and codecs: MPEG-4 in MP4 (vLLM samples 32 of its 40 frames) and Motion JPEG
# in AVI (all 9 frames).
CLIP_A = video_bytes(320, 240, 40, fps=8, seed=1)
CLIP_B = video_bytes(200, 500, 9, fps=3, seed=2, codec="MJPG", suffix=".avi")
LIMITS = VideoLimits(max_frames=128, max_seconds=600, max_pixels=64_000_000)
CUT_AVI = CLIP_B[: len(CLIP_B) * 6 // 10]  # its index is gone: the frames before the cut remain (vLLM reads 6)
CUT_MP4 = CLIP_A[: len(CLIP_A) * 6 // 10]  # its index (moov) is gone: it cannot be opened
DAMAGED = CLIP_B[: len(CLIP_B) * 3 // 10] + bytes(60000) + CLIP_B[len(CLIP_B) * 3 // 10 + 60000:]  # a frame lost
ARGS: dict[str, Any] = {"max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3,
                        "extra_body": {"ignore_eos": True}}


def video_message(clip: bytes, *, image: bytes | None = None, mime: str = "video/mp4",
                  url: str | None = None) -> list[dict[str, Any]]:
    """A user turn: an image (if given), the clip (as a data: URL, or `url`), a question."""
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(image)}}] if image else []
    parts += [{"type": "video_url", "video_url": {"url": url or data_url(clip, mime)}},
              {"type": "text", "text": "What happens in the video?"}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def client(router_tiny: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=router_tiny, api_key="unused", max_retries=0, timeout=300)


# ---- frames: vLLM's loader is the reference ----

@pytest.mark.parametrize("clip,sampling", [(CLIP_A, Sampling()), (CLIP_B, Sampling()), (CLIP_A, Sampling(4)),
                                           (CLIP_A, Sampling(-1, fps=2.0)), (CUT_AVI, Sampling())],
                         ids=["mp4-32", "avi-all", "mp4-4", "fps", "avi-cut"])
def test_frames_and_pixels_equal_vllm(clip: bytes, sampling: Sampling) -> None:
    """The same frames as vLLM's default (OpenCV) video loader, and the same pixels as its InternVL video processor."""
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.multimodal.media.video import VideoMediaIO
    from vllm.transformers_utils.processors.internvl import video_to_pixel_values_internvl

    kwargs = {"fps": sampling.fps} if sampling.fps > 0 else {}
    ref_frames, _ = VideoMediaIO(ImageMediaIO(), num_frames=sampling.num_frames, **kwargs).load_bytes(clip).media
    ours, width, height = decode_video(clip, sampling, LIMITS)
    assert (width, height) == (ref_frames.shape[2], ref_frames.shape[1])
    assert len(ours) == len(ref_frames) and all(np.array_equal(a, b) for a, b in zip(ours, ref_frames, strict=True))
    ref_pixels = video_to_pixel_values_internvl(ref_frames, input_size=448, min_num=1, max_num=1, use_thumbnail=False)
    assert torch.equal(preprocess_video(clip, image_size=448, sampling=sampling, limits=LIMITS).pixels, ref_pixels)


def test_sample_indices_follow_vllm() -> None:
    from vllm.multimodal.video import VideoBackend
    from vllm.multimodal.video_decoders import VideoSourceMetadata, VideoTargetMetadata

    for total, fps_in, frames, fps in [(40, 8.0, 32, -1), (9, 3.0, 32, -1), (300, 30.0, 16, 0.5), (5, 0.0, -1, -1),
                                       (1000, 25.0, -1, 2.0), (7, 7.0, 7, -1)]:
        source = VideoSourceMetadata(total, fps_in, total / fps_in if fps_in else 0.0)
        ref = VideoBackend.compute_frames_index_to_sample(source, VideoTargetMetadata(frames, fps, 300))
        assert sample_indices(total, source.duration, Sampling(frames, fps)) == ref


def test_bad_videos_are_refused() -> None:
    for data, match in [(b"", "empty"), (b"not a video at all" * 100, "could not open"), (CUT_MP4, "could not open"),
                        (DAMAGED, "truncated or corrupt"), (image_bytes(64, 48), "no frames")]:
        with pytest.raises(ServiceError, match=match):
            decode_video(data, Sampling(), LIMITS)
    with pytest.raises(ServiceError, match="above the limit of 8"):
        decode_video(CLIP_A, Sampling(), VideoLimits(max_frames=8, max_seconds=600, max_pixels=10**8))
    with pytest.raises(ServiceError, match=r"lasts 5\.0s"):
        decode_video(CLIP_A, Sampling(), VideoLimits(max_frames=128, max_seconds=4, max_pixels=10**8))
    with pytest.raises(ServiceError, match="pixels"):
        decode_video(CLIP_A, Sampling(), VideoLimits(max_frames=128, max_seconds=600, max_pixels=320 * 240 - 1))


def test_videos_expand_to_vllm_frame_text() -> None:
    from llm_server.prompt import expand_videos

    prompt = "<|im_start|>user\n<image>\n<video>\n<video>\nWhat?<|im_end|>"
    assert expand_videos(prompt, [2, 1]) == ("<|im_start|>user\n<image>\nFrame1: <image>Frame2: <image>\n"
                                             "Frame1: <image>\nWhat?<|im_end|>")


# ---- end to end: stock vLLM is the reference ----

CASES = {
    "mp4-32-of-40": (video_message(CLIP_A), {}),
    "avi-9": (video_message(CLIP_B, mime="video/x-msvideo"), {}),
    "mp4-num-frames-4": (video_message(CLIP_A), {"media_io_kwargs": {"video": {"num_frames": 4}}}),
    "image-and-video": (video_message(CLIP_B, image=image_bytes(500, 300, seed=5)), {}),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("case", list(CASES))
async def test_video_equals_stock_vllm(router_tiny: str, colocated_tiny: str, case: str, stream: bool) -> None:
    """Same prompt tokens as stock vLLM's server, and the same greedy tokens and logprobs (within 0.05, as the image
    tests) up to a near tie, as vLLM's own tests compare two implementations (tests.helpers.llm)."""
    messages, extra = CASES[case]
    args = {**ARGS, "extra_body": {**ARGS["extra_body"], **extra}}

    async def answer(base: str, model: str) -> tuple[int, list[Any]]:
        c = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=300)
        if not stream:
            reply = await c.chat.completions.create(model=model, messages=messages, **args)
            return reply.usage.prompt_tokens, reply.choices[0].logprobs.content
        chunks = [x async for x in await c.chat.completions.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **args)]
        entries = [e for x in chunks if x.choices and x.choices[0].logprobs for e in x.choices[0].logprobs.content]
        return chunks[-1].usage.prompt_tokens, entries

    ours_tokens, ours = await answer(router_tiny, "tiny")
    ref_tokens, ref = await answer(colocated_tiny, "tiny")
    assert ours_tokens == ref_tokens
    print(f"{case}: prompt_tokens={ours_tokens}, tokens {[e.token for e in ours]} vs {[e.token for e in ref]}")
    assert_logprobs_close(ours, ref, 0.05)


def test_resent_video_is_one_vision_call(client: openai.OpenAI, llm_tiny_metrics: str) -> None:
    """A video resent with the same sampling comes from the embedding cache; other sampling is another entry."""
    import httpx

    def misses() -> float:
        lines = httpx.get(llm_tiny_metrics).text.splitlines()
        return sum(float(x.split()[-1]) for x in lines if x.startswith('dvd_llm_embedding_cache_lookups_total{')
                   and 'result="miss"' in x)

    clip = video_bytes(96, 64, 6, seed=9)
    before = misses()
    first = client.chat.completions.create(model="tiny", messages=video_message(clip), max_tokens=2)
    again = client.chat.completions.create(model="tiny", messages=video_message(clip), max_tokens=2)
    assert misses() == before + 1
    assert first.usage.prompt_tokens == again.usage.prompt_tokens
    fewer = client.chat.completions.create(model="tiny", messages=video_message(clip), max_tokens=2,
                                           extra_body={"media_io_kwargs": {"video": {"num_frames": 2}}})
    assert misses() == before + 2 and fewer.usage.prompt_tokens < first.usage.prompt_tokens


def test_http_video_url_equals_the_data_url(client: openai.OpenAI) -> None:
    """An http(s) video goes through the image fetcher's limits and SSRF rules (this router allows loopback)."""
    from tests.helpers.router import image_server

    args: dict[str, Any] = {"model": "tiny", "max_tokens": 4, "temperature": 0}
    with image_server({"clip.avi": CLIP_B}) as (base, _):
        by_http = client.chat.completions.create(messages=video_message(b"", url=f"{base}/img/clip.avi"), **args)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(messages=video_message(b"", url=f"{base}/missing.avi"), **args)
    assert err.value.code == "image_fetch_failed" and err.value.param == "messages[0].content[0].video_url.url"
    by_data = client.chat.completions.create(messages=video_message(CLIP_B), **args)
    assert (by_http.usage.prompt_tokens, by_http.choices[0].message.content) == \
        (by_data.usage.prompt_tokens, by_data.choices[0].message.content)


VIDEO_PART = "messages[0].content[0].video_url.url"
BAD = {
    "corrupt": (video_message(b"definitely not a video" * 50), {}, "could not open", VIDEO_PART),
    "truncated": (video_message(CUT_MP4), {}, "could not open", VIDEO_PART),
    "damaged": (video_message(DAMAGED), {}, "truncated or corrupt", VIDEO_PART),
    "after-an-image": (video_message(DAMAGED, image=image_bytes(64, 48)), {}, "truncated or corrupt",
                       "messages[0].content[1].video_url.url"),
    "too-many-frames": (video_message(CLIP_A), {"media_io_kwargs": {"video": {"num_frames": 500}}}, "num_frames 500",
                        "media_io_kwargs.video.num_frames"),
    "zero-frames": (video_message(CLIP_A), {"media_io_kwargs": {"video": {"num_frames": 0}}}, "num_frames",
                    "media_io_kwargs.video.num_frames"),
    "image-media-type": (video_message(CLIP_A, mime="image/png"), {}, "is not a video", VIDEO_PART),
    "other-modality-options": (video_message(CLIP_A), {"media_io_kwargs": {"image": {"x": 1}}}, "image",
                               "media_io_kwargs.image"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_videos_are_400s_naming_the_part_and_the_next_request_works(client: openai.OpenAI, case: str) -> None:
    messages, extra, match, param = BAD[case]
    with pytest.raises(openai.BadRequestError, match=match) as err:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, extra_body=extra)
    assert err.value.param == param
    # Sampled at the checkpoint's default temperature, random weights may end at once: ignore_eos keeps the count.
    ok = client.chat.completions.create(model="tiny", messages=video_message(CLIP_B), max_tokens=2,
                                        extra_body={"ignore_eos": True})
    assert ok.usage.completion_tokens == 2 and ok.choices[0].finish_reason == "length"


def tiles_clip() -> tuple[bytes, int]:
    """A lossless clip whose frames are the tiles InternVL cuts from two images (grid tiles, then the thumbnail):
    content the tiny Flash router is known to split (tests/test_llm_server.py's ViR test uses these images)."""
    frames = []
    for width, height, seed in [(1344, 896, 81), (896, 896, 82)]:
        im = make_image(width, height, seed)
        frames += [im.crop((c * 448, r * 448, c * 448 + 448, r * 448 + 448))
                   for r in range(height // 448) for c in range(width // 448)] + [im.resize((448, 448))]
    return video_bytes(448, 448, len(frames), codec="FFV1", suffix=".avi", images=frames), len(frames)


async def test_vir_compresses_frames_on_flash(llm_tiny_flash: str) -> None:
    """On a Flash checkpoint ViR decides per frame (64 or 256 rows); frames of different sizes reach vLLM intact."""
    clip, frames = tiles_clip()

    async def visual_tokens(vir: str) -> int:
        req = chat_request([video(clip), text("Describe.")], max_tokens=2, temperature=0.0, vir=vir)
        async with grpc.aio.insecure_channel(llm_tiny_flash) as channel:
            msgs = [m async for m in llm_pb2_grpc.LanguageServiceStub(channel).Generate(req)]
        assert msgs[-1].usage.completion_tokens == 2
        return msgs[-1].usage.visual_tokens

    full = await visual_tokens("off")
    auto = await visual_tokens("auto")
    assert full == frames * 256
    compressed = (full - auto) // (256 - 64)
    assert (full - auto) % (256 - 64) == 0 and 0 < compressed < frames, f"{compressed} of {frames} frames compressed"


async def test_an_operators_larger_frame_count_still_travels_over_shared_memory(tiny_ckpt) -> None:
    """The language server sizes its shared-memory offer from the frame count the vision server says it samples by
    default, so `--video-num-frames 40` (above the usual 32) sends every frame's tile over shared memory."""
    from llm_server.vision_pool import VisionPool
    from tests.conftest import start_vision

    svc, address = start_vision("vision-40-frames", tiny_ckpt, "--video-num-frames", "40")
    pool = VisionPool((address,), hidden_size=128, timeout_s=60, transport="shm")
    try:
        await pool.start()
        encoded = await pool.encode("frames-40", media([CLIP_A], vision_pb2.MEDIA_KIND_VIDEO),
                                    vision_pb2.EncodeOptions())
        assert sum(s.num_tiles for s in encoded.summary.images) == 40
        assert set(encoded.bytes_by_transport) == {"shm"}, encoded.bytes_by_transport
    finally:
        await pool.close()
        svc.stop()
