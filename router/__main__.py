"""`python -m router --port P --llm HOST:PORT[,HOST:PORT] ...`: serve the gateway with uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from dvd.logs import setup_logging
from router.app import create_app
from router.config import parse_args


def main() -> None:
    config = parse_args()
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per fetched image is noise
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_config=None,
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
