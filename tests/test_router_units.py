"""Router pieces that need no language server: request schema, image loading and its SSRF guard, translation."""

from __future__ import annotations

import asyncio
import ipaddress
import json

import pytest

from dvd.config import MediaLimits
from dvd.v1 import llm_pb2, vision_pb2
from router.backends import affinity_key
from router.errors import APIError
from router.images import FetchLimits, ImageError, ImageLoader, decode_data_url, is_public_address, public_addresses
from router.limits import Limiter
from router.schemas import parse_chat_request
from router.translate import ChunkBuilder, CompletionBuilder, media_urls, to_generate_request
from tests.helpers.router import data_url, image_server, png_bytes, user_message

IMG = png_bytes()


def body(**fields: object) -> bytes:
    return json.dumps({"model": "m", "messages": [user_message("hi", images=(data_url(IMG),))], **fields}).encode()


# ---- schema ----

@pytest.mark.parametrize("fields", [
    {}, {"stream": True, "stream_options": {"include_usage": True}}, {"n": 3, "stop": "x"}, {"stop": ["a", "b"]},
    {"max_tokens": 5, "max_completion_tokens": 5, "temperature": 0, "top_p": 0.5, "seed": 1},
    {"presence_penalty": 1, "frequency_penalty": -1, "user": "u", "response_format": {"type": "text"}},
    {"ignore_eos": True, "min_tokens": 2, "top_k": 5, "repetition_penalty": 1.1, "min_p": 0.1, "stop_token_ids": [3]},
    {"mm_processor_kwargs": {"max_dynamic_patch": 4}, "vir": "off", "max_dynamic_patch": 4},
    {"logprobs": False, "tools": [], "tool_choice": "none", "logit_bias": {}, "best_of": None, "store": False},
    {"logprobs": True}, {"logprobs": True, "top_logprobs": 20},
    {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto", "parallel_tool_calls": False},
    {"chat_template_kwargs": {"enable_thinking": False}, "include_reasoning": False},
    {"media_io_kwargs": {"video": {"num_frames": -1, "fps": 2.5}}}, {"media_io_kwargs": {"video": {}}},
    {"messages": [user_message({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}})]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                  {"role": "tool", "content": "x", "tool_call_id": "1"}]},
])
def test_accepted_requests(fields: dict) -> None:
    parse_chat_request(body(**fields))


@pytest.mark.parametrize(("fields", "param"), [
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"tool_choice": 3}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
    ({"best_of": 2}, "best_of"),
    ({"guided_json": {}}, "guided_json"),
    ({"temperature": 3}, "temperature"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"vir": "sometimes"}, "vir"),
    ({"mm_processor_kwargs": {"min_dynamic_patch": 2}}, "mm_processor_kwargs.min_dynamic_patch"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0]"),
    ({"messages": [user_message({"type": "image_url", "image_url": {"url": "x", "uuid": "u"}})]},
     "messages[0].content[0].image_url.uuid"),
    ({"messages": [user_message({"type": "video_url"})]}, "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}]},
     "messages[0]"),
    ({"media_io_kwargs": {"video": {"num_frames": 0}}}, "media_io_kwargs.video.num_frames"),
    ({"media_io_kwargs": {"video": {"num_frames": -2}}}, "media_io_kwargs.video.num_frames"),
    ({"media_io_kwargs": {"video": {"fps": 0}}}, "media_io_kwargs.video.fps"),
    ({"media_io_kwargs": {"video": {"backend": "torchcodec"}}}, "media_io_kwargs.video.backend"),
    ({"media_io_kwargs": {"image": {"size": 1}}}, "media_io_kwargs.image"),
])
def test_refused_requests_name_the_field(fields: dict, param: str) -> None:
    with pytest.raises(APIError) as err:
        parse_chat_request(body(**fields))
    assert err.value.param == param
    assert param.split(".")[-1].split("[")[0] in err.value.message


