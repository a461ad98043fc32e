"""The gateway against the real stack (vision server + vLLM language server on the tiny checkpoint), driven with
the official `openai` client, sync and async. Extra routers share the session's `llm_tiny` engine."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dvd.health import LOAD_KEY
from dvd.procs import Service, router
from dvd.v2 import llm_pb2, llm_pb2_grpc, vision_pb2
from tests.helpers.router import data_url, image_server, png_bytes, user_message

KEY = "sk-e2e"
RED, BLUE = png_bytes((320, 240), (220, 30, 30)), png_bytes((500, 300), (20, 40, 220))
LONG = {"max_tokens": 6000, "extra_body": {"ignore_eos": True}}  # many seconds of decoding on CPU


def start_router(name: str, llm: str, *args: str) -> tuple[Service, str]:
    svc = router(llm, "--health-interval", "0.5", *args, name=name)
    return svc, f"{svc.wait_http()}/v1"


def running_requests(llm: str) -> int:
    with grpc.insecure_channel(llm) as channel:
        _, call = health_pb2_grpc.HealthStub(channel).Check.with_call(health_pb2.HealthCheckRequest(), timeout=5)
        return int(float(dict(call.trailing_metadata())[LOAD_KEY]))


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def metric(base_v1: str, name: str) -> float:
    text = httpx.get(base_v1.removesuffix("/v1") + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def client(router_tiny: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=router_tiny, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(router_tiny: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=router_tiny, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def images() -> Iterator[str]:
    with image_server({"red.png": RED, "blue.png": BLUE, "junk.png": b"this is not an image"}) as (base, _):
        yield base


@pytest.fixture(scope="module")
def strict_router(llm_tiny: str) -> Iterator[str]:
    """API key, private image URLs refused, one request at a time, no queue, a 3 s deadline."""
    svc, base = start_router("router-strict", llm_tiny, "--api-key", KEY, "--max-concurrency", "1",
                             "--max-queue", "0", "--request-timeout", "3")
    yield base
    svc.stop()


@pytest.fixture(scope="module")
def single_slot_router(llm_tiny: str) -> Iterator[str]:
    """One request at a time, no queue, the default deadline (a short one could free the slot mid-test)."""
    svc, base = start_router("router-single-slot", llm_tiny, "--max-concurrency", "1", "--max-queue", "0")
    yield base
    svc.stop()


# ---- happy paths ----

def test_models(client: openai.OpenAI, model: str, router_tiny: str, colocated_tiny: str) -> None:
    """/v1/models and /version as `vllm serve` shapes them (same fields; `root`: what the model was loaded from)."""
    cards = client.models.list().data
    assert [c.id for c in cards] == [model, "tiny-alias"]  # every --served-model-name, as vLLM accepts them
    reply = client.chat.completions.create(model="tiny-alias", max_tokens=2, messages=[user_message("Hi")])
    assert reply.choices[0].finish_reason in ("length", "stop")
    ours = httpx.get(f"{router_tiny}/models", timeout=10).json()["data"][0]
    stock = httpx.get(f"{colocated_tiny}/models", timeout=10).json()["data"][0]
    assert set(ours) == set(stock) and set(ours["permission"][0]) == set(stock["permission"][0])
    assert (ours["root"], ours["owned_by"], ours["max_model_len"]) == (stock["root"], stock["owned_by"],
                                                                      stock["max_model_len"])
    versions = [httpx.get(url.removesuffix("/v1") + "/version", timeout=10).json() for url in (router_tiny,
                                                                                              colocated_tiny)]
    assert [set(v) for v in versions] == [{"version"}, {"version"}]


def test_non_streaming_with_a_data_url_image(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, max_tokens=8, temperature=0,
        messages=[user_message("What is in this image?", images=(data_url(RED),))])
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == model
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 256  # one tile is 256 tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


async def test_streaming_matches_non_streaming(aclient: openai.AsyncOpenAI, model: str) -> None:
    messages = [user_message("Describe it.", images=(data_url(BLUE),))]
    # Warm the prefix cache first: on CPU a cached prefix can compute the greedy path slightly differently.
    await aclient.chat.completions.create(model=model, messages=messages, max_tokens=1)
    whole = await aclient.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                  extra_body={"ignore_eos": True})
    stream = await aclient.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                   extra_body={"ignore_eos": True}, stream=True,
                                                   stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-2].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert {c.id for c in chunks} == {chunks[0].id}


def test_http_images_several_per_message_and_several_messages(client: openai.OpenAI, model: str,
                                                              images: str) -> None:
    def ask(messages: list[dict]) -> int:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
        return reply.usage.prompt_tokens

    one = ask([user_message("Compare.", images=(f"{images}/img/red.png",))])
    conversation = [
        {"role": "system", "content": "You compare pictures."},
        user_message("Compare these.", images=(f"{images}/img/red.png", data_url(BLUE))),
        {"role": "assistant", "content": "The first is red."},
        user_message("And this one?", images=(f"{images}/redirect?to=/img/blue.png",)),
    ]
    assert ask(conversation) > 2 * one  # three images' tokens reached the model


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("image", [False, True], ids=["text", "image"])
async def test_logprobs_equal_stock_vllm(aclient: openai.AsyncOpenAI, model: str, colocated_tiny: str,
                                         stream: bool, image: bool) -> None:
    """logprobs + top_logprobs through DvD, as stock vLLM's OpenAI server reports them for the same request: within
    1e-3 for text (the same engine on the same prompt), within 0.05 with an image (DvD's ViT runs in the vision
    server, stock vLLM's inside its engine: the embeddings agree to bf16 rounding, tests/test_vision_model.py)."""
    images = (data_url(png_bytes((448, 448), (30, 160, 90))),) if image else ()
    messages = [user_message("Name the colour.", images=images)]
    args = {"max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3, "extra_body": {"ignore_eos": True}}
    tolerance = 0.05 if image else 1e-3

    async def entries(c: openai.AsyncOpenAI, name: str) -> list:
        if not stream:
            reply = await c.chat.completions.create(model=name, messages=messages, **args)
            return reply.choices[0].logprobs.content
        chunks = [x async for x in await c.chat.completions.create(model=name, messages=messages, stream=True, **args)]
        return [e for x in chunks if x.choices and x.choices[0].logprobs for e in x.choices[0].logprobs.content]

    ours = await entries(aclient, model)
    ref = await entries(openai.AsyncOpenAI(base_url=colocated_tiny, api_key="none", max_retries=0), "tiny")
    assert len(ours) == len(ref) == 6
    worst = max(abs(x.logprob - y.logprob) for a, b in zip(ours, ref, strict=True)
                for x, y in zip([a, *a.top_logprobs], [b, *b.top_logprobs], strict=True))
    print(f"{'image' if image else 'text'}: largest logprob difference {worst:.2e}")
    for a, b in zip(ours, ref, strict=True):
        assert (a.token, a.bytes) == (b.token, b.bytes)
        assert a.logprob == pytest.approx(b.logprob, abs=tolerance)
        assert len(a.top_logprobs) == len(b.top_logprobs) == 3
        assert a.top_logprobs[0].token == a.token  # greedy: the sampled token is the most likely one
        assert [t.logprob for t in a.top_logprobs] == pytest.approx([t.logprob for t in b.top_logprobs],
                                                                    abs=tolerance)


COLOUR_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "bright"],
                 "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]},
                                "bright": {"type": "boolean"}}}
