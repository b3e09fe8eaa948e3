"""Bounded prefetch of the cache shards the next training batches read.

The data order is a pure function of the position (data.py's DataOrder), so which shards a
batch reads is known before its step starts. A background thread reads and verifies the
shards of the next ``depth`` positions while the device thread steps; the step then only
makes tensors out of bytes already in memory.

Only file reads and hash checks happen on the prefetch thread (ShardStore.fetch uses no
torch): every torch op stays on the device thread. Every random draw (flips, captions,
noise) stays in the step too, so the batches are the same with and without prefetch, and a
resumed run starts the prefetch at its own position. At most ``depth`` batches wait in the
queue and one is being read, whatever the dataset's size. A shard the thread found damaged
is left out, and the step's own read repairs it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from types import TracebackType

from dropkiln.stages.cache import ShardRef
from dropkiln.stages.shards import CorruptShard, FetchedShard, ShardStore

log = logging.getLogger(__name__)

DEPTH = 4
"""Batches read ahead of the step: enough to hide a slow read, a few images' memory each."""

Shards = dict[ShardRef, FetchedShard]


class ShardPrefetch:
    """``with ShardPrefetch(store, refs_at, first) as prefetch: prefetch.take(position)``."""

    def __init__(
        self,
        store: ShardStore,
        refs_at: Callable[[int], list[ShardRef]],
        first: int,
        depth: int = DEPTH,
    ) -> None:
        self._store = store
        self._refs_at = refs_at
        self._queue: queue.Queue[tuple[int, Shards]] = queue.Queue(maxsize=depth)
        self._expected = first
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._read_ahead, args=(first,), name="shard-prefetch", daemon=True
        )
        self._lock = threading.Lock()
        self._held = 0
        self.peak_held_bytes = 0
        """The most bytes of shard files held at once (read ahead, not yet taken)."""
        self.peak_held_batches = 0

    def __enter__(self) -> ShardPrefetch:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            self._drain()
            self._thread.join(timeout=0.05)
        self._drain()

    def take(self, position: int) -> Shards:
        """The shards of the batch at ``position``; empty when the prefetch has gone past it
        (the step then reads its shards itself)."""
        if position < self._expected or self._stop.is_set():
            return {}
        while True:
            try:
                at, shards = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._thread.is_alive():
                    continue
                return {}  # the thread failed (logged): the step reads for itself
            self._release(shards)
            self._expected = at + 1
            if at == position:
                return shards

    def _read_ahead(self, position: int) -> None:
        try:
            self._read_from(position)
        except Exception:
            log.warning("shard prefetch stopped; batches read their own shards", exc_info=True)

    def _read_from(self, position: int) -> None:
        while not self._stop.is_set():
            shards: Shards = {}
            for ref in dict.fromkeys(self._refs_at(position)):
                try:
                    shards[ref] = self._store.fetch(ref.shard, ref.key)
                except CorruptShard:
                    continue
            self._hold(shards)
            while not self._stop.is_set():
                try:
                    self._queue.put((position, shards), timeout=0.1)
                    break
                except queue.Full:
                    continue
            position += 1

    def _hold(self, shards: Shards) -> None:
        with self._lock:
            self._held += sum(shard.nbytes for shard in shards.values())
            self.peak_held_bytes = max(self.peak_held_bytes, self._held)
            self.peak_held_batches = max(self.peak_held_batches, self._queue.qsize() + 1)

    def _release(self, shards: Shards) -> None:
        with self._lock:
            self._held -= sum(shard.nbytes for shard in shards.values())

    def _drain(self) -> None:
        while True:
            try:
                _, shards = self._queue.get_nowait()
            except queue.Empty:
                return
            self._release(shards)