def test_refused_request_without_a_field() -> None:
    for raw in (b"{not json", b"[]", body(stream_options={"include_usage": True})):
        with pytest.raises(APIError):
            parse_chat_request(raw)


# ---- translation ----

def test_to_generate_request_keeps_order_and_options() -> None:
    req = parse_chat_request(json.dumps({
        "model": "m", "n": 2, "stop": "END", "max_completion_tokens": 7, "temperature": 0.0, "seed": 3,
        "top_k": 4, "vir": "off", "mm_processor_kwargs": {"max_dynamic_patch": 2},
        "messages": [{"role": "developer", "content": "be brief"},
                     user_message("compare", images=("data:a", "data:b")),
                     {"role": "assistant", "content": "ok"},
                     user_message("and this", images=("data:c",))]}).encode())
    assert [u for u, _, _ in media_urls(req)] == ["data:a", "data:b", "data:c"]
    assert media_urls(req)[2][1:] == ("messages[3].content[0].image_url.url", "image")
    g = to_generate_request(req, [b"A", b"B", b"C"], "rid")
    assert [m.role for m in g.messages] == ["system", "user", "assistant", "user"]
    assert [p.WhichOneof("part") for p in g.messages[1].content] == ["image", "image", "text"]
    assert g.messages[1].content[1].image == b"B" and g.messages[3].content[0].image == b"C"
    s = g.sampling
    assert (s.n, list(s.stop), s.max_tokens, s.temperature, s.seed, s.top_k) == (2, ["END"], 7, 0.0, 3, 4)
    assert not s.HasField("top_p") and not s.HasField("ignore_eos")  # unset means vLLM's default
    assert g.vision.vir == vision_pb2.VIR_MODE_OFF and g.vision.max_dynamic_patch == 2
    assert not g.vision.HasField("video")


def test_videos_travel_in_order_with_their_sampling() -> None:
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    req = parse_chat_request(json.dumps({
        "model": "m", "media_io_kwargs": {"video": {"num_frames": 8, "fps": 1.5}},
        "messages": [user_message(video, "and", images=("data:a",))]}).encode())
    assert [(param, kind) for _, param, kind in media_urls(req)] == [
        ("messages[0].content[0].image_url.url", "image"), ("messages[0].content[1].video_url.url", "video")]
    g = to_generate_request(req, [b"I", b"V"], "rid")
    assert [p.WhichOneof("part") for p in g.messages[0].content] == ["image", "video", "text"]
    assert g.messages[0].content[1].video == b"V"
    assert (g.vision.video.num_frames, g.vision.video.fps) == (8, 1.5)


def _response(*deltas: tuple[int, str, str], usage: tuple[int, int] | None = None) -> llm_pb2.GenerateResponse:
    r = llm_pb2.GenerateResponse(choices=[llm_pb2.ChoiceDelta(index=i, text=t, finish_reason=f) for i, t, f in deltas])
    if usage:
        r.usage.prompt_tokens, r.usage.completion_tokens = usage
    return r


def test_interleaved_choices_are_reassembled() -> None:
    stream = [_response((0, "a", ""), (1, "x", "")), _response((1, "y", "length")),
              _response((0, "b", "stop"), usage=(10, 4))]
    builder = CompletionBuilder("id", "m", 2)
    for r in stream:
        builder.feed(r)
    done = builder.build(stream[-1].usage)
    assert [(c.message.content, c.finish_reason) for c in done.choices] == [("ab", "stop"), ("xy", "length")]
    assert (done.usage.prompt_tokens, done.usage.total_tokens) == (10, 14)

    chunks = ChunkBuilder("id", "m", 2, include_usage=True)
    out = [*chunks.start(), *(c for r in stream for c in chunks.feed(r)), *chunks.end(stream[-1].usage)]
    assert [c.choices[0].delta.role for c in out[:2]] == ["assistant", "assistant"]
    assert out[-1].choices == [] and out[-1].usage.completion_tokens == 4
    finishes = [(c.choices[0].index, c.choices[0].finish_reason)
                for c in out if c.choices and c.choices[0].finish_reason]
    assert finishes == [(1, "length"), (0, "stop")]
    assert "role" not in json.loads(out[3].model_dump_json())["choices"][0]["delta"]