STRUCTURED = [
    {"response_format": {"type": "json_schema",
                         "json_schema": {"name": "colour", "schema": COLOUR_SCHEMA, "strict": True}}},
    {"response_format": {"type": "json_object"}},
    {"extra_body": {"structured_outputs": {"choice": ["red", "green", "blue"]}}},
    {"extra_body": {"structured_outputs": {"regex": "(yes|no), [a-z]{2,6}"}}},
]


@pytest.mark.parametrize("constraint", STRUCTURED, ids=["json_schema", "json_object", "choice", "regex"])
async def test_structured_outputs_equal_stock_vllm(aclient: openai.AsyncOpenAI, model: str, colocated_tiny: str,
                                                   constraint: dict) -> None:
    """vLLM's structured-output backend enforces the constraint in the language server: the same greedy text as
    stock vLLM's OpenAI server, and text that obeys the constraint."""
    messages = [user_message("Describe the colour as JSON.", images=(data_url(png_bytes((448, 448), (30, 160, 90))),))]
    args = {"max_tokens": 48, "temperature": 0, **constraint}
    ours = await aclient.chat.completions.create(model=model, messages=messages, **args)
    ref_client = openai.AsyncOpenAI(base_url=colocated_tiny, api_key="none", max_retries=0)
    ref = await ref_client.chat.completions.create(model="tiny", messages=messages, **args)
    text = ours.choices[0].message.content
    assert text == ref.choices[0].message.content
    assert ours.choices[0].finish_reason == ref.choices[0].finish_reason
    if ours.choices[0].finish_reason != "stop":
        return  # cut by max_tokens: still the reference's text, just not finished
    if "choice" in str(constraint):
        assert text in ("red", "green", "blue")
    elif "regex" in str(constraint):
        assert re.fullmatch("(yes|no), [a-z]{2,6}", text)
    else:
        value = json.loads(text)
        if "json_schema" in constraint.get("response_format", {}):
            assert set(value) == {"colour", "bright"} and value["colour"] in ("red", "green", "blue")


