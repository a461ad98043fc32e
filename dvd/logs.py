"""One structured log format for every service: `time level logger message key=value ...`."""

from __future__ import annotations

import logging
import os
import sys

# color_message: uvicorn's ANSI duplicate of the message.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
        if not extras:
            return base
        return base + " " + " ".join(f"{k}={v}" for k, v in extras.items())


def setup_logging(level: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("DVD_LOG_LEVEL", "INFO"))
