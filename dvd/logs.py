"""One structured log format for every service: JSON lines that a log shipper parses as they are.

Each line has `time`, `level`, `logger`, `message`, the call's own fields, and the `request_id` and `trace_id` of
the request being served (set once per request by `request_context`, read from context variables, so every line
logged while serving it carries them, in whichever module). `DVD_LOG_FORMAT=text` writes
`time level logger message key="value"` lines instead, for a terminal. The language server has vLLM log the same
JSON lines, in all of vLLM's processes (VLLM_LOGGING_CONFIG_PATH, unless set otherwise).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

from dvd.tracing import trace_id

REQUEST_ID: ContextVar[str] = ContextVar("dvd_request_id", default="")
FORMATS = ("json", "text")
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")  # vLLM's --log-level choices, less NOTSET
# A record's own attributes, never printed as fields (color_message: uvicorn's ANSI duplicate of the message).
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


def request_context(request_id: str) -> None:
    """Every line logged from here on in this task (and tasks it starts) names `request_id`."""
    REQUEST_ID.set(request_id)


class RequestFields(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", "") and (rid := REQUEST_ID.get()):
            record.request_id = rid
        if not getattr(record, "trace_id", "") and (tid := trace_id()):
            record.trace_id = tid
        return True


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
        return " ".join([base, *(f"{k}={json.dumps(v, default=str)}" for k, v in extras.items())])


def json_formatter() -> JsonFormatter:
    """The JSON line format (also vLLM's, through llm_server/vllm_logging.json, in each of its processes)."""
    return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                         rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                         reserved_attrs=sorted(_STANDARD), json_default=str)


def log_format(fmt: str | None = None) -> str:
    """`fmt`, else DVD_LOG_FORMAT, else json; anything but json or text stops the service at start-up."""
    fmt = (fmt or os.environ.get("DVD_LOG_FORMAT", "json")).strip().lower()
    if fmt not in FORMATS:
        raise SystemExit(f"error: DVD_LOG_FORMAT={fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def setup_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Services log JSON by default; benchmarks and tools, read by people, pass fmt="text"."""
    fmt = log_format(fmt)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(json_formatter())
    else:
        handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(RequestFields())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("DVD_LOG_LEVEL", "INFO"))
