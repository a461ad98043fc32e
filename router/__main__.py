"""`python -m router --port P --llm HOST:PORT[,HOST:PORT] ...`: serve the gateway with uvicorn."""

from __future__ import annotations

import logging
import math
import socket

import uvicorn

from dvd.logs import setup_logging
from dvd.runtime import report_ports
from dvd.tracing import setup_tracing
from router.app import create_app
from router.config import parse_args


def main() -> None:
    config = parse_args()
    setup_logging(config.logs.log_level, config.logs.log_format)
    setup_tracing("dvd-router")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per fetched image is noise
    # Bound here, before uvicorn starts: with --port 0 the launcher learns the port and no other process can take it.
    sockets = [listen(config.host, config.port)]
    ports = {"http": sockets[0].getsockname()[1]}
    if config.metrics_port is not None:  # one server, two sockets: the app tells them apart by the local port
        sockets.append(listen(config.host, config.metrics_port))
        ports["metrics"] = sockets[1].getsockname()[1]
    report_ports(**ports)
    server = uvicorn.Server(uvicorn.Config(create_app(config, internal_port=ports.get("metrics")), log_config=None,
                                           timeout_graceful_shutdown=math.ceil(config.deadlines.drain_s),
                                           timeout_keep_alive=int(config.keep_alive)))
    server.run(sockets=sockets)


def listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections made once the port is reported wait in the backlog until uvicorn accepts them
    return sock


if __name__ == "__main__":
    main()
