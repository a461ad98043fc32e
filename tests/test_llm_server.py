"""The language service on the real stack: vLLM with the language model only, embeddings from the vision pool."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from dvd.errors import ServiceError
from dvd.procs import Service
from dvd.v2 import llm_pb2, llm_pb2_grpc, vision_pb2
from llm_server.fetch import validate_embeddings
from llm_server.request import parse_request
from llm_server.vision_pool import VisionPool
from tests.helpers.llm import answer, chat_request, generate, health, image, stock_vllm_tokens, text
from tests.helpers.media import image_bytes
from tests.helpers.router import user_message
from tests.helpers.vision import media

pytestmark = pytest.mark.timeout(600)


async def test_vision_tower_is_not_loaded(llm_tiny: str) -> None:
    h = await health(llm_tiny)
    assert h.ready
    assert h.metadata.vision_parameters == 0, "the language engine built vision weights"


async def test_the_engine_sleeps_between_steps_instead_of_spinning(llm_tiny: str,
                                                                   llm_tiny_service: Service) -> None:
    """vLLM's queue readers spin on sched_yield for 1 s after every message, a core each (its worker and its
    scheduler); on CPU hosts the plugin makes them sleep instead (dvd.procs.CPU_SHM_POLL_S). Inside that second,
    right after a request, the whole language server must use a small share of one core."""
    service = llm_tiny_service
    await generate(llm_tiny, [text("Hi")], max_tokens=2)
    before, t0 = service.cpu_seconds(), time.monotonic()
    await asyncio.sleep(0.6)
    cores = (service.cpu_seconds() - before) / (time.monotonic() - t0)
    assert cores < 0.25, f"an idle language server used {cores:.2f} cores in its engine's first idle second"


async def test_text_only_skips_the_vision_pool(llm_tiny: str) -> None:
    tokens, final = await generate(llm_tiny, [text("Tell me about the sky")])
    assert len(tokens) == 16
    assert final.usage.visual_tokens == 0 and final.timings.embedding_bytes == 0
    assert final.usage.completion_tokens == 16


async def test_two_images_of_different_sizes(llm_tiny: str) -> None:
    """vLLM's ragged-embedding bug would kill the EngineCore here; the plugin fixes it."""
    parts = [image(image_bytes(448, 448, seed=1)), image(image_bytes(900, 500, seed=2)), text("Compare them.")]
    tokens, final = await generate(llm_tiny, parts)
    assert len(tokens) == 16
    # 1 tile (256) + 2x1 grid + thumbnail (3 x 256) on a non-Flash model
    assert final.usage.visual_tokens == 256 + 3 * 256
    assert final.timings.embedding_bytes == (256 + 3 * 256) * 128 * 2
    assert (await health(llm_tiny)).ready


async def test_repeated_image_hits_the_prefix_cache(llm_tiny: str) -> None:
    parts = [image(image_bytes(640, 480, seed=3)), text("What is this?")]
    first, _ = await generate(llm_tiny, parts)
    second, final = await generate(llm_tiny, parts)
    assert first == second
    assert final.usage.cached_prompt_tokens >= 256


def _cache_lookups(metrics_url: str) -> dict[str, float]:
    import httpx

    out = {"hit": 0.0, "miss": 0.0, "shared": 0.0}
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("dvd_llm_embedding_cache_lookups_total{"):
            out[line.split('result="')[1].split('"')[0]] = float(line.split(" ")[-1])
    return out


async def test_resent_image_costs_no_vision_call(llm_tiny: str, llm_tiny_metrics: str) -> None:
    """Concurrent requests for one new image share one vision call; a resend is served from the cache."""
    parts = [image(image_bytes(700, 500, seed=4242)), text("What is this?")]
    before = _cache_lookups(llm_tiny_metrics)
    first = await asyncio.gather(*(generate(llm_tiny, parts) for _ in range(3)))
    mid = _cache_lookups(llm_tiny_metrics)
    assert mid["miss"] - before["miss"] == 1
    assert (mid["hit"] - before["hit"]) + (mid["shared"] - before["shared"]) == 2
    rows = first[0][1].usage.visual_tokens
    assert sum(f.timings.embedding_bytes for _, f in first) == rows * 128 * 2  # one transfer for three requests
    tokens, final = await generate(llm_tiny, parts)
    assert final.timings.embedding_bytes == 0 and final.usage.visual_tokens == rows
    assert tokens == first[0][0]
    assert _cache_lookups(llm_tiny_metrics)["hit"] - mid["hit"] == 1


