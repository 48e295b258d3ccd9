"""The delta log: an ordered, hash-chained run of segments for one log_id over a Store.

Writers append with several uploads in flight while the durable head only advances over a
contiguous run of seqs. Readers find the newest segment with O(log n) existence probes,
never a full LIST, and follow new segments by probing seq+1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Final

from drstream.daemon.codec import Body, Manifest
from drstream.daemon.errors import DrstreamError, FencedError, SegmentFormatError, StoreError
from drstream.daemon.keyring import KeyRing
from drstream.daemon.layout import segment_key, segments_prefix, seq_from_key
from drstream.daemon.lifecycle import Starting
from drstream.daemon.logging import get_logger
from drstream.daemon.metrics import BYTES, ERRORS, UPLOAD_SECONDS
from drstream.daemon.retry import Backoff, retrying
from drstream.daemon.segment import (
    ZERO_DIGEST,
    chain_break,
    encode_segment,
    parse_header,
    read_manifest,
    segment_digest,
)
from drstream.daemon.store import Store
from drstream.daemon.tip import TipChannel

DEFAULT_MAX_IN_FLIGHT: Final = 4
DEFAULT_ZSTD_LEVEL: Final = 1
# a failed upload is retried with the same bytes after 0.1-0.2 s, doubling up to 5-10 s
UPLOAD_BACKOFF: Final = Backoff(base_s=0.2, max_s=10.0)
FOLLOW_POLL_MIN_S: Final = 0.05
FOLLOW_POLL_MAX_S: Final = 2.0
FOLLOW_FAST_WINDOW_S: Final = 1.0
# With the tip channel up and silent (a ship alive but writing nothing, not even a
# heartbeat), the store is probed this often anyway: 2 GETs a minute while idle.
TIP_PROBE_S: Final = 30.0
ORPHAN_WINDOW: Final = 256

log = get_logger("drstream.deltalog")


class DeltaLog:
    """Read access to one log: locate the ends, fetch segments, follow the head."""

    def __init__(self, store: Store, log_id: str) -> None:
        self.store = store
        self.log_id = log_id

    def key(self, seq: int) -> str:
        return segment_key(self.log_id, seq)

    async def first_seq(self) -> int | None:
        """The oldest segment still stored (prune may have removed earlier ones): one LIST."""
        async for key in self.store.list(segments_prefix(self.log_id), limit=1):
            return seq_from_key(key)
        return None

    async def exists(self, seq: int) -> bool:
        return await self.store.exists(self.key(seq))

    async def head_seq(self) -> int | None:
        """The newest segment of the contiguous run (the durable head)."""
        head, _ = await self.locate_head()
        return head

    async def locate_head(self) -> tuple[int | None, list[int]]:
        """(durable head, orphans): O(log n) HEADs plus one LIST of a small window.

        A writer killed with several uploads in flight can leave a hole with a few later
        segments stored behind it ("orphans"). They were never durable (the head only
        advances over a contiguous run), but they fool a plain binary search, so the
        window just below the probed head is listed and cut at its first gap.
        """
        first = await self.first_seq()
        if first is None:
            return None, []
        lo, step = first, 1
        while await self.exists(lo + step):
            lo, step = lo + step, step * 2
        hi = lo + step  # lo exists, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if await self.exists(mid):
                lo = mid
            else:
                hi = mid
        return await self._cut_at_first_gap(first, lo)

    async def _cut_at_first_gap(self, first: int, probed: int) -> tuple[int, list[int]]:
        start = max(first, probed - ORPHAN_WINDOW)
        seqs = []
        async for key in self.store.list(
            segments_prefix(self.log_id), start_after=self.key(start - 1) if start > 1 else None,
            limit=2 * ORPHAN_WINDOW,
        ):
            seq = seq_from_key(key)
            if seq is not None:
                seqs.append(seq)
        if not seqs:  # pruned between the two calls
            return probed, []
        head = seqs[0]
        for seq in seqs[1:]:
            if seq != head + 1:
                break
            head = seq
        return head, [s for s in seqs if s > head]

    async def fetch(self, seq: int) -> bytes | None:
        return await self.store.get(self.key(seq))

    async def follow(
        self,
        after_seq: int,
        stop: asyncio.Event | None = None,
        *,
        prefetch: int = 1,
        poll_max_s: float = FOLLOW_POLL_MAX_S,
        tick: Callable[[], None] | None = None,
        tip: TipChannel | None = None,
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Yield (seq, bytes) for after_seq+1, +2, ... as they appear.

        While `tip` (ship's durable-tip channel) is up, fetch only up to the tip it
        announced, up to `prefetch` GETs at once, and otherwise wait for it: no GET for a
        segment that is not there yet, and none before its writer made it durable. When
        the tip is silent for TIP_PROBE_S the store is probed once anyway (the store is
        the truth). Without the channel, probe: up to `prefetch` GETs run ahead while
        behind; once caught up the window drops to one probe, backing off while idle.
        """
        seq, delay, window = after_seq + 1, FOLLOW_POLL_MIN_S, 1
        pending: dict[int, asyncio.Task[bytes | None]] = {}
        last_found = time.monotonic()
        try:
            while stop is None or not stop.is_set():
                if tick is not None:
                    tick()
                if tip is not None and tip.up:
                    if tip.seq < seq and not await tip.wait(seq - 1, TIP_PROBE_S, stop):
                        window = 1  # silent for TIP_PROBE_S: probe once
                    elif tip.up and tip.seq >= seq:
                        window = min(prefetch, tip.seq - seq + 1)
                    else:
                        continue  # the channel changed state, or stop
                for s in range(seq, seq + window):
                    if s not in pending:
                        pending[s] = asyncio.create_task(self.fetch(s))
                data = await pending.pop(seq)
                if data is None:
                    for task in pending.values():
                        task.cancel()
                    pending.clear()
                    window = 1
                    if tip is not None and tip.up and tip.seq < seq:
                        continue  # caught up with the tip: wait for it again
                    if tip is not None and not tip.up:  # probing: wake when it is back
                        await tip.wait(seq - 1, delay, stop)
                    else:  # no channel, or the store is behind the tip it announced
                        await _sleep_or_stop(delay, stop)
                    # Poll fast right after a segment (the next is usually a cut interval
                    # away); back off exponentially only once the log has gone quiet.
                    if time.monotonic() - last_found > FOLLOW_FAST_WINDOW_S:
                        delay = min(delay * 2, poll_max_s)
                    continue
                if tip is not None:
                    tip.vouch(seq, data)
                yield seq, data
                last_found = time.monotonic()
                seq, delay, window = seq + 1, FOLLOW_POLL_MIN_S, min(window * 2, prefetch)
        finally:
            for task in pending.values():
                task.cancel()