@pytest.mark.parametrize(("constraint", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "structured_outputs"),
    # vLLM's own check names no field here, as stock vLLM answers it.
    ({"extra_body": {"structured_outputs": {"no_such_constraint": 1}}}, None),
])
def test_bad_structured_outputs_are_400s_naming_the_field(client: openai.OpenAI, model: str, constraint: dict,
                                                          param: str | None) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, max_tokens=4, messages=[user_message("Hi")], **constraint)
    assert info.value.body["param"] == param, info.value.body
    ok = client.chat.completions.create(model=model, max_tokens=2, messages=[user_message("Hi")])
    assert ok.choices[0].message.content is not None  # the next request works


def test_several_choices_streamed(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(model=model, n=2, max_tokens=5, temperature=1.0, seed=7,
                                            extra_body={"ignore_eos": True}, stream=True,
                                            messages=[user_message("Hi", images=(data_url(RED),))])
    finished: dict[int, str] = {}
    texts = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert finished == {0: "length", 1: "length"}
    assert all(texts.values())


def test_max_tokens_stop_and_seed(client: openai.OpenAI, model: str) -> None:
    kwargs = {"model": model, "messages": [user_message("Count.")], "temperature": 1.0, "seed": 3,
              "max_completion_tokens": 6, "extra_body": {"ignore_eos": True}}
    a, b = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert a.usage.completion_tokens == 6 and a.choices[0].finish_reason == "length"
    assert a.choices[0].message.content == b.choices[0].message.content  # seeded sampling is reproducible
    stop = a.choices[0].message.content.strip()[:2]  # the same seed reaches this text again: it must stop there
    assert stop, "six sampled tokens decoded to whitespace only"
    c = client.chat.completions.create(**kwargs, stop=[stop])
    assert c.choices[0].finish_reason == "stop" and stop not in c.choices[0].message.content


def test_tile_budget_reaches_the_vision_server(client: openai.OpenAI, model: str) -> None:
    def prompt_tokens(**extra: object) -> int:
        reply = client.chat.completions.create(model=model, max_tokens=1, extra_body=extra or None,
                                               messages=[user_message("?", images=(data_url(BLUE),))])
        return reply.usage.prompt_tokens

    default, one_tile = prompt_tokens(), prompt_tokens(max_dynamic_patch=1)
    assert one_tile < default
    assert prompt_tokens(mm_processor_kwargs={"max_dynamic_patch": 1}) == one_tile
    assert prompt_tokens(vir="off", max_dynamic_patch=1) == one_tile  # no ViR on a non-Flash checkpoint


async def test_image_detail_equals_stock_vllm_tile_budget(aclient: openai.AsyncOpenAI, model: str,
                                                          colocated_tiny: str) -> None:
    """image_url.detail "low" is that image as one 448 px tile: the same prompt tokens and greedy text as stock vLLM
    given that tile (the image resized to 448 x 448 as InternVL's one-tile budget resizes it: stock vLLM ignores
    `detail`, and vLLM 0.32 refuses a per-request `max_dynamic_patch` once the tokenizer has InternVL's video token,
    as every InternVL3.5 checkpoint's does: "InternVLVideoProcessor.__init__() got an unexpected keyword argument");
    "high" and "auto" keep the full budget; a low image next to a high one is cut alone (and the embedding cache
    keeps the two apart)."""
    from PIL import Image

    ref_client = openai.AsyncOpenAI(base_url=colocated_tiny, api_key="none", max_retries=0)
    args: dict[str, Any] = {"max_tokens": 8, "temperature": 0}

    def messages(*details: str | None, image: bytes = BLUE) -> list[dict[str, Any]]:
        parts = [{"type": "image_url", "image_url": {"url": data_url(image), **({"detail": d} if d else {})}}
                 for d in details]
        return [{"role": "user", "content": [*parts, {"type": "text", "text": "What colour is it?"}]}]

    async def ours(*details: str | None) -> Any:
        return await aclient.chat.completions.create(model=model, messages=messages(*details), **args)

    tile = io.BytesIO()
    Image.open(io.BytesIO(BLUE)).convert("RGB").resize((448, 448)).save(tile, format="PNG")
    full = await ref_client.chat.completions.create(model="tiny", messages=messages(None), **args)
    one = await ref_client.chat.completions.create(model="tiny", messages=messages(None, image=tile.getvalue()),
                                                   **args)
    assert one.usage.prompt_tokens < full.usage.prompt_tokens
    for detail, ref in (("high", full), ("low", one), ("auto", full), (None, full)):
        got = await ours(detail)
        assert (got.usage.prompt_tokens, got.choices[0].message.content) == \
            (ref.usage.prompt_tokens, ref.choices[0].message.content), detail
    mixed, both = await ours("low", "high"), await ours("high", "high")
    assert mixed.usage.prompt_tokens == both.usage.prompt_tokens - (full.usage.prompt_tokens - one.usage.prompt_tokens)


# ---- errors ----

@pytest.mark.parametrize("stream", [False, True])
def test_undecodable_image_is_400(client: openai.OpenAI, model: str, images: str, stream: bool) -> None:
    for url in (data_url(b"definitely not a picture"), f"{images}/img/junk.png"):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, max_tokens=4, stream=stream,
                                           messages=[user_message("?", images=(data_url(RED), url))])
        assert err.value.param == "messages[0].content[1].image_url.url"  # the vision server's verdict, located