@pytest.mark.parametrize("sizes", [[(448, 448)], [(1000, 600)], [(300, 1200)], [(640, 480), (256, 1024)],
                                   [(1344, 896), (500, 500), (2000, 300)]],
                         ids=["square", "wide", "tall", "two-images", "three-images"])
async def test_tokens_equal_stock_vllm_colocated(llm_tiny: str, colocated_tiny: str,
                                                 sizes: list[tuple[int, int]]) -> None:
    """Greedy tokens of DvD == stock vLLM serving the full checkpoint with its own vision path."""
    # Images no other test sends: a prefix-cache hit on one side only may legitimately change a near-tie argmax.
    images = [image_bytes(w, h, seed=7000 + 10 * len(sizes) + i) for i, (w, h) in enumerate(sizes)]
    question = "Describe the image in detail."
    dvd_tokens, _ = await generate(llm_tiny, [*(image(b) for b in images), text(question)], max_tokens=24)
    assert await stock_vllm_tokens(colocated_tiny, images, question, max_tokens=24) == dvd_tokens


async def test_bad_requests_are_rejected_and_the_engine_keeps_serving(llm_tiny: str) -> None:
    bad = [
        [text("a literal <image> placeholder without an image")],
        [image(b"definitely not an image"), text("?")],
        [image(image_bytes(64, 64)[:40]), text("truncated")],
    ]
    for parts in bad:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate(llm_tiny, parts)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:  # longer than the 16384-token context
        await generate(llm_tiny, [text("hi")], max_tokens=20000)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_model_len" in info.value.details()  # vLLM's own renderer's message
    with pytest.raises(grpc.aio.AioRpcError) as info:  # 6 full-size images x 13 tiles x 256 > 16384 tokens
        await generate(llm_tiny, [*(image(image_bytes(1792, 1344, seed=s)) for s in range(6)), text("?")])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    tokens, _ = await generate(llm_tiny, [image(image_bytes(448, 448)), text("still alive?")])
    assert len(tokens) == 16


async def test_cancel_aborts_the_vllm_request(llm_tiny: str) -> None:
    req = chat_request([text("Write forever")], max_tokens=5000, ignore_eos=True, temperature=0.0, stream=True)
    async with grpc.aio.insecure_channel(llm_tiny) as channel:
        call = llm_pb2_grpc.LanguageServiceStub(channel).Generate(req)
        got = 0
        while got < 3:  # read() rather than `async for ... break`: leaving the iterator may cancel the call itself
            msg = await call.read()
            assert msg is not grpc.aio.EOF
            got += msg.tokens
        assert (await health(llm_tiny)).running_requests >= 1
        call.cancel()
    for _ in range(50):
        if (await health(llm_tiny)).running_requests == 0:
            break
        await asyncio.sleep(0.2)
    assert (await health(llm_tiny)).running_requests == 0


async def test_n_and_seed_sampling(llm_tiny: str) -> None:
    req = chat_request([text("Tell me a story")], max_tokens=8, temperature=1.0, seed=7, n=3, return_token_ids=True)
    reply, last = await answer(llm_tiny, req)
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert all(len(c["token_ids"]) == 8 and c["finish_reason"] == "length" for c in reply["choices"])
    assert last.usage.completion_tokens == reply["usage"]["completion_tokens"] == 24


async def test_vision_pool_skips_a_dead_server(vision_tiny: str) -> None:
    from tests.conftest import free_port

    dead = f"127.0.0.1:{free_port()}"
    pool = VisionPool((dead, vision_tiny), hidden_size=128, timeout_s=30)
    await pool.start()
    try:
        encoded = await pool.encode("r1", media([image_bytes(500, 500)]), vision_pb2.EncodeOptions())
        assert encoded.server == vision_tiny
        assert [e.shape for e in encoded.embeddings] == [torch.Size([256, 128])]
    finally:
        await pool.close()
    pool = VisionPool((dead,), hidden_size=128, timeout_s=5)
    await pool.start()
    try:
        with pytest.raises(ServiceError) as err:
            await pool.encode("r2", media([image_bytes(500, 500)]), vision_pb2.EncodeOptions())
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await pool.close()