# ---- images ----

def test_data_urls() -> None:
    assert decode_data_url(data_url(IMG), 10**6) == IMG
    assert decode_data_url(data_url(IMG).rstrip("="), 10**6) == IMG  # missing padding is tolerated
    for bad, code in [("data:image/png;base64,@@@not-base64", "invalid_base64"),
                      ("data:image/png,rawbytes", "invalid_image"),
                      ("data:text/html;base64,PGgxPg==", "invalid_image"),
                      (data_url(b"x" * 2000), "image_too_large")]:
        with pytest.raises(ImageError) as err:
            decode_data_url(bad, 1000)
        assert err.value.code == code and err.value.status == 400
    clip = data_url(b"\x00\x00\x00\x18ftypmp42", "video/mp4")
    assert decode_data_url(clip, 10**6, "video") == b"\x00\x00\x00\x18ftypmp42"
    for bad, kind, code in [(data_url(IMG), "video", "invalid_image"), (clip, "image", "invalid_image"),
                            (data_url(b"x" * 2000, "video/webm"), "video", "video_too_large")]:
        with pytest.raises(ImageError, match=r"not a|larger") as err:
            decode_data_url(bad, 1000, kind)
        assert err.value.code == code


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
    "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
    "2002:7f00:1::1", "64:ff9b::a00:1", "2001:db8::1",
])
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2002:808:808::1"])
def test_public_addresses_pass(address: str) -> None:
    assert is_public_address(address)


async def test_resolution_checks_every_address() -> None:
    with pytest.raises(ImageError) as err:
        await public_addresses("localhost", 80)
    assert err.value.code == "image_url_forbidden"
    assert await public_addresses("127.0.0.1", 80, allowed=lambda ip: True) == [ipaddress.ip_address("127.0.0.1")]


async def _load(loader: ImageLoader, url: str) -> bytes:
    try:
        return await loader.load(url, "p")
    finally:
        await loader.aclose()


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x.png", "http://10.0.0.1/x.png", "http://169.254.169.254/x",
                                 "http://[::1]:9/x.png", "http://localhost:9/x.png", "https://[fe80::1]/x"])
async def test_private_targets_refused_by_default(url: str) -> None:
    with pytest.raises(ImageError) as err:
        await _load(ImageLoader(FetchLimits(timeout=2)), url)
    assert err.value.code == "image_url_forbidden" and err.value.param == "p"


async def test_fetch_limits_and_redirects() -> None:
    with image_server({"a.png": IMG}) as (base, _):
        assert await _load(ImageLoader(FetchLimits(allow_private=True)), f"{base}/img/a.png") == IMG
        redirect = f"{base}/redirect?to=/img/a.png"
        assert await _load(ImageLoader(FetchLimits(allow_private=True)), redirect) == IMG
        cases = [(FetchLimits(allow_private=True), f"{base}/missing", "image_fetch_failed"),
                 (FetchLimits(allow_private=True, timeout=0.5), f"{base}/slow", "image_fetch_failed"),
                 (FetchLimits(allow_private=True, media=MediaLimits(max_image_bytes=1000)), f"{base}/big",
                  "image_too_large"),
                 (FetchLimits(allow_private=True, max_redirects=0), redirect, "image_fetch_failed"),
                 (FetchLimits(allow_private=True), "ftp://example.com/a.png", "invalid_image_url")]
        for limits, url, code in cases:
            with pytest.raises(ImageError) as err:
                await _load(ImageLoader(limits), url)
            assert err.value.code == code, (url, err.value.message)