async def _sleep_or_stop(delay: float, stop: asyncio.Event | None) -> None:
    if stop is None:
        await asyncio.sleep(delay)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)


class LogWriter(Starting):
    """Appends segments to one log; the single writer of that log_id.

    `append` assigns the next seq, encodes (in a thread) and starts the upload; at most
    `max_in_flight` uploads run at once. `durable_seq` is the highest seq such that every
    seq up to it is stored. A failed upload is retried with the same bytes; a create that
    meets other bytes under the same key is split brain and stops the writer for good.
    """

    def __init__(
        self,
        store: Store,
        log_id: str,
        keyring: KeyRing,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
        retry_deadline_s: float | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.log = DeltaLog(store, log_id)
        self.keyring = keyring
        self.zstd_level = zstd_level
        self.retry_deadline_s = retry_deadline_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self._append_lock = asyncio.Lock()
        self._durable_changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: set[int] = set()
        self._unsettled: dict[int, bytes] = {}  # started, not yet under the durable head
        self._next_seq = 0
        self._prev_digest = ZERO_DIGEST
        self.durable_seq = 0
        self.failure: BaseException | None = None
        self.opened = False
        self._head_manifest: Manifest | None = None
        # the head segment's GCM nonce: random, so it names this log's head apart from a
        # same-named log's (the tip channel sends it, daemon/tip.py)
        self.durable_nonce = b""
        # called (on the event loop) each time durable_seq advances or the writer fails
        self.on_durable: Callable[[], None] | None = None

    @property
    def log_id(self) -> str:
        return self.log.log_id

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def unsettled(self) -> int:
        """Segments appended but not yet under the durable head (uploads in flight)."""
        return max(0, self._next_seq - 1 - self.durable_seq)

    async def start(self) -> Manifest | None:
        """open(); `async with writer:` opens it and closes it on the way out."""
        return await self.open()

    async def open(self) -> Manifest | None:
        """Find the head and return its manifest: the positions to resume from
        (idempotent: a second call returns the same manifest).

        Orphans left behind a hole by a crash are deleted: their records come after the
        head's positions and will be read from the source again.
        """
        if self.opened:
            return self._head_manifest
        head, orphans = await self.log.locate_head()
        for seq in orphans:
            log.warning("orphan_segment_deleted", log_id=self.log_id, seq=seq, durable_head=head)
            await self.log.store.delete(self.log.key(seq))
        head = await self._drop_stray_tail(head)
        if head is None:
            self._next_seq, self._prev_digest, self.durable_seq = 1, ZERO_DIGEST, 0
            self.opened = True
            return None
        data = await self.log.fetch(head)
        if data is None:
            raise SegmentFormatError("head segment vanished while opening", log_id=self.log_id,
                                     seq=head, key=self.log.key(head))
        _, manifest = await asyncio.to_thread(
            read_manifest, data, self.keyring, expect_log_id=self.log_id, expect_seq=head
        )
        self._next_seq, self._prev_digest, self.durable_seq = head + 1, segment_digest(data), head
        self.durable_nonce = parse_header(data)[0].nonce
        self._head_manifest, self.opened = manifest, True
        log.info("log_opened", log_id=self.log_id, head_seq=head)
        return manifest

    async def append(self, body: Body) -> int:
        """Encode `body` as the next segment and start uploading it; returns its seq."""
        if not self.opened:
            raise DrstreamError("LogWriter.open() must run before append()")
        self._raise_if_failed()
        await self._slots.acquire()
        try:
            async with self._append_lock:
                self._raise_if_failed()
                seq = self._next_seq
                data = await asyncio.to_thread(
                    encode_segment, body, log_id=self.log_id, seq=seq,
                    prev_digest=self._prev_digest, keyring=self.keyring,
                    zstd_level=self.zstd_level,
                )
                self._next_seq, self._prev_digest = seq + 1, segment_digest(data)
        except BaseException:
            self._slots.release()
            raise
        self._unsettled[seq] = data
        task = asyncio.create_task(self._upload(seq, data), name=f"upload-{seq}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return seq

    async def wait_durable(self, seq: int) -> None:
        """Return once every segment up to `seq` is stored; raise if the writer failed."""
        async with self._durable_changed:
            await self._durable_changed.wait_for(
                lambda: self.durable_seq >= seq or self.failure is not None
            )
        if self.durable_seq < seq:
            self._raise_if_failed()

    @property
    def tip_ready(self) -> bool:
        """The log is open: durable_seq is its head, not a start value (daemon/tip.py)."""
        return self.opened

    async def durable_after(self, seq: int, timeout_s: float) -> tuple[int, bytes]:
        """(durable_seq, its segment's nonce) once it passes `seq`, or after `timeout_s`
        (or a failure) as it is: the tip that ship's HTTP server streams (daemon/tip.py)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s), self._durable_changed:
                await self._durable_changed.wait_for(
                    lambda: self.durable_seq > seq or self.failure is not None)
        return self.durable_seq, self.durable_nonce

    async def flush(self) -> None:
        """Wait for every started upload; raise the writer's failure if there was one."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._raise_if_failed()

    async def close(self) -> None:
        """Cancel uploads still running (flush() first to wait for them); idempotent."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def _upload(self, seq: int, data: bytes) -> None:
        started = time.monotonic()
        try:
            await self._put_with_retries(seq, data)
            UPLOAD_SECONDS.observe(time.monotonic() - started)
            BYTES.labels("encrypted").inc(len(data))
        except asyncio.CancelledError:
            self._slots.release()
            raise
        except Exception as e:  # the writer stops for good: later appends re-raise it
            self._slots.release()
            if self.failure is None:
                self.failure = e
                ERRORS.labels(type(e).__name__).inc()
                log.error("segment_upload_failed", log_id=self.log_id, seq=seq, error=str(e))
                if isinstance(e, FencedError):
                    await self._retract_after(seq)
            async with self._durable_changed:
                self._durable_changed.notify_all()
            self._notify()
            return
        self._slots.release()
        async with self._durable_changed:
            self._done.add(seq)
            while self.durable_seq + 1 in self._done:
                self._done.discard(self.durable_seq + 1)
                self.durable_seq += 1
                settled = self._unsettled.pop(self.durable_seq, None)
                if settled is not None:
                    self.durable_nonce = parse_header(settled)[0].nonce
            self._durable_changed.notify_all()
        self._notify()

    def _notify(self) -> None:
        if self.on_durable is not None:
            self.on_durable()

    async def _drop_stray_tail(self, head: int | None) -> int | None:
        """Remove tail segments that do not link onto their predecessor: uploads of a
        writer that was fenced while they were in flight (see _is_stray)."""
        first = await self.log.first_seq()
        for _ in range(ORPHAN_WINDOW):
            if head is None or first is None or head <= first:
                return head
            data, prev = await self.log.fetch(head), await self.log.fetch(head - 1)
            if data is None or prev is None:
                return head
            if chain_break(head, parse_header(data)[0], segment_digest(prev)) is None:
                return head
            log.warning("stray_segment_deleted", log_id=self.log_id, seq=head)
            await self.log.store.delete(self.log.key(head))
            head -= 1
        return head

    async def _is_stray(self, key: str, ours: bytes, existing: bytes) -> bool:
        """True when `existing` cannot be part of the log: it does not link onto our own
        predecessor, which is durable. Such a segment was uploaded in parallel by a writer
        that was fenced just before it (it links to that writer's losing segment)."""
        try:
            theirs, _ = parse_header(existing)
            mine, _ = parse_header(ours)
        except DrstreamError:
            return False
        if theirs.prev_digest == mine.prev_digest or mine.seq <= 1:
            return False  # a genuine competitor for this seq: split brain
        async with self._durable_changed:  # our predecessor must be stored as ours first
            await self._durable_changed.wait_for(
                lambda: self.durable_seq >= mine.seq - 1 or self.failure is not None)
        return self.durable_seq >= mine.seq - 1

    async def _retract_after(self, fenced_seq: int) -> None:
        """Fenced at `fenced_seq`: our later segments (uploaded in parallel) link to a
        segment that lost, so they would break the chain for the winner. Stop them and
        delete those that landed, only where the stored bytes are still ours."""
        current = asyncio.current_task()
        later = [t for t in self._tasks if t is not current]
        for task in later:
            task.cancel()
        await asyncio.gather(*later, return_exceptions=True)
        for seq in sorted(s for s in self._unsettled if s > fenced_seq):
            key = self.log.key(seq)
            try:
                if await self.log.store.get(key) == self._unsettled[seq]:
                    await self.log.store.delete(key)
                    log.warning("fenced_segment_retracted", log_id=self.log_id, seq=seq)
            except StoreError as e:
                log.error("fenced_segment_retract_failed", log_id=self.log_id, seq=seq,
                          error=str(e))

    async def _put_with_retries(self, seq: int, data: bytes) -> None:
        """A failed upload is retried with the same bytes, until the retry deadline."""
        key = self.log.key(seq)
        backoff = dataclasses.replace(UPLOAD_BACKOFF, deadline_s=self.retry_deadline_s)

        def on_retry(e: Exception, attempt: int, delay: float) -> None:
            ERRORS.labels(type(e).__name__).inc()  # the final failure counts in _upload
            log.warning("segment_upload_retry", log_id=self.log_id, seq=seq,
                        error=str(e), retry_in_s=round(delay, 2))

        await retrying(lambda: self._put_once(key, data), backoff, on_retry=on_retry,
                       retriable=lambda e: isinstance(e, StoreError) and e.retriable)

    async def _put_once(self, key: str, data: bytes) -> None:
        if await self.log.store.put_if_absent(key, data):
            return
        # Exists already: our own earlier attempt (a retry after a lost reply) is fine;
        # other bytes mean a second writer with the same log_id.
        existing = await self.log.store.get(key)
        if existing == data:
            return
        if existing is not None and await self._is_stray(key, data, existing):
            log.warning("stray_segment_replaced", log_id=self.log_id, key=key)
            await self.log.store.delete(key)
            if await self.log.store.put_if_absent(key, data):
                return
        raise FencedError(
            f"object {key} already exists with other bytes: another writer is using "
            f"log_id {self.log_id!r} (split brain); this writer stops",
            key=key,
        )