def test_bad_image_urls_are_400(client: openai.OpenAI, model: str, images: str) -> None:
    for url, code in [("data:image/png;base64,***", "invalid_base64"), (f"{images}/missing.png", "image_fetch_failed"),
                      ("file:///etc/passwd", "invalid_image_url")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, max_tokens=4, messages=[user_message("?", images=(url,))])
        assert err.value.code == code and err.value.param == "messages[0].content[0].image_url.url"


def test_unsupported_fields_and_unknown_model(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=[user_message("hi")], top_logprobs=2)
    assert err.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[user_message("hi")], extra_body={"best_of": 3})
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=[user_message("hi")])
    assert missing.value.code == "model_not_found"


def test_api_key_required(strict_router: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=strict_router, api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=strict_router, api_key=KEY, max_retries=0).models.list().data


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "10.0.0.1",
                                  "169.254.169.254", "192.168.0.10", "[fd00::1]"])
def test_private_image_urls_refused(strict_router: str, images: str, host: str) -> None:
    strict = openai.OpenAI(base_url=strict_router, api_key=KEY, max_retries=0)
    url = f"http://{host.format(port=images.rsplit(':', 1)[1])}/img/red.png"
    with pytest.raises(openai.BadRequestError) as err:
        strict.chat.completions.create(model=strict.models.list().data[0].id, max_tokens=2,
                                       messages=[user_message("?", images=(url,))])
    assert err.value.code == "image_url_forbidden"