async def test_every_redirect_hop_is_checked_and_the_checked_address_is_used() -> None:
    """Only loopback counts as 'public' here: hops to it pass, pinned to the checked address; others are refused."""
    def loopback_only() -> ImageLoader:
        return ImageLoader(FetchLimits(), allowed=lambda ip: ip.is_loopback)

    with image_server({"a.png": IMG}) as (base, hosts):
        port = base.rsplit(":", 1)[1]
        assert await _load(loopback_only(), f"{base}/img/a.png") == IMG
        # 'localhost' resolves to checked loopback addresses; the connection goes to one, Host keeps the name.
        assert await _load(loopback_only(), f"http://localhost:{port}/redirect?to=/img/a.png") == IMG
        assert hosts[-2:] == [f"localhost:{port}"] * 2
        for target in ("http://10.0.0.1/img/a.png", "http://169.254.169.254/latest/meta-data",
                       "http://[fd00::1]/x.png"):
            with pytest.raises(ImageError) as err:
                await _load(loopback_only(), f"{base}/redirect?to={target}")
            assert err.value.code == "image_url_forbidden", err.value.message


async def test_per_request_image_count_and_total_size_are_capped() -> None:
    url = data_url(IMG)
    loader = ImageLoader(FetchLimits(media=MediaLimits(max_images_per_request=3), max_total_bytes=2 * len(IMG) + 1))
    try:
        assert await loader.load_all([(url, "a", "image"), (url, "b", "image")]) == [IMG, IMG]
        with pytest.raises(ImageError, match="at most 3") as too_many:
            await loader.load_all([(url, "m", "image")] * 4)
        assert too_many.value.status == 400 and too_many.value.code == "too_many_images"
        with pytest.raises(ImageError, match="in total") as too_big:
            await loader.load_all([(url, "m", "image")] * 3)
        assert too_big.value.code == "images_too_large"
    finally:
        await loader.aclose()


def test_sampling_fields_are_listed_once_from_the_proto() -> None:
    """Every pass-through field exists on the OpenAI request model and reaches the proto under its name."""
    from dvd.sampling import PASS_THROUGH
    from router.schemas import ChatCompletionRequest

    assert "temperature" in PASS_THROUGH and "max_tokens" not in PASS_THROUGH and "n" not in PASS_THROUGH
    assert set(PASS_THROUGH) <= set(ChatCompletionRequest.model_fields)


