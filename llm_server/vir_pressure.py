"""ViR as a pressure valve (Flash checkpoints): when too many requests wait for their first token here, ask the
vision side to compress more tiles to 64 rows, step by step, and step back once the queue is short again.

A Flash checkpoint's ViR router already keeps 64 instead of 256 rows for the tiles it scores as compressible (the
share above a request-wide quantile). Lowering that quantile's threshold compresses more tiles: fewer visual
tokens to prefill, so the engine admits more requests, at an accuracy cost the InternVL3.5 paper measures as small
for its own threshold. The level travels as `EncodeOptions.vir_pressure` (0..1: how far the threshold moves toward
the vision server's `--vir-pressure-floor`). Requests with `vir: "off"` are never compressed; refusal (429) stays
the last resort, at the router."""

from __future__ import annotations

import time

STEP = 0.25  # four steps from the checkpoint's rule to the floor


class VirPressure:
    """The level from the number of requests waiting for their first token: up one STEP per `interval_s` while
    more than `waiting` wait, down one STEP for each `interval_s` without that (0 `waiting`: never any pressure)."""

    def __init__(self, waiting: int, interval_s: float = 1.0) -> None:
        self.waiting = waiting
        self.interval_s = interval_s
        self._level = 0.0
        self._high = 0.0  # when pressure was last seen (the steps down count whole intervals from there)
        self._raised = float("-inf")  # when the level last went up

    def _quiet_steps(self, now: float) -> int:
        return int((now - self._high) / self.interval_s) if self._level > 0 else 0

    def level_at(self, now: float) -> float:
        """The level now, with the steps down the quiet time since the last pressure has earned (for the gauge)."""
        return max(0.0, self._level - STEP * self._quiet_steps(now))

    def observe(self, pending: int, now: float | None = None) -> float:
        """The level for a request arriving while `pending` requests (itself included) wait for a first token."""
        if self.waiting <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        if pending > self.waiting:  # pressure now: taken to have lasted since the last arrival that saw it
            self._high = now
            if self._level < 1.0 and now - self._raised >= self.interval_s:
                self._level = min(1.0, self._level + STEP)
                self._raised = now
        elif steps := self._quiet_steps(now):
            self._level = max(0.0, self._level - STEP * steps)
            self._high += steps * self.interval_s
        return self._level
