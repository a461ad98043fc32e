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
    assert cfg.batching == "padded" and cfg.shutdown_grace == 1.0
    with pytest.raises(SystemExit):
        vision_args(["--model", "m", "--batching", "sometimes"])  # choices are enforced
    with pytest.raises(SystemExit):
        vision_args([])  # a field without a default is a required flag


def test_services_default_to_distinct_ports() -> None:
    assert len({ROUTER_PORT, VISION_PORT, LLM_PORT}) == 3
    assert {f.name for f in dataclasses.fields(LocalConfig)} >= {"llm_args", "vision_args", "router_args"}