async def test_refused_clients_get_turns_spaced_like_finishing_requests() -> None:
    limiter = Limiter(concurrency=2, queue=4)
    limiter.reserve()
    first = await limiter.take()
    limiter.reserve()
    second = await limiter.take()
    limiter.release(first - 2.0)  # as if held 2 s: the running mean (1 s before any) moves a fifth of the way
    assert 1.19 < limiter.hold_s < 1.21
    limiter.hold_s = 0.8
    for _ in range(5):  # 1 slot free + the 4 queue places
        limiter.reserve()
    queued = [asyncio.create_task(limiter.take()) for _ in range(5)]
    await asyncio.sleep(0)
    waits = []
    for _ in range(50):
        with pytest.raises(APIError) as refused:
            limiter.reserve()
        headers = refused.value.headers
        waits.append(int(headers["retry-after-ms"]))
        assert refused.value.status == 429 and int(headers["Retry-After"]) == max(1, -(-waits[-1] // 1000))
    # A request finishes every 0.8 s / 2 slots = 0.4 s: the first turn comes when half the queue (2 places) has
    # drained, 0.8 s, each next one 0.4 s later (jittered +-10%), up to the 60 s the openai clients accept.
    for k, wait in enumerate(waits):
        assert 0.9 * (800 + 400 * k) - 1 <= wait <= min(1.1 * (800 + 400 * k) + 1, 60_000)
    assert waits[-1] > 18_000  # 20.4 s less its jitter: turns keep their spacing, they do not bunch up
    for task in queued[1:]:
        task.cancel()
        limiter.unreserve()  # as the gateway gives back the place of a request that ends while queued
    await asyncio.gather(*queued[1:], return_exceptions=True)
    limiter.release(second)
    limiter.release(await queued[0])
    assert limiter.active == 0 and limiter.waiting == 0


async def test_a_queue_place_is_held_while_images_load_and_given_back_on_any_end() -> None:
    limiter = Limiter(concurrency=1, queue=1)
    limiter.reserve()
    running = await limiter.take()
    limiter.reserve()  # a request loading its images: it holds the one queue place, not the slot
    assert (limiter.active, limiter.waiting) == (1, 1)
    with pytest.raises(APIError):  # slot and queue place both taken
        limiter.reserve()
    waiting = asyncio.create_task(limiter.take())
    await asyncio.sleep(0)
    waiting.cancel()  # the client left while queued: the place is still held until given back
    await asyncio.gather(waiting, return_exceptions=True)
    assert limiter.waiting == 1
    limiter.unreserve()
    limiter.reserve()
    taking = asyncio.create_task(limiter.take())
    await asyncio.sleep(0)
    limiter.release(running)
    granted = await taking  # the queue place became the slot
    assert (limiter.active, limiter.waiting) == (1, 0)
    limiter.release(granted)
    assert (limiter.active, limiter.waiting) == (0, 0)


@pytest.mark.parametrize(("code", "status"), [("UNAVAILABLE", 503), ("INTERNAL", 500), ("UNKNOWN", 500),
                                              ("DEADLINE_EXCEEDED", 504), ("FAILED_PRECONDITION", 503),
                                              ("CANCELLED", 503)])
def test_server_side_grpc_errors_name_nothing_inside(code: str, status: int) -> None:
    """gRPC's own details for a dead backend name its address; the client gets the status and a fixed message. A
    call the backend cancelled (it stopped before finishing it) is a 503 to retry, not the client's 499: a client
    that left gets no answer at all (router/completions.py)."""
    import grpc

    details = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:10.1.2.3:50061: Connection refused; "
               "vision server dvd-vision-0.dvd-vision:50051 unreachable")
    error = grpc.aio.AioRpcError(grpc.StatusCode[code], grpc.aio.Metadata(), grpc.aio.Metadata(), details)
    api = APIError.from_grpc(error)
    assert api.status == status
    assert "10.1.2.3" not in api.message and "50061" not in api.message and "dvd-vision" not in api.message
    assert "10.1.2.3" not in json.dumps(api.body())


def test_request_errors_keep_the_language_servers_message() -> None:
    import grpc

    error = grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(),
                                 grpc.aio.Metadata(("dvd-param", "messages[0].content[1]")),
                                 "the prompt has 9000 tokens, more than the model's context of 4096 tokens")
    api = APIError.from_grpc(error)
    assert api.status == 400 and "9000 tokens" in api.message


def test_a_conversations_turns_share_their_affinity_key() -> None:
    """The router's key for cache-affine routing: a conversation's first image (resent every turn), else its opening
    once a reply is in it; unrelated requests differ; a first text-only request has none (least load)."""
    red, blue = png_bytes(color=(200, 0, 0)), png_bytes(color=(0, 0, 200))

    def key(*messages: dict, media: list[bytes] | None = None) -> bytes | None:
        req = parse_chat_request(json.dumps({"model": "tiny", "messages": list(messages)}).encode())
        return affinity_key(to_generate_request(req, media or [], "r"))

    system = {"role": "system", "content": "Be brief."}
    ask = user_message("What is this?", images=(data_url(red),))
    turn1 = key(system, ask, media=[red])
    turn2 = key(system, ask, {"role": "assistant", "content": "A red square."}, user_message("And its size?"),
                media=[red])
    assert turn1 is not None and turn1 == turn2
    assert key(system, user_message("What is this?", images=(data_url(blue),)), media=[blue]) != turn1
    assert key(system, user_message("Hello")) is None
    chat = [system, user_message("Hello"), {"role": "assistant", "content": "Hi."}, user_message("How are you?")]
    later = key(*chat, {"role": "assistant", "content": "Well."}, user_message("Good."))
    assert key(*chat) == later is not None
    assert key(system, user_message("Goodbye"), {"role": "assistant", "content": "Bye."}) != later
