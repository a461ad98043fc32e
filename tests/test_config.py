"""The one config pattern: each service's dataclass is its command line, with its defaults in one place."""

from __future__ import annotations

import dataclasses

import pytest

from dvd.config import LLM_PORT, ROUTER_PORT, VISION_PORT
from router.local import LocalConfig
from vision_server.__main__ import parse_args as vision_args
from vision_server.config import ServerConfig


def test_defaults_come_from_the_dataclass() -> None:
    cfg = vision_args(["--model", "tiny"])
    assert cfg == ServerConfig(model="tiny")  # every CLI default is the dataclass default
    assert cfg.port == VISION_PORT and cfg.devices == ("cpu",) and cfg.vir_relative_threshold is None


def test_flags_parse_to_typed_fields() -> None:
    cfg = vision_args(["--model", "m", "--devices", "cpu,cpu", "--max-wait-ms", "2.5",
                       "--vir-relative-threshold", "0.3", "--batching", "padded", "--shutdown-grace", "1"])
    assert cfg.devices == ("cpu", "cpu") and cfg.max_wait_ms == 2.5 and cfg.vir_relative_threshold == 0.3
    assert cfg.batching == "padded" and cfg.deadlines.drain_s == 1.0
    with pytest.raises(SystemExit):
        vision_args(["--model", "m", "--batching", "sometimes"])  # choices are enforced
    with pytest.raises(SystemExit):
        vision_args([])  # a field without a default is a required flag


def test_services_default_to_distinct_ports() -> None:
    assert len({ROUTER_PORT, VISION_PORT, LLM_PORT}) == 3
    assert {f.name for f in dataclasses.fields(LocalConfig)} >= {"llm_args", "vision_args", "router_args"}


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("True", True), ("yes", True), ("on", True),
                                                 ("1", True), ("false", False), ("NO", False), ("off", False),
                                                 ("0", False)])
def test_boolean_settings_read_as_people_write_them(monkeypatch: pytest.MonkeyPatch, value: str,
                                                    expected: bool) -> None:
    from router.config import parse_args as router_args

    monkeypatch.setenv("DVD_ALLOW_PRIVATE_IMAGE_URLS", value)
    assert router_args(["--llm", "x:1"]).allow_private_image_urls is expected
    assert router_args(["--llm", "x:1", "--no-allow-private-image-urls"]).allow_private_image_urls is False


def test_a_boolean_setting_that_is_not_one_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from router.config import parse_args as router_args

    monkeypatch.setenv("DVD_ALLOW_PRIVATE_IMAGE_URLS", "ture")
    with pytest.raises(SystemExit) as exc:
        router_args(["--llm", "x:1"])
    assert "DVD_ALLOW_PRIVATE_IMAGE_URLS='ture' is not a boolean" in str(exc.value)


def test_the_api_key_also_comes_from_vllm_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment written for `vllm serve` sets VLLM_API_KEY; DVD_API_KEY wins when both are set."""
    from router.config import parse_args as router_args

    monkeypatch.delenv("DVD_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "k1")
    assert router_args(["--llm", "x:1"]).api_keys == ("k1",)
    monkeypatch.setenv("DVD_API_KEY", "")  # compose's ${DVD_API_KEY:-}: not given
    assert router_args(["--llm", "x:1"]).api_keys == ("k1",)
    monkeypatch.setenv("DVD_API_KEY", "k2")
    assert router_args(["--llm", "x:1"]).api_keys == ("k2",)


def test_latency_buckets_are_vllms() -> None:
    """The gateway's histograms use vLLM's boundaries, so one dashboard query reads both (dvd/metrics.py)."""
    from vllm.v1.metrics.buckets import histogram_buckets

    from dvd.metrics import REQUEST_LATENCY_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS

    assert list(TTFT_BUCKETS) == list(histogram_buckets("time_to_first_token"))
    assert list(TPOT_BUCKETS) == list(histogram_buckets("inter_token_latency"))
    assert list(REQUEST_LATENCY_BUCKETS) == list(histogram_buckets("request_latency"))


def test_the_media_limits_are_one_group_for_the_gateway_and_the_vision_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """One set of names, flags and variables (dvd/config.py: MediaLimits): a limit set once reaches both services."""
    from dvd.config import MediaLimits
    from router.config import parse_args as gateway_args

    flags = ["--max-images-per-request", "4", "--max-image-bytes", "1000", "--max-video-bytes", "2000"]
    expected = MediaLimits(max_images_per_request=4, max_image_bytes=1000, max_video_bytes=2000)
    assert vision_args(["--model", "m", *flags]).media == expected
    assert gateway_args(["--llm", "x:1", *flags]).media == expected
    monkeypatch.setenv("DVD_MAX_IMAGES_PER_REQUEST", "3")
    assert vision_args(["--model", "m"]).media.max_images_per_request == 3
    assert gateway_args(["--llm", "x:1"]).media.max_images_per_request == 3
    assert MediaLimits().max_image_bytes == 20 * 2**20 and MediaLimits().max_video_bytes == 64 * 2**20


def test_log_settings_are_options_with_their_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from router.config import parse_args as router_args

    monkeypatch.setenv("DVD_LOG_FORMAT", "text")
    cfg = router_args(["--llm", "x:1", "--log-level", "DEBUG"])
    assert (cfg.logs.log_level, cfg.logs.log_format) == ("DEBUG", "text")
    assert vision_args(["--model", "m", "--log-format", "json"]).logs.log_format == "json"  # the flag wins
    monkeypatch.setenv("DVD_LOG_LEVEL", "LOUD")
    with pytest.raises(SystemExit):
        router_args(["--llm", "x:1"])
