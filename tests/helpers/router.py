"""Shared pieces of the router tests (no tests here): a tiny local image server and request/image builders."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

from benchmarks.media import data_url

__all__ = ["ImageHandler", "data_url", "image_server", "png_bytes", "user_message"]


def png_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def user_message(*parts: str | dict, images: tuple[str, ...] = ()) -> dict:
    """A user message with image URLs first, then text parts."""
    content = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    content += [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]
    return {"role": "user", "content": content}


class ImageHandler(BaseHTTPRequestHandler):
    """GET /img/<name> serves a PNG; /slow sleeps; /big sends too much; /redirect?to=URL; /missing is a 404."""

    images: ClassVar[dict[str, bytes]] = {}
    hosts_seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.hosts_seen.append(self.headers.get("Host", ""))
        path, _, query = self.path.partition("?")
        if path.startswith("/img/") and path[5:] in self.images:
            self._send(200, self.images[path[5:]])
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query.removeprefix("to="))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/slow":
            time.sleep(3)
            self._send(200, png_bytes())
        elif path == "/big":
            self._send(200, b"\0" * 300_000)
        else:
            self._send(404, b"not found")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def image_server(images: dict[str, bytes] | None = None) -> Iterator[tuple[str, list[str]]]:
    """A threaded HTTP server serving `images` under /img/<name>: its base URL (http://127.0.0.1:P) and the Host
    headers it received."""
    handler = type("Handler", (ImageHandler,), {"images": dict(images or {}), "hosts_seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.hosts_seen
    finally:
        server.shutdown()
        server.server_close()
