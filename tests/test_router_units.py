"""Router pieces that need no language server: request schema, image loading and its SSRF guard, translation."""

from __future__ import annotations

import asyncio
import ipaddress
import json

import pytest

from dvd.config import MediaLimits
from dvd.v2 import vision_pb2
from router.errors import APIError
from router.images import FetchLimits, ImageError, ImageLoader, decode_data_url, is_public_address, public_addresses
from router.limits import Limiter
from router.schemas import parse_chat_request
from router.translate import affinity_key, to_generate_request
from tests.helpers.router import data_url, image_server, png_bytes, user_message

IMG = png_bytes()


def body(**fields: object) -> bytes:
    return json.dumps({"model": "m", "messages": [user_message("hi", images=(data_url(IMG),))], **fields}).encode()


# ---- the gateway's view of a request (vLLM's types check the rest in the language server) ----

@pytest.mark.parametrize("fields", [
    {}, {"stream": True, "stream_options": {"include_usage": True}}, {"n": 128}, {"logprobs": True},
    {"temperature": 3, "best_of": 2, "anything": {"else": 1}, "stream_options": {"include_usage": "sometimes"}},
    # ... the language server's to check (vLLM's type), not the gateway's
])
def test_accepted_requests(fields: dict) -> None:
    parse_chat_request(body(**fields))


@pytest.mark.parametrize(("fields", "param"), [
    ({"n": 0}, "n"), ({"n": 129}, "n"), ({"stream": "maybe"}, "stream"), ({"model": None}, "model"),
    ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [user_message({"type": "image_url", "image_url": {"url": ""}})]},
     "messages[0].content[0].image_url.url"),
])
def test_refused_requests_name_the_field(fields: dict, param: str) -> None:
    with pytest.raises(APIError) as err:
        parse_chat_request(body(**fields))
    assert err.value.param == param
    assert param in err.value.message


def test_refused_request_without_a_field() -> None:
    nested = b'{"model": "m", "n": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}"  # deeper than any stack
    for raw in (b"{not json", b"[]", nested, b'{"model": "\xff\xfe"}'):
        with pytest.raises(APIError) as err:
            parse_chat_request(raw)
        assert err.value.status == 400 and err.value.param is None


# ---- translation ----

def test_media_travel_beside_the_request_in_prompt_order() -> None:
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    sent = {"model": "m", "n": 2, "stop": "END", "vir": "off", "media_io_kwargs": {"video": {"num_frames": 8}},
            "messages": [{"role": "developer", "content": "be brief"},
                         user_message(video, "compare", images=("data:a", "data:b")),
                         {"role": "assistant", "content": "ok"},
                         user_message("and this", images=("data:c",))]}
    req = parse_chat_request(json.dumps(sent).encode())
    assert [(u, kind) for u, _, kind in req.media()] == [
        ("data:a", "image"), ("data:b", "image"), ("data:video/mp4;base64,AAAA", "video"), ("data:c", "image")]
    assert list(req.media())[2][1] == "messages[1].content[2].video_url.url"
    g = to_generate_request(req, [b"A", b"B", b"V", b"C"], "rid")
    image, video_kind = vision_pb2.MEDIA_KIND_IMAGE, vision_pb2.MEDIA_KIND_VIDEO
    assert [(m.kind, m.data) for m in g.media] == [(image, b"A"), (image, b"B"), (video_kind, b"V"), (image, b"C")]
    forwarded = json.loads(g.chat_request)
    assert forwarded["messages"][1]["content"][2] == {"type": "video_url", "video_url": {"url": ""}}
    forwarded["messages"][1]["content"][2]["video_url"]["url"] = video["video_url"]["url"]
    for m, url in ((1, "data:a"), (1, "data:b"), (3, "data:c")):
        part = next(p for p in forwarded["messages"][m]["content"] if p.get("image_url", {}).get("url") == "")
        part["image_url"]["url"] = url
    assert forwarded == sent  # everything else as the client sent it


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
        return affinity_key(req, media or [])

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
