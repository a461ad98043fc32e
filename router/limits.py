"""Admission control: a bounded number of requests in flight and a bounded queue; past both, 429 at once.

A refused client is told when to come back (`Retry-After` in whole seconds, RFC 9110, at least 1, and
`retry-after-ms` precisely, as OpenAI's API does; the official clients prefer it). Refused clients are given return
times one after another, spaced by the measured time between two requests finishing, from about when half of the
queue has drained: they come back about as fast as places free up, not in one wave. Two simpler rules failed under
10x overload on 2 vCPUs: a fixed 1 s outlasted a small queue (slots idle, nobody queued, the refused still
waiting); "half the queue" for everyone sent 36 refused clients back every 70 ms, 160 refusals a second whose
uploads and replies cost the clients, on the same 2 vCPUs, 0.22 of a core taken from the requests being served.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator

from router.errors import APIError

# Weight of the latest admitted request in the running mean of how long one holds its slot.
HOLD_EWMA = 0.2
# The longest wait suggested: the official OpenAI clients ignore longer ones (and fall back to their own backoff).
MAX_RETRY_AFTER_S = 60.0


class Limiter:
    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency = max(concurrency, 1)
        self.queue = max(queue, 0)
        self.capacity = self.concurrency + self.queue
        self.active = 0
        self.waiting = 0
        self.hold_s = 1.0  # running mean of how long an admitted request holds its slot (1 s until measured)
        self._slots = asyncio.Semaphore(self.concurrency)
        self._last_return = 0.0  # the latest return time given to a refused client (time.monotonic())

    def retry_after_s(self) -> float:
        """Seconds until this refused client's turn: one gap (the mean time between two requests finishing) after the
        last turn given out, and no sooner than half of the queue has drained (one slot's turn with no queue)."""
        now = time.monotonic()
        gap = self.hold_s / self.concurrency
        earliest = now + max(self.queue / 2, 1.0) * gap
        self._last_return = min(max(self._last_return + gap, earliest), now + MAX_RETRY_AFTER_S)
        return min((self._last_return - now) * random.uniform(0.9, 1.1), MAX_RETRY_AFTER_S)  # turns stay apart

    def refusal(self) -> APIError:
        wait_ms = round(self.retry_after_s() * 1000)
        headers = {"Retry-After": str(max(1, math.ceil(wait_ms / 1000))), "retry-after-ms": str(wait_ms)}
        return APIError(429, f"server busy: {self.active} requests running and {self.waiting} queued; retry later",
                        code="too_many_requests", headers=headers)

    def refuse_if_full(self) -> None:
        """429 when every slot and queue place is taken. Checked once before the request's body is read, so that
        a refusal under overload costs no parsing, and again by reserve()."""
        if self.active + self.waiting >= self.capacity:
            raise self.refusal()

    def reserve(self) -> None:
        """Take a queue place (429 when none is left). A request holds it while its images load, so that a slow
        image fetch holds no model slot, then waits in it for a slot (take()); give it back with unreserve() if
        the request ends before take() returns."""
        self.refuse_if_full()
        self.waiting += 1

    async def take(self) -> float:
        """The slot for a request holding a queue place; returns when it was granted (pass it to release(), exactly
        once). The queue place becomes the slot in one step, so a cancelled wait leaves the place still held."""
        await self._slots.acquire()
        self.waiting -= 1
        self.active += 1
        return time.monotonic()

    def unreserve(self) -> None:
        self.waiting -= 1

    def release(self, granted_at: float) -> None:
        self.hold_s += HOLD_EWMA * (time.monotonic() - granted_at - self.hold_s)
        self.active -= 1
        self._slots.release()


async def read_capped(pieces: AsyncIterator[bytes], content_length: str, limit: int, too_large: Exception) -> bytes:
    """A body of at most `limit` bytes, refused by its declared length where it has one, else as soon as it grows
    past: neither a client's upload nor an image server's answer can make us hold more."""
    if content_length.isdigit() and int(content_length) > limit:
        raise too_large
    body = bytearray()
    async for piece in pieces:
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)
