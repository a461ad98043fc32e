"""Content-addressed embeddings, the rule both caches share: what an embedding's key is made of, and a least
recently used store within a byte budget.

The language server keeps embeddings of the images its own conversations resent (llm_server/embedding_cache.py);
the vision server keeps what it encoded recently, so that a request that lands on another language replica costs
a transfer, not a ViT pass (vision_server/service.py). Both key an item the same way."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from dvd.v2 import vision_pb2

V = TypeVar("V")


def embedding_keys(media: Sequence[vision_pb2.Media], options: vision_pb2.EncodeOptions,
                   request_wide: bool) -> list[str]:
    """One key per image or video: its content hash plus the options that shape its embedding (an image's own tile
    cap, a video's frame sampling, ViR's pressure level).

    With ViR (`request_wide`: a Flash checkpoint) the compression decision is a quantile over every tile of the
    request, so an image's rows also depend on the other images it came with: then their hashes are part of the
    key. The language server also gives the keys to vLLM as multi-modal UUIDs, so its prefix cache never mixes two
    different embeddings of one image.
    """
    video = f"video:{options.video.num_frames}:{options.video.fps!r}"
    digests = [hashlib.sha256(m.data).hexdigest() + (video if m.kind == vision_pb2.MEDIA_KIND_VIDEO else "")
               for m in media]
    caps = [m.max_tiles for m in media]
    suffix = f"|vir={options.vir}" + (f"|pressure={options.vir_pressure!r}" if options.vir_pressure else "")
    if request_wide and options.vir != vision_pb2.VIR_MODE_OFF and len(media) > 1:
        # Neighbours shape the quantile with their own tile counts.
        suffix += "|with=" + ",".join(f"{d}:{c or options.max_tiles}" for d, c in zip(digests, caps, strict=True))
    return [hashlib.sha256(f"{d}|tiles={c or options.max_tiles}{suffix}".encode()).hexdigest()
            for d, c in zip(digests, caps, strict=True)]


class ByteLRU(Generic[V]):
    """The least recently used entries that fit in `max_bytes` (0: keeps nothing); with `max_age_s`, an entry also
    goes once it is that old, used or not (a short-lived cache). `on_evict` counts what the budget pushed out."""

    def __init__(self, max_bytes: int, size: Callable[[V], int], max_age_s: float | None = None,
                 on_evict: Callable[[], None] = lambda: None) -> None:
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._size = size
        self._on_evict = on_evict
        self._entries: OrderedDict[str, tuple[V, float]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.max_age_s is not None and time.monotonic() - entry[1] > self.max_age_s:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, value: V) -> None:
        size = self._size(value)
        if size > self.max_bytes or key in self._entries:
            return
        if self.max_age_s is not None:  # the old ones first: the oldest entries are at the front only by use
            now = time.monotonic()
            for old in [k for k, (_, t) in self._entries.items() if now - t > self.max_age_s]:
                self._drop(old)
        while self.bytes + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self._on_evict()
        self._entries[key] = (value, time.monotonic())
        self.bytes += size

    def _drop(self, key: str) -> None:
        value, _ = self._entries.pop(key)
        self.bytes -= self._size(value)
