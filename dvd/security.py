"""Security between the nodes: a shared-secret token on every internal gRPC call, and optional mutual TLS.

The same settings serve both ends: a server checks `authorization: Bearer <token>` on every call before any
handler runs (UNAUTHENTICATED otherwise; the standard `grpc.health.v1` service stays open so probes need no
secret) and, with TLS, serves on the node's certificate and demands a client certificate signed by the CA; a
client sends the token and, with TLS, verifies the server against the CA and presents the node's certificate.
One CA, one certificate per node (SANs = the names clients dial), like a service mesh's mTLS; the TCP data plane
runs under the same certificates (`ssl_context`).
Settings come from flags or the environment (DVD_INTERNAL_TOKEN, DVD_TLS_CERT, DVD_TLS_KEY, DVD_TLS_CA,
DVD_REQUIRE_INTERNAL_TOKEN), so a compose healthcheck or a tool run in the same container inherits them.
"""

from __future__ import annotations

import collections
import hmac
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from dvd.config import option, parse

log = logging.getLogger("dvd.security")

OPEN_PREFIX = "/grpc.health.v1.Health/"  # probes (kubelet, compose, grpc_health_probe) carry no token
ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class InternalAuth:
    internal_token: str | None = option(None, "shared secret every internal gRPC call carries (prefer the env)",
                                        env="DVD_INTERNAL_TOKEN")
    tls_cert: str | None = option(None, "this node's PEM certificate: served, and shown to servers it calls",
                                  env="DVD_TLS_CERT")
    tls_key: str | None = option(None, "the certificate's PEM private key", env="DVD_TLS_KEY")
    tls_ca: str | None = option(None, "PEM CA that signs every node's certificate (mutual TLS)", env="DVD_TLS_CA")
    require_internal_token: bool = option(False, "refuse to start without an internal token (the deployment files "
                                                 "set it: a forgotten secret stops the service, not its security)",
                                          env="DVD_REQUIRE_INTERNAL_TOKEN")

    def __post_init__(self) -> None:
        if self.require_internal_token and not self.internal_token:
            raise ValueError("no internal token: set DVD_INTERNAL_TOKEN (the same secret on every node; "
                             "openssl rand -hex 32)")
        given = [bool(x) for x in (self.tls_cert, self.tls_key, self.tls_ca)]
        if any(given) and not all(given):
            raise ValueError("TLS needs all of --tls-cert, --tls-key and --tls-ca (mutual TLS), or none")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @classmethod
    def from_env(cls) -> InternalAuth:
        """The settings a tool in the service's environment (a healthcheck) shares with it."""
        return parse(cls, [])

    def _pem(self) -> tuple[bytes, bytes, bytes]:
        assert self.tls_cert and self.tls_key and self.tls_ca
        return Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes(), Path(self.tls_ca).read_bytes()

    # Server side.
    def server(self, options: ChannelOptions = ()) -> grpc.aio.Server:
        interceptors = [TokenCheck(self.internal_token)] if self.internal_token else []
        return grpc.aio.server(options=list(options), interceptors=interceptors)

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Bind `address` (TLS when configured); the bound port, 0 when binding failed."""
        if not self.tls:
            return server.add_insecure_port(address)
        key, cert, ca = self._pem()
        credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
        return server.add_secure_port(address, credentials)

    # The TCP data plane: raw sockets under the same certificates, mutually authenticated.
    def ssl_context(self, server_side: bool) -> ssl.SSLContext | None:
        """None without TLS. Either end must present a certificate the CA signed; names are not checked (a data
        connection is dialled to the address gRPC found, and the ticket it sends names its Encode call). TLS
        carries the connection's introduction; its tiles travel sealed after it (dvd.data_plane.SealedConnection)."""
        if not self.tls:
            return None
        assert self.tls_cert and self.tls_key and self.tls_ca
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH,
                                         cafile=self.tls_ca)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # one round trip to set up
        if server_side:  # no resumption tickets: a session ends with its introduction (dvd.data_plane.SealedConnection)
            ctx.num_tickets = 0
        ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx

    # Client side.
    def _credentials(self) -> grpc.ChannelCredentials:
        key, cert, ca = self._pem()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def aio_channel(self, address: str, options: ChannelOptions = ()) -> grpc.aio.Channel:
        interceptors = token_adders(self.internal_token) if self.internal_token else None
        if self.tls:
            return grpc.aio.secure_channel(address, self._credentials(), options=list(options),
                                           interceptors=interceptors)
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)

    def channel(self, address: str, options: ChannelOptions = ()) -> grpc.Channel:
        """A blocking channel (tools, probes) with the same credentials."""
        channel = (grpc.secure_channel(address, self._credentials(), options=list(options)) if self.tls
                   else grpc.insecure_channel(address, options=list(options)))
        if self.internal_token:
            return grpc.intercept_channel(channel, SyncTokenAdder(self.internal_token))
        return channel


def bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses, before any handler runs, every call without the token (health probes excepted)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                value = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(value, self._expected)
        return False

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIX) or self._authorized(
                details.invocation_metadata):
            return handler
        log.warning("refused an internal call without a valid token", extra={"method": details.method})
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind that only aborts with UNAUTHENTICATED."""
    message = "missing or wrong internal token (authorization: Bearer ...)"

    async def unary(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator, as a streaming handler must be)

    serde = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **serde)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **serde)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **serde)
    return grpc.stream_stream_rpc_method_handler(stream, **serde)


class _AioToken:
    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), bearer(self._token)))


class _UnaryToken(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamToken(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def token_adders(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors adding the token to an asyncio channel's calls: one object per call kind, because the
    channel files each interceptor under the first kind it matches."""
    return [_UnaryToken(token), _StreamToken(token)]


class _SyncDetails(collections.namedtuple("_SyncDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class SyncTokenAdder(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the token to every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: Any) -> _SyncDetails:
        return _SyncDetails(details.method, details.timeout, [*(details.metadata or ()), bearer(self._token)],
                            details.credentials, details.wait_for_ready, getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)
