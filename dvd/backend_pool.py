"""One pool of gRPC backends for both clients (the language server's vision pool, the router's language pool):
discovery, health, least-load choice. What a call does on failure stays with each client, because the rules
differ (the router must not retry once a token went out; the vision pool retries anything but bad input).

Targets are `host:port` (one backend) or `dns:name:port`: every address the name resolves to is a backend, and
the name is resolved again every `resolve_interval` seconds, so scaling a Kubernetes headless Service (or any
DNS round-robin name) needs no edit. Backends that leave the DNS answer are dropped once their calls finish.

Load: a backend's load is what others put on it plus what this client does. Others': what it reported in its last
health reply (grpc.health.v1's, the `dvd-load` trailer: queued tiles for a vision server, running requests for a
language server) less
this client's own calls at that moment; this client's: `outstanding_weight` (a call's size in the reported unit)
for each call in flight now. Adding the report to every own call instead counted each call twice, once as stale:
a single router whose last report caught a replica at 3 of 4 requests sent it nothing new for the next health
interval, and two replicas took turns at full and nearly idle.

Affinity (`pick_for`): a request with a key (the router's: a conversation's first image, or its opening; the vision
pool's: the first image's content key) goes to the key's backend on a hash ring (bounded-load consistent hashing,
Mirrokni, Thorup and Zadimoghaddam 2018): the first backend clockwise from the key whose load, with this call, stays
within (1 + `affinity_balance`) x the mean load with this call, rounded up (and never below one call: an idle
backend takes a call). So a conversation keeps its replica (its embedding cache and vLLM's prefix cache) while that
replica is not overloaded, spills to the next on the ring when it is, and a backend joining or leaving moves only
the keys on its own arcs. The ring holds every known backend, ready or not: one that is down for a moment takes only
its own keys elsewhere, and gets them back when it returns.

Health: a probe is grpc.health.v1's Check for the backend's service; a backend that turns SERVING is described
once (`describe`: its Metadata call, which the client may refuse, e.g. another model) before it takes calls.
A refused or reset probe marks a backend down at once (the process is gone: fail over now). A probe that
only runs out of time marks it down after `failure_threshold` in a row, as Kubernetes' probe failureThreshold
does: a busy server on a loaded host can answer one probe late, and dropping the only backend for that turns
a 429 into a 503.

Calls: a failure tied to one request (its bytes, its segment, an error the server raised while encoding it)
fails or retries that request only. A backend leaves the rotation for failures of the backend: unreachable or
not ready (`mark_down`), or `error_threshold` failed calls in a row across requests (`call_failed`), and comes
back on its own at its next good health probe. Before this rule one request's data-plane error took the only
vision server out of rotation, and every request behind it got a 503 until the next probe.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc

from dvd.health import Reply, probe
from dvd.security import InternalAuth

log = logging.getLogger("dvd.backend_pool")

S = TypeVar("S")
DNS_PREFIX = "dns:"
RING_POINTS = 64  # points per backend on the affinity ring: each backend's share of keys within a few percent
AFFINITY_BALANCE = 0.25  # how far above the mean load a key's own backend still takes it (the router's default)
# gRPC's default reconnect backoff grows to 120 s: a replica that restarts after a minute down would wait that
# long to rejoin (found by benchmarks/chaos.py). Health probes run every few seconds; reconnect as often.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
                     ("grpc.max_reconnect_backoff_ms", 2000)]


@dataclass
class Backend(Generic[S]):
    address: str
    channel: grpc.aio.Channel
    stub: S
    ready: bool = False
    reported_load: float = 0.0
    outstanding: int = 0  # calls this client has in flight on it
    outstanding_at_report: int = 0  # ... when its last health reply came
    health: health_pb2_grpc.HealthStub | None = None
    metadata: Any = None  # its Metadata reply, read when it last turned ready or a new process answered
    instance: str = ""  # the process that answered its last health probe (dvd.health.INSTANCE_KEY)
    last_error: str = "not checked yet"
    target: str = ""  # the configured target it came from (a dns: name, or the address itself)
    slow_probes: int = 0  # health probes in a row that ran out of time
    failed_calls: int = 0  # calls in a row that failed on this backend (any success resets it)

    @property
    def host(self) -> str:
        host = self.address.rsplit(":", 1)[0]
        return host[1:-1] if host.startswith("[") else host


# Reads a backend's Metadata into `backend.metadata`: True to take it, False (after logging why) to refuse it. Raises
# grpc.aio.AioRpcError when the backend cannot answer.
Describe = Callable[[Backend[S]], Awaitable[bool]]


def split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{target!r} is not host:port")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class BackendPool(Generic[S]):
    targets: Sequence[str]
    stub_factory: Callable[[grpc.aio.Channel], S]
    describe: Describe[S]
    service: str  # the gRPC service whose health is asked
    name: str  # for logs: "vision", "language"
    auth: InternalAuth = field(default_factory=InternalAuth)
    channel_options: Sequence[tuple[str, Any]] = ()
    health_interval: float = 2.0
    health_timeout: float = 2.0
    resolve_interval: float = 10.0
    outstanding_weight: float = 1.0
    failure_threshold: int = 3
    error_threshold: int = 3
    affinity_balance: float = AFFINITY_BALANCE
    backends: list[Backend[S]] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _ring: tuple[tuple[int, ...], tuple[str, ...]] = ((), ())
    _ring_of: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for target in self.targets:
            split_target(target.removeprefix(DNS_PREFIX))

    # -- life cycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Channels must be created on the serving event loop, hence not in __init__."""
        await self.resolve()
        await self.check_all()
        self._tasks = [asyncio.create_task(self._every(self.health_interval, self.check_all),
                                           name=f"{self.name}-health")]
        if any(t.startswith(DNS_PREFIX) for t in self.targets):
            self._tasks.append(asyncio.create_task(self._every(self.resolve_interval, self.resolve),
                                                   name=f"{self.name}-resolve"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(b.channel.close() for b in self.backends))
        self.backends.clear()

    @staticmethod
    async def _every(seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:  # a loop that dies would freeze the pool's view: log and go on
                log.exception("pool maintenance failed")

    # -- discovery ----------------------------------------------------------------------------------------------
    async def _addresses(self, target: str) -> list[str]:
        if not target.startswith(DNS_PREFIX):
            return [target]
        host, port = split_target(target.removeprefix(DNS_PREFIX))
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            log.warning("could not resolve backends", extra={"pool": self.name, "target": target, "error": str(e)})
            return [b.address for b in self.backends if b.target == target]  # keep what we had
        return sorted({join_address(str(info[4][0]), port) for info in infos})

    def _channel(self, address: str, target: str) -> grpc.aio.Channel:
        options = [*RECONNECT_OPTIONS, *self.channel_options]
        if target.startswith(DNS_PREFIX) and self.auth.tls:  # certificates name the service, not pod IPs
            options.append(("grpc.ssl_target_name_override", split_target(target.removeprefix(DNS_PREFIX))[0]))
        return self.auth.aio_channel(address, options)

    async def resolve(self) -> None:
        """Add the backends the targets now name, drop the ones they no longer name (after their calls end)."""
        wanted: dict[str, str] = {}
        for target in self.targets:
            for address in await self._addresses(target):
                wanted.setdefault(address, target)
        known = {b.address for b in self.backends}
        for address, target in wanted.items():
            if address not in known:
                channel = self._channel(address, target)
                self.backends.append(Backend(address, channel, self.stub_factory(channel), target=target,
                                             health=health_pb2_grpc.HealthStub(channel)))
                if target != address:
                    log.info("backend discovered", extra={"pool": self.name, "backend": address, "target": target})
        for gone in [b for b in self.backends if b.address not in wanted]:
            self.backends.remove(gone)
            log.info("backend left", extra={"pool": self.name, "backend": gone.address})
            asyncio.create_task(self._close_when_idle(gone))  # noqa: RUF006 (the channel outlives its calls)

    @staticmethod
    async def _close_when_idle(backend: Backend[S], limit_s: float = 600.0) -> None:
        for _ in range(int(limit_s)):
            if not backend.outstanding:
                break
            await asyncio.sleep(1.0)
        await backend.channel.close()

    # -- health -------------------------------------------------------------------------------------------------
    async def probe(self, backend: Backend[S]) -> Reply:
        """grpc.health.v1's Check for the backend's service: whether it is SERVING, its load, its process."""
        assert backend.health is not None
        return await probe(backend.health, self.service, self.health_timeout)

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(b) for b in list(self.backends)))

    async def _check(self, backend: Backend[S]) -> None:
        try:
            ready, load, instance = await self.probe(backend)
            if ready and (not backend.ready or instance != backend.instance):  # (re)started: what it is now, first
                ready = await self.describe(backend)
                backend.instance = instance if ready else ""
        except grpc.aio.AioRpcError as e:
            late = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            backend.slow_probes = backend.slow_probes + 1 if late else 0
            if late and backend.slow_probes < self.failure_threshold:
                log.info("health probe late", extra={"pool": self.name, "backend": backend.address,
                                                      "in_a_row": backend.slow_probes})
            else:
                self.mark_down(backend, f"{e.code().name}: {e.details()}")
            return
        backend.slow_probes = 0
        if ready and not backend.ready:
            backend.failed_calls = 0  # back in rotation with a clean slate
        if ready != backend.ready:
            log.info("backend ready" if ready else "backend not ready",
                     extra={"pool": self.name, "backend": backend.address})
        backend.ready, backend.reported_load, backend.outstanding_at_report = ready, load, backend.outstanding
        backend.last_error = "" if ready else "reports not ready"

    def mark_down(self, backend: Backend[S], why: str) -> None:
        """Out of rotation until its next good health probe: the backend itself failed (gone, not ready)."""
        if backend.ready:
            log.warning("backend down", extra={"pool": self.name, "backend": backend.address, "error": why})
        backend.ready, backend.last_error = False, why

    def call_failed(self, backend: Backend[S], why: str) -> None:
        """A call failed in a way that may be the request's alone: the backend leaves the rotation only once
        `error_threshold` calls in a row failed on it."""
        backend.failed_calls += 1
        if backend.failed_calls >= self.error_threshold:
            self.mark_down(backend, f"{backend.failed_calls} calls in a row failed, the last: {why}")

    def call_succeeded(self, backend: Backend[S]) -> None:
        backend.failed_calls = 0

    # -- choice -------------------------------------------------------------------------------------------------
    @property
    def ready_backends(self) -> list[Backend[S]]:
        return [b for b in self.backends if b.ready]

    def load(self, backend: Backend[S]) -> float:
        others = max(backend.reported_load - self.outstanding_weight * backend.outstanding_at_report, 0.0)
        return others + self.outstanding_weight * backend.outstanding

    def pick(self, exclude: set[str] | frozenset[str] = frozenset(), *,
             fallback_to_unready: bool = False) -> Backend[S] | None:
        """The least-loaded ready backend not in `exclude`. With `fallback_to_unready`, when none is ready, the
        least-loaded untried one (health may be stale) rather than none."""
        candidates = [b for b in self.ready_backends if b.address not in exclude]
        if not candidates and fallback_to_unready:
            candidates = [b for b in self.backends if b.address not in exclude]
        return min(candidates, key=self.load, default=None)

    def pick_for(self, key: bytes | None, exclude: set[str] | frozenset[str] = frozenset()
                 ) -> tuple[Backend[S] | None, str]:
        """The backend for a request with affinity `key` (None: least load), and how it was chosen: "owner" (the
        key's backend), "spill" (the key's backend was over the load bound, or not available: the next on the
        ring), "none" (no key: least load)."""
        if key is None:
            return self.pick(exclude), "none"
        candidates = {b.address: b for b in self.ready_backends if b.address not in exclude}
        if len(candidates) < 2:
            return next(iter(candidates.values()), None), "owner"
        loads = {address: self.load(b) for address, b in candidates.items()}
        # An idle backend always takes a call: with calls weighing more than one unit (the vision pool's tiles),
        # the mean alone would put every backend of an idle pool over the bound.
        bound = max(self.outstanding_weight, math.ceil((1 + self.affinity_balance) * (
            sum(loads.values()) + self.outstanding_weight) / len(loads)))
        points, addresses = self._affinity_ring()
        start = bisect.bisect(points, ring_point(key))
        seen: set[str] = set()
        for i in range(len(points)):
            address = addresses[(start + i) % len(points)]
            if address in seen:
                continue
            seen.add(address)
            if address in candidates and loads[address] + self.outstanding_weight <= bound:
                return candidates[address], "owner" if len(seen) == 1 else "spill"
        return self.pick(exclude), "spill"  # every one over the bound (fractional loads): least load

    def _affinity_ring(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        known = frozenset(b.address for b in self.backends)
        if known != self._ring_of:
            ring = sorted((ring_point(f"{address}#{i}".encode()), address) for address in known
                          for i in range(RING_POINTS))
            self._ring = (tuple(p for p, _ in ring), tuple(a for _, a in ring))
            self._ring_of = known
        return self._ring


def ring_point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
