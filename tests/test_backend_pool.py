"""The one backend pool both clients use: DNS discovery (re-resolved: backends join and leave), least load with
the outstanding-call weight, health probes marking backends up and down."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections import Counter

import grpc
import pytest

from dvd.backend_pool import Backend, BackendPool
from dvd.health import Reply


async def described(backend: Backend) -> bool:
    return True


def pool_for(targets: tuple[str, ...], probe, describe=described, **kw) -> BackendPool:  # type: ignore[no-untyped-def]
    """A pool whose health probe is `probe` (no server behind the addresses): (ready, load[, instance])."""
    pool = BackendPool(targets, lambda channel: object(), describe, "test.Service", "test", **kw)

    async def probed(backend: Backend) -> Reply:
        return Reply(*await probe(backend))

    pool.probe = probed  # type: ignore[method-assign]
    return pool


async def always_ready(backend: Backend) -> tuple[bool, float]:
    return True, 0.0


async def test_dns_targets_follow_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = ["10.0.0.1", "10.0.0.2"]

    async def fake_getaddrinfo(host: str, port: int, **_: object) -> list:
        assert host == "vision.example"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answer]

    pool = pool_for(("dns:vision.example:50051", "127.0.0.1:7"), always_ready)
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake_getaddrinfo)
    await pool.resolve()
    assert sorted(b.address for b in pool.backends) == ["10.0.0.1:50051", "10.0.0.2:50051", "127.0.0.1:7"]
    leaving = next(b for b in pool.backends if b.address == "10.0.0.1:50051")
    leaving.outstanding = 1  # a call in flight keeps its channel open until it ends
    answer[:] = ["10.0.0.2", "10.0.0.3"]  # scaled: one pod replaced
    await pool.resolve()
    assert sorted(b.address for b in pool.backends) == ["10.0.0.2:50051", "10.0.0.3:50051", "127.0.0.1:7"]
    leaving.outstanding = 0
    await pool.close()


async def test_a_name_that_stops_resolving_keeps_its_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    fail = False

    async def flaky_getaddrinfo(host: str, port: int, **_: object) -> list:
        if fail:
            raise socket.gaierror("temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.9", port))]

    pool = pool_for(("dns:llm.example:50061",), always_ready)
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", flaky_getaddrinfo)
    await pool.resolve()
    fail = True
    await pool.resolve()
    assert [b.address for b in pool.backends] == ["10.0.0.9:50061"]
    await pool.close()


async def test_real_dns_resolves_localhost() -> None:
    pool = pool_for(("dns:localhost:50099",), always_ready)
    await pool.resolve()
    assert "127.0.0.1:50099" in {b.address for b in pool.backends}
    await pool.close()


async def test_least_load_counts_outstanding_calls_with_their_weight() -> None:
    loads = {"127.0.0.1:1": 10.0, "127.0.0.1:2": 0.0}

    async def probe(backend: Backend) -> tuple[bool, float]:
        return True, loads[backend.address]

    pool = pool_for(tuple(loads), probe, outstanding_weight=16)
    await pool.resolve()
    await pool.check_all()
    assert pool.pick().address == "127.0.0.1:2"
    next(b for b in pool.backends if b.address == "127.0.0.1:2").outstanding = 1  # 0 + 16 > 10
    assert pool.pick().address == "127.0.0.1:1"
    assert pool.pick({"127.0.0.1:1"}).address == "127.0.0.1:2"
    await pool.close()


async def test_a_stale_report_does_not_count_this_clients_own_calls_twice() -> None:
    """A single router: the last report caught replica 1 at 3 requests, all its own; two of them have finished
    since and replica 2 has 2. Replica 1 is the lighter one (1 vs 2), not the heavier (3 + 1 vs 0 + 2)."""
    running = {"127.0.0.1:1": 3.0, "127.0.0.1:2": 0.0}

    async def probe(backend: Backend) -> tuple[bool, float]:
        return True, running[backend.address]

    pool = pool_for(tuple(running), probe)
    await pool.resolve()
    one, two = sorted(pool.backends, key=lambda b: b.address)
    one.outstanding = 3
    await pool.check_all()
    one.outstanding, two.outstanding = 1, 2
    assert pool.pick() is one
    running.update({"127.0.0.1:1": 1.0, "127.0.0.1:2": 5.0})  # another router's 3 requests join our 2 on replica 2
    await pool.check_all()
    assert (pool.load(one), pool.load(two)) == (1.0, 5.0)
    await pool.close()


async def test_unreachable_backends_are_down_and_skipped() -> None:
    async def probe(backend: Backend) -> tuple[bool, float]:
        if backend.address.endswith(":1"):
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details="connection refused")
        return True, 0.0

    pool = pool_for(("127.0.0.1:1", "127.0.0.1:2"), probe)
    await pool.resolve()
    await pool.check_all()
    down = next(b for b in pool.backends if b.address == "127.0.0.1:1")
    assert not down.ready and "UNAVAILABLE" in down.last_error
    assert pool.pick().address == "127.0.0.1:2"
    assert pool.pick({"127.0.0.1:2"}) is None
    assert pool.pick({"127.0.0.1:2"}, fallback_to_unready=True) is down  # stale health: worth one try
    await pool.close()


async def test_a_late_probe_needs_company_before_a_backend_is_down() -> None:
    late = 0

    async def probe(backend: Backend) -> tuple[bool, float]:
        if late:
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details="Deadline Exceeded")
        return True, 0.0

    pool = pool_for(("127.0.0.1:1",), probe, failure_threshold=3)
    await pool.resolve()
    await pool.check_all()
    (backend,) = pool.backends
    late = 1
    await pool.check_all()
    await pool.check_all()
    assert backend.ready  # two late answers from a busy server: still serving
    late = 0
    await pool.check_all()
    late = 1
    for _ in range(2):
        await pool.check_all()
    assert backend.ready  # the count restarts after an answer in time
    await pool.check_all()
    assert not backend.ready and "DEADLINE_EXCEEDED" in backend.last_error
    await pool.close()


def test_targets_must_name_a_port() -> None:
    with pytest.raises(ValueError, match="host:port"):
        pool_for(("dns:no-port",), always_ready)


async def test_one_requests_failure_is_not_the_backends() -> None:
    """A call that fails for its own reasons leaves the backend in rotation; failures in a row across requests take
    it out, and its next good probe brings it back with a clean slate."""
    pool = pool_for(("127.0.0.1:1",), always_ready, error_threshold=3)
    await pool.resolve()
    await pool.check_all()
    (backend,) = pool.backends
    pool.call_failed(backend, "INTERNAL: one request's segment")
    pool.call_failed(backend, "INTERNAL: another's")
    pool.call_succeeded(backend)
    pool.call_failed(backend, "INTERNAL: a third's")
    assert backend.ready and pool.pick() is backend  # a success between them: never three in a row
    pool.call_failed(backend, "INTERNAL: again")
    pool.call_failed(backend, "INTERNAL: and again")
    assert not backend.ready and "3 calls in a row" in backend.last_error
    await pool.check_all()
    assert backend.ready and backend.failed_calls == 0  # back on its own
    await pool.close()


async def test_affinity_keeps_each_key_on_its_backend_and_moves_only_a_leaving_or_joining_ones_share() -> None:
    """Bounded-load consistent hashing with every backend idle: a key's backend is fixed; a backend that goes down
    or leaves gives only its own keys to others, and one that joins takes keys only from others (about 1/n)."""
    addresses = [f"10.0.0.{i}:50061" for i in range(1, 5)]
    pool = pool_for(tuple(addresses), always_ready)
    await pool.resolve()
    for b in pool.backends:
        b.ready = True
    keys = [secrets.token_bytes(16) for _ in range(2000)]

    def route() -> dict[bytes, tuple[str, str]]:
        """key -> (address, choice)"""
        chosen = {}
        for key in keys:
            backend, choice = pool.pick_for(key)
            assert backend is not None
            chosen[key] = (backend.address, choice)
        return chosen

    def moved(before: dict[bytes, tuple[str, str]], after: dict[bytes, tuple[str, str]]) -> set[bytes]:
        return {k for k in keys if after[k][0] != before[k][0]}

    before = route()
    assert before == route() and {c for _, c in before.values()} == {"owner"}  # stable
    shares = Counter(a for a, _ in before.values())
    assert len(shares) == 4 and min(shares.values()) > 2000 / 4 * 0.6, shares
    down = pool.backends[0]
    its_keys = {k for k in keys if before[k][0] == down.address}
    down.ready = False  # down for a moment: only its keys go elsewhere, as spills
    during = route()
    assert moved(before, during) == its_keys and all(during[k][1] == "spill" for k in its_keys)
    down.ready = True
    assert route() == before  # and come back
    pool.backends.remove(down)  # left the DNS answer
    after_leave = route()
    assert moved(before, after_leave) == its_keys
    pool.targets = (*addresses[1:], "10.0.0.9:50061")
    await pool.resolve()  # a new replica joins
    for b in pool.backends:
        b.ready = True
    after_join = route()
    taken = moved(after_leave, after_join)
    assert all(after_join[k][0] == "10.0.0.9:50061" for k in taken) and 2000 / 4 * 0.5 < len(taken) < 2000 / 4 * 1.5
    await pool.close()


async def test_affinity_spills_a_key_whose_backend_is_over_the_load_bound() -> None:
    pool = pool_for(("10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"), always_ready, affinity_balance=0.25)
    await pool.resolve()
    for b in pool.backends:
        b.ready = True
    key = b"a conversation"
    owner, choice = pool.pick_for(key)
    assert owner is not None and choice == "owner"
    owner.outstanding = 2  # mean with this call (3 / 3 = 1) x 1.25, rounded up = 2: 2 + 1 is over it
    spilled, choice = pool.pick_for(key)
    assert spilled is not None and spilled is not owner and choice == "spill"
    assert pool.pick_for(key)[0] is spilled  # the same next replica each time: the spill keeps its caches too
    owner.outstanding = 1  # ceil(1.25 x (1 + 1) / 3) = 1, and 1 + 1 is over it: still spills
    assert pool.pick_for(key) == (spilled, "spill")
    owner.outstanding = 0
    assert pool.pick_for(key) == (owner, "owner")
    assert pool.pick_for(None)[1] == "none"
    await pool.close()


async def test_affinity_with_heavy_calls_gives_an_idle_pool_to_the_owner() -> None:
    """The vision pool weighs a call as 16 tiles: on an idle pool the mean bound (1.25 x 16 / 2 = 10) is below one
    call, and every key went to least load instead of its owner (no vision cache could serve a second ask)."""
    pool = pool_for(("10.0.0.1:1", "10.0.0.2:1"), always_ready, affinity_balance=0.25, outstanding_weight=16)
    await pool.resolve()
    for b in pool.backends:
        b.ready = True
    keys = [f"image {i}".encode() for i in range(20)]
    owners = {k: pool.pick_for(k) for k in keys}
    assert all(choice == "owner" for _, choice in owners.values())
    assert len({b.address for b, _ in owners.values() if b is not None}) == 2  # the keys spread over both
    busy, _ = owners[keys[0]]
    assert busy is not None
    busy.outstanding = 1  # 16 + 16 is over max(16, ceil(1.25 x 32 / 2) = 20): the key spills
    assert pool.pick_for(keys[0])[1] == "spill"
    await pool.close()


async def test_a_new_process_at_the_address_is_described_again() -> None:
    """A server that restarted between two probes (ready both times) answers from a new process: its Metadata (an
    old data port, say) is read again before its next call; the same process is described once."""
    instance = "first"
    seen: list[str] = []

    async def probe(backend: Backend) -> tuple[bool, float, str]:
        return True, 0.0, instance

    async def describe(backend: Backend) -> bool:
        seen.append(instance)
        backend.metadata = instance
        return True

    pool = pool_for(("127.0.0.1:1",), probe, describe)
    await pool.resolve()
    await pool.check_all()
    await pool.check_all()
    assert seen == ["first"]
    instance = "second"
    await pool.check_all()
    (backend,) = pool.backends
    assert seen == ["first", "second"] and backend.metadata == "second" and backend.ready
    await pool.close()
