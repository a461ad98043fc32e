"""`python -m router --port P --llm HOST:PORT[,HOST:PORT] ...`: serve the gateway with uvicorn."""

from __future__ import annotations

import logging
import socket

import uvicorn

from dvd.logs import setup_logging
from dvd.runtime import report_ports
from router.app import create_app
from router.config import parse_args


def main() -> None:
    config = parse_args()
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per fetched image is noise
    # Bound here, before uvicorn starts: with --port 0 the launcher learns the port and no other process can take it.
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    sock.listen(2048)  # connections made once the port is reported wait in the backlog until uvicorn accepts them
    report_ports(http=sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_config=None, timeout_graceful_shutdown=5,
                                           timeout_keep_alive=int(config.keep_alive)))
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
