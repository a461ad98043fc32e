"""One config pattern for every service: a frozen dataclass whose fields are the command line.

Each field declared with `option()` becomes `--field-name` with the field's default, type and help; an `env`
name (or several, the first set wins) gives the flag an environment fallback; booleans read as people write them
(true/false, yes/no, on/off, 1/0) and anything else is an error, never a silent false. `tuple[str, ...]` fields
accept comma-separated values and may be repeated; a field whose type is such a dataclass brings that group's
flags (options shared by services).
Defaults live in the dataclass only, so the CLI, the tests and programmatic callers cannot disagree.
The default ports of all services are here, in one table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from dvd.logs import FORMATS, LOG_LEVELS

# Default ports of the three services (README "Ports" lists these and the deployment files' choices).
ROUTER_PORT = 8000  # OpenAI HTTP API (and /metrics)
VISION_PORT = 50051  # vision server gRPC
LLM_PORT = 50061  # language server gRPC
# Video frames: sampled per video when a request does not say (vLLM's VideoMediaIO default), and at most per request
# (the vision server's --video-num-frames and --max-video-frames; the language server sizes buffers from them).
VIDEO_NUM_FRAMES = 32
MAX_VIDEO_FRAMES = 128
# How long one request may run, arrival to last token (the router answers 504 after). A stopping service gives its
# in-flight work as long by default, so a rollout cuts no request the router would have let finish; deployments give
# a pod that plus their preStop sleep before killing it (docs/kubernetes.md, "Rollouts").
REQUEST_TIMEOUT_S = 600.0

# Every service refuses an empty --model with this (deployment files leave MODEL to the user).
EMPTY_MODEL = "no model: set MODEL to a Hugging Face repo id or a checkpoint directory (--model)"

MIB = 1024 * 1024
C = TypeVar("C")


_TRUE = frozenset({"1", "true", "yes", "on", "y", "t"})
_FALSE = frozenset({"0", "false", "no", "off", "n", "f"})


def parse_bool(value: str, name: str = "value") -> bool:
    """`true`/`yes`/`on`/`1` and `false`/`no`/`off`/`0`, any case; anything else raises ValueError."""
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a boolean (use true/false, yes/no, on/off or 1/0)")


def env_value(names: str | Sequence[str] | None) -> tuple[str, str] | None:
    """(name, value) of the first of `names` set, and not empty, in the environment (compose's `${X:-}` sets an
    empty value for "not given")."""
    for name in (names,) if isinstance(names, str) else names or ():
        if os.environ.get(name):
            return name, os.environ[name]
    return None


def env_label(names: str | Sequence[str]) -> str:
    return names if isinstance(names, str) else " or ".join(names)


def option(default: Any = dataclasses.MISSING, help: str = "", *, env: str | Sequence[str] | None = None,
           choices: Sequence[str] | None = None, factory: Callable[[], Any] | None = None,
           flag: str | None = None) -> Any:
    """A dataclass field that is also a command-line flag."""
    meta = {"help": help, "env": env, "choices": choices, "flag": flag}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def split_list(values: Sequence[str] | str | None) -> tuple[str, ...]:
    """`a,b` or repeated flags -> ('a', 'b'); blanks dropped."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    return tuple(part.strip() for v in values for part in v.split(",") if part.strip())


def _base_type(hint: Any) -> Any:
    """`float` of `float | None`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return hint


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """Add one flag per `option()` field of `cls`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = _base_type(hints[f.name])
        if dataclasses.is_dataclass(hint):  # a group of options shared by services (dvd.security.InternalAuth)
            add_options(parser, hint)
            continue
        if "help" not in f.metadata:
            continue
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        env = f.metadata["env"]
        default = _default(f)
        from_env = env_value(env)
        help_text = f.metadata["help"] + (f" (env {env_label(env)})" if env else "")
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text or None}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            try:
                kwargs["default"] = parse_bool(from_env[1], from_env[0]) if from_env else default
            except ValueError as exc:  # at start-up, as argparse reports a bad flag
                raise SystemExit(f"error: {exc}") from None
        elif typing.get_origin(hint) is tuple:
            kwargs["action"] = "append"
            kwargs["default"] = None
            kwargs["metavar"] = "A[,B...]"
        else:
            kwargs["type"] = hint
            kwargs["choices"] = f.metadata["choices"]
            if from_env is not None:
                kwargs["default"] = hint(from_env[1])
                if kwargs["choices"] and kwargs["default"] not in kwargs["choices"]:  # as argparse checks a flag
                    raise SystemExit(f"error: {from_env[0]}={from_env[1]!r} is not one of "
                                     f"{', '.join(kwargs['choices'])}")
            elif default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
        parser.add_argument(flag, **kwargs)


def from_namespace(cls: type[C], ns: argparse.Namespace) -> C:
    """The dataclass from parsed flags (tuple fields: flag values, else the env fallback, else the default)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = from_namespace(hints[f.name], ns)
            continue
        if "help" not in f.metadata or not hasattr(ns, f.name):
            continue
        value = getattr(ns, f.name)
        if typing.get_origin(_base_type(hints[f.name])) is tuple:
            from_env = env_value(f.metadata["env"])
            if value is None and from_env:
                value = from_env[1]
            value = split_list(value) if value is not None else _default(f)
        values[f.name] = value
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class MediaLimits:
    """What one request may carry, the same rule at the gateway (which fetches and decodes data URLs) and at the
    vision server (which must refuse on its own: it is reachable without the gateway inside the cluster)."""

    max_images_per_request: int = option(16, "images and videos in one request", env="DVD_MAX_IMAGES_PER_REQUEST")
    max_image_bytes: int = option(20 * MIB, "bytes of one encoded image", env="DVD_MAX_IMAGE_BYTES")
    max_video_bytes: int = option(64 * MIB, "bytes of one encoded video (at the gateway a data: URL is also bound by "
                                            "--max-body-bytes)", env="DVD_MAX_VIDEO_BYTES")


@dataclasses.dataclass(frozen=True)
class Deadlines:
    """One setting for every service: the request timeout, and the drain window it implies."""

    request_timeout: float = option(REQUEST_TIMEOUT_S, "seconds one request may run, arrival to last token (the "
                                    "router answers 504 after); the default drain window", env="DVD_REQUEST_TIMEOUT")
    shutdown_grace: float | None = option(
        None, "seconds in-flight work gets after SIGTERM (readiness off, no new work) before the service stops; "
        "default: --request-timeout", env="DVD_SHUTDOWN_GRACE")

    @property
    def drain_s(self) -> float:
        return self.request_timeout if self.shutdown_grace is None else self.shutdown_grace


@dataclasses.dataclass(frozen=True)
class LogOptions:
    """How a service logs (the language server takes vLLM's own --log-level, and the format from the environment
    only: vLLM reads its logging configuration when it is imported, before any flag is parsed)."""

    log_level: str = option("INFO", "the level of this service's log lines", env="DVD_LOG_LEVEL", choices=LOG_LEVELS)
    log_format: str = option("json", "log lines as JSON objects (the format vLLM's lines take in the language "
                                     "server too) or key=value text", env="DVD_LOG_FORMAT", choices=FORMATS)


def parse(cls: type[C], argv: Sequence[str] | None = None, *, prog: str | None = None,
          description: str | None = None) -> C:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_options(parser, cls)
    return from_namespace(cls, parser.parse_args(argv))
