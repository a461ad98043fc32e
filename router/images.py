"""Turning `image_url` and `video_url` parts into encoded bytes: `data:` URLs decoded, http(s) URLs fetched safely.

Fetching is server-side request forgery's classic door, so unless the operator allows private targets every hop
(first URL and each redirect) is resolved here, every address it resolves to must be public, and the connection
goes to the address that was checked (Host header and TLS SNI keep the name), so DNS cannot change its answer
between the check and the connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import httpx

from dvd.config import MediaLimits
from router.errors import APIError
from router.limits import read_capped

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class FetchLimits:
    media: MediaLimits = field(default_factory=MediaLimits)  # the vision server refuses by the same limits
    timeout: float = 10.0
    max_redirects: int = 3
    allow_private: bool = False
    # Per request: caps what one body can make the gateway fetch and hold, below the language server's 256 MiB.
    max_total_bytes: int = 128 * 1024 * 1024
    concurrency: int = 4


class ImageError(APIError):
    """A client-side problem with one image or video: always a 400 that names it."""

    def __init__(self, message: str, code: str = "invalid_image") -> None:
        super().__init__(400, message, code=code, param="messages")


def _short(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."


def decode_data_url(url: str, max_bytes: int, kind: str = "image") -> bytes:
    """`data:image/...;base64,...` (or `video/...` for a video) -> bytes. Whether the bytes really are one is the
    vision server's call."""
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise ImageError(f"{kind} data URLs must look like 'data:{kind}/<type>;base64,<data>'")
    media_type = header.removesuffix(";base64").split(";")[0].strip().lower()
    if media_type and not media_type.startswith(f"{kind}/") and media_type != "application/octet-stream":
        raise ImageError(f"data URL media type {media_type!r} is not a{'n' if kind == 'image' else ''} {kind}")
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageError(f"{kind} larger than {max_bytes} bytes", code=f"{kind}_too_large")
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"invalid base64 in {kind} data URL: {exc}", code="invalid_base64") from None
    if not data:
        raise ImageError(f"empty {kind} in data URL")
    return data


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> Iterable[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address can carry to the IPv4 network (mapped, 6to4, Teredo, NAT64)."""
    if ip.ipv4_mapped:
        yield ip.ipv4_mapped
    if ip.sixtofour:
        yield ip.sixtofour
    if ip.teredo:
        yield from ip.teredo
    if ip in _NAT64:
        yield ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)


def is_public_address(ip: IPAddress | str) -> bool:
    """False for loopback, private, link-local, shared, reserved, multicast and unspecified addresses."""
    ip = ipaddress.ip_address(ip)
    if not ip.is_global or ip.is_multicast:
        return False
    return not isinstance(ip, ipaddress.IPv6Address) or all(is_public_address(v4) for v4 in _embedded_ipv4(ip))


async def public_addresses(host: str, port: int,
                           allowed: Callable[[IPAddress], bool] = is_public_address) -> list[IPAddress]:
    """Every address `host` resolves to, if `allowed` accepts all of them; ImageError otherwise."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ImageError(f"cannot resolve image host {host!r}: {exc.strerror}", code="image_fetch_failed") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    refused = [str(a) for a in addresses if not allowed(a)]
    if refused or not addresses:
        raise ImageError(f"image host {host!r} resolves to a non-public address ({', '.join(refused)}); refused",
                         code="image_url_forbidden")
    return addresses


class ImageLoader:
    """Loads every image of a request; one shared HTTP client (connection reuse), no proxies from the env."""

    def __init__(self, limits: FetchLimits, allowed: Callable[[IPAddress], bool] = is_public_address) -> None:
        self.limits = limits
        self._allowed = allowed
        self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=limits.timeout)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def load_all(self, urls: Iterable[tuple[str, str, str]]) -> list[bytes]:
        """(url, param, kind) triples -> their bytes, a few at a time; the first failure names its `param`. `kind`
        is "image" or "video"."""
        urls = list(urls)
        if len(urls) > self.limits.media.max_images_per_request:
            raise ImageError(f"{len(urls)} images and videos in one request; at most "
                             f"{self.limits.media.max_images_per_request} are accepted", code="too_many_images")
        slots = asyncio.Semaphore(self.limits.concurrency)
        loaded = 0

        async def one(url: str, param: str, kind: str) -> bytes:
            nonlocal loaded
            async with slots:
                data = await self.load(url, param, kind)
            loaded += len(data)
            if loaded > self.limits.max_total_bytes:
                raise ImageError(f"the request's images and videos exceed {self.limits.max_total_bytes} bytes in "
                                 "total", code="images_too_large")
            return data

        tasks = [asyncio.ensure_future(one(url, param, kind)) for url, param, kind in urls]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # one failure ends the request: stop fetching the others
                task.cancel()

    async def load(self, url: str, param: str = "messages", kind: str = "image") -> bytes:
        try:
            return await self._load(url, kind)
        except ImageError as exc:
            exc.param = param
            raise

    async def _load(self, url: str, kind: str) -> bytes:
        scheme = url.split(":", 1)[0].lower()
        limit = self.limits.media.max_video_bytes if kind == "video" else self.limits.media.max_image_bytes
        if scheme == "data":
            return decode_data_url(url, limit, kind)
        if scheme not in ("http", "https"):
            raise ImageError(f"unsupported {kind} URL scheme {scheme!r} (use data:, http: or https:)",
                             code="invalid_image_url")
        try:
            return await asyncio.wait_for(self._fetch(httpx.URL(url), limit, kind), self.limits.timeout)
        except asyncio.TimeoutError:
            raise ImageError(f"timed out after {self.limits.timeout:g}s fetching {kind} {_short(url)}",
                             code="image_fetch_failed") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ImageError(f"could not fetch {kind} {_short(url)}: {exc or type(exc).__name__}",
                             code="image_fetch_failed") from None

    async def _fetch(self, url: httpx.URL, limit: int, kind: str) -> bytes:
        for _ in range(self.limits.max_redirects + 1):
            if url.scheme not in ("http", "https"):
                raise ImageError(f"{kind} redirect to unsupported scheme {url.scheme!r}", code="invalid_image_url")
            request = await self._request(url)
            response = await self._client.send(request, stream=True)
            try:
                if response.is_redirect:
                    url = url.join(response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise ImageError(f"{kind} URL {_short(str(url))} answered HTTP {response.status_code}",
                                     code="image_fetch_failed")
                return await self._read(response, limit, kind)
            finally:
                await response.aclose()
        raise ImageError(f"more than {self.limits.max_redirects} redirects fetching a{'n' if kind == 'image' else ''} "
                         f"{kind}", code="image_fetch_failed")

    async def _request(self, url: httpx.URL) -> httpx.Request:
        if self.limits.allow_private:
            return self._client.build_request("GET", url)
        port = url.port or (443 if url.scheme == "https" else 80)
        address = (await public_addresses(url.host, port, self._allowed))[0]
        return self._client.build_request("GET", url.copy_with(host=str(address)),
                                          headers={"Host": url.netloc.decode("ascii")},
                                          extensions={"sni_hostname": url.host})

    async def _read(self, response: httpx.Response, limit: int, kind: str) -> bytes:
        data = await read_capped(response.aiter_bytes(), response.headers.get("content-length", ""), limit,
                                 ImageError(f"{kind} larger than {limit} bytes", code=f"{kind}_too_large"))
        if not data:
            raise ImageError(f"empty {kind} body", code=f"invalid_{kind}")
        return data