async def test_vision_pool_refuses_a_server_of_another_model(vision_tiny: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    pool = VisionPool((vision_tiny,), hidden_size=512, timeout_s=10)
    await pool.start()
    try:
        assert pool.ready_count == 0
        with pytest.raises(ServiceError, match="no vision server could") as err:
            await pool.encode("r3", media([image_bytes(500, 500)]), vision_pb2.EncodeOptions())
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        # The reason stays inside: the operator's log has it, the client's message does not.
        assert "hidden size" not in err.value.message
        assert any("hidden size" in str(getattr(r, "error", "")) for r in caplog.records)
    finally:
        await pool.close()


def test_validate_embeddings() -> None:
    good = torch.zeros(256, 128, dtype=torch.bfloat16)
    validate_embeddings([good, torch.zeros(64, 128)], 2)
    cases = {
        "placeholders": ([good], 2),
        "image 1: embeddings contain NaN": ([good, torch.full((4, 128), float("nan"))], 2),
        "image 0: embeddings contain NaN or infinity": ([torch.full((4, 128), float("inf"))], 1),
    }
    for message, (embeddings, placeholders) in cases.items():
        with pytest.raises(ServiceError, match=message):
            validate_embeddings(embeddings, placeholders)


@pytest.mark.parametrize("fields", [
    {}, {"stream": True, "stream_options": {"include_usage": True}}, {"n": 3, "stop": "x"}, {"stop": ["a", "b"]},
    {"max_tokens": 5, "max_completion_tokens": 5, "temperature": 0, "top_p": 0.5, "seed": 1},
    {"presence_penalty": 1, "frequency_penalty": -1, "user": "u", "response_format": {"type": "text"}},
    {"ignore_eos": True, "min_tokens": 2, "top_k": 5, "repetition_penalty": 1.1, "min_p": 0.1, "stop_token_ids": [3]},
    {"mm_processor_kwargs": {"max_dynamic_patch": 4}, "vir": "off", "max_dynamic_patch": 4},
    {"logprobs": False, "tool_choice": "none", "logit_bias": {"1": 1.0}, "best_of": None, "store": False},
    {"logprobs": True}, {"logprobs": True, "top_logprobs": 20}, {"metadata": {"a": "b"}, "echo": False},
    {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto", "parallel_tool_calls": False},
    {"chat_template_kwargs": {"enable_thinking": False}, "include_reasoning": False, "reasoning_effort": "none"},
    {"media_io_kwargs": {"video": {"num_frames": -1, "fps": 2.5}}}, {"media_io_kwargs": {"video": {}}},
])
def test_accepted_requests(fields: dict) -> None:
    request = chat_request([image(b"x"), text("hi")], **fields)
    openai, _ = parse_request(request.chat_request)
    openai.to_sampling_params(5, {})


TOOL_TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
              {"role": "tool", "content": "x", "tool_call_id": "1"}]


@pytest.mark.parametrize(("fields", "param"), [
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "logprobs"),  # above --max-logprobs: vLLM's engine names it so
    ({"tools": {"type": "function"}}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),  # without --enable-auto-tool-choice
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"best_of": 2}, "best_of"),
    ({"echo": True}, "echo"),
    ({"guided_json": {}}, "guided_json"),
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": 20000}, "max_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: true
    ({"stream": True, "stream_options": {"include_usage": "sometimes"}}, "stream_options.include_usage"),
    ({"vir": "sometimes"}, "vir"),
    ({"max_dynamic_patch": 41}, "max_dynamic_patch"),
    ({"mm_processor_kwargs": {"min_dynamic_patch": 2}}, "mm_processor_kwargs.min_dynamic_patch"),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": TOOL_TURNS[1]["tool_calls"]}]},
     "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": ""}}]}]},
     "messages[0].content[0]"),
    ({"messages": [user_message({"type": "image_url", "image_url": {"url": "", "uuid": "u"}})]},
     "messages[0].content[0].image_url.uuid"),
    ({"messages": [user_message({"type": "video_url"})]}, "messages[0].content[0]"),
    ({"media_io_kwargs": {"video": {"num_frames": 0}}}, "media_io_kwargs.video.num_frames"),
    ({"media_io_kwargs": {"video": {"fps": 0}}}, "media_io_kwargs.video.fps"),
    ({"media_io_kwargs": {"video": {"backend": "torchcodec"}}}, "media_io_kwargs.video.backend"),
    ({"media_io_kwargs": {"image": {"size": 1}}}, "media_io_kwargs.image"),
])
async def test_refused_requests_name_the_field(llm_tiny: str, fields: dict, param: str) -> None:
    """Checked by vLLM's own request type where it has the rule, by ours where DvD has its own (vision options,
    content parts), or refused because this server does not do it: never silently ignored."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate_raw(llm_tiny, chat_request([text("hi")], **({"max_tokens": 1} | fields)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert dict(info.value.trailing_metadata() or ()).get("dvd-param") == param, info.value.details()


async def test_files_and_parts_must_match(llm_tiny: str) -> None:
    extra = chat_request([text("hi")])
    extra.media.append(image(b"x"))  # a file without its part
    mismatched = chat_request([image(b"x"), text("hi")])
    mismatched.media[0].kind = vision_pb2.MEDIA_KIND_VIDEO  # a video where the part says image
    for request, param in ((extra, "messages"), (mismatched, "messages[0].content[0].image_url.url")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate_raw(llm_tiny, request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(info.value.trailing_metadata() or ()).get("dvd-param") == param


async def generate_raw(address: str, request: llm_pb2.GenerateRequest) -> list[llm_pb2.GenerateResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        return [m async for m in llm_pb2_grpc.LanguageServiceStub(channel).Generate(request)]


async def test_metrics_cover_vision_wait_bytes_and_vllm(llm_tiny: str, llm_tiny_metrics: str) -> None:
    import httpx

    await generate(llm_tiny, [image(image_bytes(500, 400, seed=41)), text("metrics?")], max_tokens=2)
    body = httpx.get(llm_tiny_metrics, timeout=10).text
    samples = {line.split(" ")[0]: float(line.split(" ")[-1]) for line in body.splitlines()
               if line and not line.startswith("#")}
    assert samples['dvd_llm_vision_wait_seconds_count{model_name="tiny"}'] >= 1
    # Same host: the bytes took shared memory.
    assert samples['dvd_llm_embedding_bytes_total{model_name="tiny",transport="shm"}'] >= 256 * 128 * 2
    assert any(name.startswith("vllm:") for name in samples), "vLLM's own metrics are not exposed"


async def test_flash_router_end_to_end(llm_tiny_flash: str) -> None:
    """DvD + ViR: compressed tiles (64 rows) and full tiles (256) mixed in one request reach vLLM intact."""

    async def visual_tokens(vir: str, images: list[bytes]) -> tuple[int, int]:
        req = chat_request([*(image(b) for b in images), text("Describe.")], max_tokens=4, temperature=0.0, vir=vir)
        async with grpc.aio.insecure_channel(llm_tiny_flash) as channel:
            msgs = [m async for m in llm_pb2_grpc.LanguageServiceStub(channel).Generate(req)]
        return msgs[-1].usage.visual_tokens, msgs[-1].usage.completion_tokens

    images = [image_bytes(1344, 896, seed=81), image_bytes(896, 896, seed=82)]  # 6+1 and 4+1 tiles
    tiles = 7 + 5
    full, generated = await visual_tokens("off", images)
    assert (full, generated) == (tiles * 256, 4)
    auto, generated = await visual_tokens("auto", images)
    compressed = (full - auto) // (256 - 64)
    assert generated == 4 and (full - auto) % (256 - 64) == 0
    assert 0 < compressed < tiles, f"the router compressed {compressed} of {tiles} tiles"
    assert (await visual_tokens("auto", images))[0] == auto  # deterministic
    assert (await visual_tokens("auto", [image_bytes(448, 448)]))[0] == 256  # one tile: never


async def test_vision_pool_deadline_is_a_timeout_not_a_retry(vision_tiny: str) -> None:
    pool = VisionPool((vision_tiny,), hidden_size=128, timeout_s=0.05)
    await pool.start()
    try:
        with pytest.raises(ServiceError) as err:
            await pool.encode("r-slow", media([image_bytes(1792, 1344, seed=s) for s in range(3)]),
                              vision_pb2.EncodeOptions())
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await pool.close()


async def test_full_vision_queue_is_back_pressure(tiny_ckpt) -> None:
    """A vision server refuses work it could not queue before decoding it; the pool reports "busy", not "down"."""
    from tests.conftest import start_vision

    small, address = start_vision("vision-small-queue", tiny_ckpt, "--max-queue-tiles", "8")
    pool = VisionPool((address,), hidden_size=128, timeout_s=30)
    await pool.start()
    try:
        with pytest.raises(ServiceError, match="at capacity") as err:  # 2 images x (12 + 1) tiles could not fit
            await pool.encode("r-big", media([image_bytes(448, 448)] * 2), vision_pb2.EncodeOptions())
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = await pool.encode("r-ok", media([image_bytes(448, 448)]), vision_pb2.EncodeOptions(max_tiles=1))
        assert ok.embeddings[0].shape == (256, 128)
    finally:
        await pool.close()
        small.stop()
