"""Admission control: a bounded number of requests in flight and a bounded queue; past both, 429 at once."""

from __future__ import annotations

import asyncio

from router.errors import APIError


class Limiter:
    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency = max(concurrency, 1)
        self.capacity = self.concurrency + max(queue, 0)
        self.active = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(self.concurrency)

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if there is room in it; pair with exactly one release()."""
        if self.active + self.waiting >= self.capacity:
            raise APIError(429, f"server busy: {self.active} requests running and {self.waiting} queued; retry later",
                           code="too_many_requests", headers={"Retry-After": "1"})
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._slots.release()