def test_over_the_limit_is_429_and_the_deadline_is_504(single_slot_router: str, strict_router: str,
                                                       llm_tiny: str) -> None:
    single = openai.OpenAI(base_url=single_slot_router, api_key="none", max_retries=0)
    model = single.models.list().data[0].id
    messages = [user_message("Go on.")]
    with single.chat.completions.create(model=model, messages=messages, stream=True, **LONG) as busy:
        next(iter(busy))
        with pytest.raises(openai.RateLimitError) as err:
            single.chat.completions.create(model=model, messages=messages, max_tokens=2)
        headers = err.value.response.headers  # when to come back: seconds (RFC 9110) and ms (as OpenAI's API)
        wait_ms = int(headers["retry-after-ms"])
        assert 0 < wait_ms <= 60_000 and int(headers["retry-after"]) == max(1, -(-wait_ms // 1000))
        # Refused before its body is read: under overload a refusal costs no parsing (this body is no JSON at all),
        # and the connection stays usable for the next request.
        with httpx.Client(base_url=single_slot_router) as raw:
            for _ in range(2):
                refused = raw.post("/chat/completions", content=b"\xff" * 2**20,
                                   headers={"content-type": "application/json"})
                assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_requests"
    wait_until(lambda: metric(single_slot_router, "dvd_router_requests_in_flight") == 0)
    wait_until(lambda: running_requests(llm_tiny) == 0)
    strict = openai.OpenAI(base_url=strict_router, api_key=KEY, max_retries=0)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as late:
        strict.chat.completions.create(model=model, messages=messages, **LONG)
    assert late.value.status_code == 504 and time.monotonic() - started < 10
    wait_until(lambda: running_requests(llm_tiny) == 0)  # the deadline travelled down and aborted the work


# ---- cancellation ----

async def test_client_disconnect_mid_stream_aborts_the_request(aclient: openai.AsyncOpenAI, model: str,
                                                                 router_tiny: str, llm_tiny: str) -> None:
    stream = await aclient.chat.completions.create(model=model, stream=True,
                                                   messages=[user_message("Talk.", images=(data_url(RED),))], **LONG)
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            break
    assert running_requests(llm_tiny) == 1
    await stream.close()
    await asyncio.to_thread(wait_until, lambda: running_requests(llm_tiny) == 0, 15)
    await asyncio.to_thread(wait_until, lambda: metric(router_tiny, "dvd_router_requests_in_flight") == 0, 5)


def test_client_disconnect_without_streaming_aborts_the_request(router_tiny: str, model: str,
                                                                llm_tiny: str) -> None:
    body = {"model": model, "messages": [user_message("Talk.")], "max_tokens": 6000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{router_tiny}/chat/completions", json=body, timeout=httpx.Timeout(10, read=2))
    wait_until(lambda: running_requests(llm_tiny) == 0, 15)


# ---- replicas ----

class FlakyLanguageServer(llm_pb2_grpc.LanguageServiceServicer):
    """Healthy to health checks; Generate fails as UNAVAILABLE, after `tokens` deltas."""

    def __init__(self, model: str, tokens: int) -> None:
        self.model, self.tokens, self.calls = model, tokens, 0

    def Metadata(self, request: vision_pb2.MetadataRequest, context: grpc.ServicerContext
                 ) -> llm_pb2.LanguageMetadata:
        return llm_pb2.LanguageMetadata(model=self.model, max_model_len=16384)

    def Generate(self, request: llm_pb2.GenerateRequest, context: grpc.ServicerContext
                 ) -> Iterator[llm_pb2.GenerateResponse]:
        self.calls += 1
        chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": self.model,
                 "choices": [{"index": 0, "delta": {"content": "x"}}]}
        for _ in range(self.tokens):
            yield llm_pb2.GenerateResponse(body=f"data: {json.dumps(chunk)}\n\n".encode(), tokens=1)
        context.abort(grpc.StatusCode.UNAVAILABLE, "replica going away")


@pytest.fixture
def flaky(model: str, request: pytest.FixtureRequest) -> Iterator[tuple[FlakyLanguageServer, str]]:
    servicer = FlakyLanguageServer(model, tokens=request.param)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    llm_pb2_grpc.add_LanguageServiceServicer_to_server(servicer, server)
    checker = health.HealthServicer()  # "" is SERVING; the router asks for the service by name
    checker.set(llm_pb2.DESCRIPTOR.services_by_name["LanguageService"].full_name,
                health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.mark.parametrize("flaky", [0], indirect=True)
def test_retry_on_another_replica_before_the_first_token(flaky: tuple[FlakyLanguageServer, str], llm_tiny: str,
                                                         model: str) -> None:
    servicer, address = flaky
    svc, base = start_router("router-retry", f"{address},{llm_tiny}")
    try:
        reply = openai.OpenAI(base_url=base, api_key="-", max_retries=0).chat.completions.create(
            model=model, messages=[user_message("hi")], max_tokens=3, extra_body={"ignore_eos": True})
        # The real server answered (greedy random weights may say nothing but an end token, hence ignore_eos).
        assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
        assert servicer.calls == 1  # tried first (listed first, equally idle), then retried on the real one
    finally:
        svc.stop()


@pytest.mark.parametrize("flaky", [2], indirect=True)
def test_no_retry_after_tokens_were_sent(flaky: tuple[FlakyLanguageServer, str], llm_tiny: str, model: str) -> None:
    servicer, address = flaky
    svc, base = start_router("router-noretry", f"{address},{llm_tiny}")
    try:
        stream = openai.OpenAI(base_url=base, api_key="-", max_retries=0).chat.completions.create(
            model=model, messages=[user_message("hi")], max_tokens=3, stream=True)
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
        assert servicer.calls == 1
    finally:
        svc.stop()


def test_router_finds_language_servers_through_dns(llm_tiny: str) -> None:
    """`--llm dns:NAME:PORT`: every address the name resolves to is a backend (a headless Service's pods)."""
    port = llm_tiny.rsplit(":", 1)[1]
    svc, base = start_router("router-dns", f"dns:localhost:{port}", "--metrics-port", "0")
    try:
        internal = f"http://127.0.0.1:{svc.wait_port('metrics', 10)}"
        health = httpx.get(f"{internal}/ready", timeout=10).json()
        assert f"127.0.0.1:{port}" in str(health["backends"])  # the detail is on the operators' port only
        assert httpx.get(base.removesuffix("/v1") + "/ready", timeout=10).json() == {"ready": True}
        assert "dvd_router_backends_ready 1.0" in httpx.get(f"{internal}/metrics", timeout=10).text
        reply = openai.OpenAI(base_url=base, api_key="none").chat.completions.create(
            model="tiny", max_tokens=2, messages=[user_message("Hi")])
        assert reply.choices[0].finish_reason in ("length", "stop")
    finally:
        svc.stop()
