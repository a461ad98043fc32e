"""The gateway's own behaviour with no language server reachable: auth, limits, error shapes, readiness, metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from dvd.procs import free_port, router
from router.config import parse_args
from tests.helpers.router import data_url, png_bytes, user_message

KEY = "sk-test-key"
MAX_BODY = 50_000


@pytest.fixture(scope="module")
def dead_router() -> Iterator[str]:
    """A router whose only backend address has nothing listening."""
    svc = router(f"127.0.0.1:{free_port()}", "--api-key", KEY, "--max-body-bytes", str(MAX_BODY),
                 "--health-interval", "0.5", name="router-dead")
    yield svc.wait_http(path="/health")
    svc.stop()


def chat(base: str, key: str | None = KEY, **fields: object) -> httpx.Response:
    body = {"model": "tiny", "messages": [user_message("hi")], **fields}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=10)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_health_and_readiness(dead_router: str) -> None:
    assert httpx.get(f"{dead_router}/health").status_code == 200
    ready = httpx.get(f"{dead_router}/ready")
    # Ready or not, nothing about the inside: the dead backend's address and error stay off the public port.
    assert ready.status_code == 503 and ready.json() == {"ready": False}


def test_api_key(dead_router: str) -> None:
    for key in (None, "wrong"):
        assert assert_error(chat(dead_router, key), 401)["type"] == "authentication_error"
        assert httpx.get(f"{dead_router}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    models = httpx.get(f"{dead_router}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert models.status_code == 200 and models.json() == {"object": "list", "data": []}
    client = openai.OpenAI(base_url=f"{dead_router}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_the_gateways_own_request_errors_come_before_availability(dead_router: str) -> None:
    """What the gateway reads itself (the body, n, the messages' shape, the media URLs) it checks before routing;
    every other field is vLLM's to check, in a language server."""
    assert_error(chat(dead_router, n=0), 400, "n")
    assert_error(chat(dead_router, messages=[]), 400, "messages")
    assert_error(chat(dead_router, messages=[{"content": "x"}]), 400, "messages[0].role")
    bad = httpx.post(f"{dead_router}/v1/chat/completions", content=b"{oops", timeout=10,
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert_error(bad, 400)
    big = user_message("look", images=(data_url(png_bytes() + b"\0" * MAX_BODY),))
    assert assert_error(chat(dead_router, messages=[big]), 413)["code"] == "request_too_large"


def test_no_backend_is_503(dead_router: str) -> None:
    error = assert_error(chat(dead_router), 503)
    assert error["code"] == "no_backend"
    client = openai.OpenAI(base_url=f"{dead_router}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="tiny", messages=[user_message("hi")], stream=True)
    assert err.value.status_code == 503


def test_unknown_route_is_openai_shaped(dead_router: str) -> None:
    assert_error(httpx.get(f"{dead_router}/v1/nothing"), 404)
    assert_error(httpx.get(f"{dead_router}/v1/chat/completions"), 405)


def test_metrics_count_outcomes(dead_router: str) -> None:
    chat(dead_router)
    assert httpx.get(f"{dead_router}/metrics").status_code == 401  # on the API port, behind the API key
    text = httpx.get(f"{dead_router}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    # No served model is known when no backend is ready: the label stays empty rather than echo the client.
    assert 'dvd_router_requests_total{model_name="",status="503"}' in text
    assert 'dvd_router_errors_total{code="no_backend",model_name="",type="service_unavailable"}' in text
    assert "process_cpu_seconds_total" in text
    for name in ("dvd_router_time_to_first_token_seconds", "dvd_router_time_per_output_token_seconds",
                 "dvd_router_e2e_request_latency_seconds", "dvd_router_requests_in_flight"):
        assert f"# TYPE {name}" in text


def test_config_from_cli_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags win over the environment, which wins over the dataclass defaults; lists split on commas."""
    monkeypatch.setenv("DVD_API_KEY", "a,b")
    monkeypatch.setenv("DVD_LLM", "env:1")
    config = parse_args(["--llm", "h1:1,h2:2", "--llm", "h3:3", "--max-queue", "0"])
    assert config.llm == ("h1:1", "h2:2", "h3:3") and config.api_keys == ("a", "b")
    assert config.max_queue == 0 and not config.allow_private_image_urls and config.port == 8000
    config = parse_args(["--api-key", "c", "--allow-private-image-urls"])
    assert config.llm == ("env:1",) and config.api_keys == ("c",) and config.allow_private_image_urls
    monkeypatch.delenv("DVD_LLM")
    with pytest.raises(SystemExit):
        parse_args([])


def test_dvd_local_reports_a_bad_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from router.local import main

    assert main(["--model", str(tmp_path / "missing"), "--port", str(free_port())]) == 1
    assert "could not start the stack" in capsys.readouterr().err
