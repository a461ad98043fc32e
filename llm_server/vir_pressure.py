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
    """The level from the number of requests waiting for their first token, told at every change (`observe`): one
    STEP up as soon as more than `waiting` wait, then one more for each whole `interval_s` they still do; one STEP
    down for each whole `interval_s` at or below `waiting` (a dip shorter than that changes nothing). 0 `waiting`:
    never any pressure."""

    def __init__(self, waiting: int, interval_s: float = 1.0) -> None:
        self.waiting = waiting
        self.interval_s = interval_s
        self._level = 0.0
        self._above = False
        self._since = 0.0  # where the current count of whole intervals starts (a change of side, or the last step)
        self._raised = float("-inf")  # the last step up

    def _advanced(self, now: float) -> tuple[float, float]:
        """The level and the count's start after the whole intervals spent on the current side until `now`."""
        steps = int((now - self._since) / self.interval_s)
        if steps <= 0:
            return self._level, self._since
        level = self._level + (STEP if self._above else -STEP) * steps
        return min(1.0, max(0.0, level)), self._since + steps * self.interval_s

    def level_at(self, now: float) -> float:
        """The level at `now` (the gauge reads it between changes)."""
        return self._advanced(now)[0] if self.waiting > 0 else 0.0

    def observe(self, pending: int, now: float | None = None) -> float:
        """Record that `pending` requests now wait for a first token; the level for a request arriving now."""
        if self.waiting <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        level, since = self._advanced(now)
        if level > self._level:
            self._raised = since
        self._level, self._since = level, since
        above = pending > self.waiting
        if above != self._above:
            self._above, self._since = above, now
            if above and self._level < 1.0 and now - self._raised >= self.interval_s:
                self._level = min(1.0, self._level + STEP)
                self._raised = now
        return self._level
