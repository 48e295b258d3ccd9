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
from dataclasses import dataclass
from typing import Final

from drstream.daemon.codec import Body, Manifest
from drstream.daemon.errors import (
    DrstreamError,
    FencedError,
    LogGapError,
    LogStateError,
    SegmentError,
    SegmentFormatError,
    StoreError,
    describe_seqs,
)
from drstream.daemon.keyring import KeyRing
from drstream.daemon.layout import probe_key, segment_key, segments_prefix, seq_from_key
from drstream.daemon.lifecycle import Starting
from drstream.daemon.logging import get_logger
from drstream.daemon.metrics import BYTES, ERRORS, UPLOAD_SECONDS
from drstream.daemon.retry import Backoff, retrying
from drstream.daemon.segment import (
    MAX_SEGMENT_SIZE,
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
# A follower that misses seq N for this long looks whether later segments are stored (one
# LIST, at most once every GAP_CHECK_INTERVAL_S whatever arrives meanwhile): an upload in
# flight fills such a hole within a second, a deleted segment never does. A busy log (a
# segment every flush interval, 0.25 s) costs no LIST; an idle one (a heartbeat every
# 10 s) one LIST per 30 s, not one per heartbeat.
GAP_CHECK_AFTER_S: Final = 3.0
GAP_CHECK_INTERVAL_S: Final = 30.0
# manifest.extra[LOG_EXTRA] = {"durable_seq": d}: when the writer encoded the segment,
# every seq up to d was stored. A missing seq <= d is therefore a gap, never an upload
# still in flight (the writer only runs max_in_flight seqs past its durable head).
LOG_EXTRA: Final = "log"

log = get_logger("drstream.deltalog")


@dataclass(frozen=True)
class Tail:
    """Where a log ends: the contiguous run from `first` to `head`, and the seqs stored
    after the first hole behind it (`later`: uploads in flight, a crash's leftovers, or
    the rest of a log with a gap: DeltaLog.end tells which)."""

    first: int | None
    head: int | None
    later: tuple[int, ...] = ()

    @property
    def missing(self) -> list[int]:
        """The seqs absent between the head and the newest later segment."""
        present = set(self.later)
        start = (self.head or 0) + 1
        return [s for s in range(start, max(self.later, default=0)) if s not in present]


def durable_at_write(manifest: Manifest) -> int | None:
    """The writer's durable head when it wrote the segment (None: not recorded)."""
    info = manifest.extra.get(LOG_EXTRA)
    d = info.get("durable_seq") if isinstance(info, dict) else None
    return d if type(d) is int else None


class DeltaLog:
    """Read access to one log: locate the ends, fetch segments, follow the head.

    With a key ring it tells a gap from the end of the log (`end`, `follow`): a later
    segment names the writer's durable head when it was written, so a missing seq at or
    below that head was deleted, not in flight.
    """

    def __init__(self, store: Store, log_id: str, keyring: KeyRing | None = None) -> None:
        self.store = store
        self.log_id = log_id
        self.keyring = keyring

    def key(self, seq: int) -> str:
        return segment_key(self.log_id, seq)

    async def first_seq(self) -> int | None:
        """The oldest segment still stored (prune may have removed earlier ones): one LIST."""
        async for key in self.store.list(segments_prefix(self.log_id), limit=1):
            return seq_from_key(key)
        return None

    async def log_start(self) -> int | None:
        """Where the log begins: seq 1, or after a prune its oldest stored segment; None
        while nothing is stored. An oldest segment past seq 1 that was written before any
        seq was durable does not start a pruned log (prune never leaves one first): seq 1
        is still in flight, or a writer's crash lost it and left this one behind the hole,
        so the log begins at 1."""
        oldest = await self.first_seq()
        return 1 if await self._behind_seq_one(oldest) else oldest

    async def _behind_seq_one(self, oldest: int | None) -> bool:
        """The oldest stored seq is past 1 and was written before any seq was durable."""
        return oldest is not None and oldest > 1 and \
            await self.written_before_any_durable(oldest)

    async def written_before_any_durable(self, seq: int) -> bool:
        """Segment `seq` names no durable seq: its writer wrote it while seq 1 was still in
        flight. False when that cannot be read (no key ring, or the segment is gone)."""
        if self.keyring is None:
            return False
        data = await self.fetch(seq)
        if data is None:
            return False
        _, manifest = await asyncio.to_thread(read_manifest, data, self.keyring,
                                              expect_log_id=self.log_id, expect_seq=seq)
        return durable_at_write(manifest) == 0

    async def exists(self, seq: int) -> bool:
        return await self.store.exists(self.key(seq))

    async def head_seq(self) -> int | None:
        """The newest segment of the contiguous run (the durable head)."""
        return (await self.end()).head

    async def end(self) -> Tail:
        """locate(), then: segments stored after a hole that a later segment proves was
        durable once are a gap (LogGapError naming the missing seqs); otherwise they are
        uploads in flight (or a crash's leftovers) and the head ends the log."""
        tail = await self.locate()
        if tail.later and self.keyring is not None:
            await self._check_later(tail)
        return tail

    async def _check_later(self, tail: Tail) -> None:
        newest = max(tail.later)
        data = await self.fetch(newest)
        if data is None:
            return  # removed meanwhile (a writer's clean-up): nothing stored after the head
        assert self.keyring is not None
        _, manifest = await asyncio.to_thread(read_manifest, data, self.keyring,
                                              expect_log_id=self.log_id, expect_seq=newest)
        d = durable_at_write(manifest)
        missing = tail.missing
        if d is not None and missing and d >= missing[0]:
            raise LogGapError(self.log_id, [m for m in missing if m <= d],
                              f"seq {newest} is stored and was written when every seq up to "
                              f"{d} was")

    async def locate(self) -> Tail:
        """The contiguous run and what is stored behind its first hole: O(log n) HEADs
        plus one LIST of a small window.

        A writer killed with several uploads in flight can leave a hole with a few later
        segments stored behind it. They were never durable (the head only advances over
        a contiguous run), but they fool a plain binary search, so the window just below
        the probed head is listed and cut at its first gap.
        """
        first = await self.first_seq()
        if first is None:
            return Tail(None, None)
        if await self._behind_seq_one(first):  # the log still begins at 1 (log_start)
            return Tail(None, None, await self._later_than(0))
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

    async def _cut_at_first_gap(self, first: int, probed: int) -> Tail:
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
            return Tail(first, probed)
        head = seqs[0]
        for seq in seqs[1:]:
            if seq != head + 1:
                break
            head = seq
        return Tail(first, head, tuple(s for s in seqs if s > head))

    async def fetch(self, seq: int) -> bytes | None:
        """Segment `seq`'s bytes (None: not stored); larger than any segment can be is
        refused before it is downloaded."""
        return await self.store.get(self.key(seq), max_bytes=MAX_SEGMENT_SIZE)

    async def _later_than(self, seq: int) -> tuple[int, ...]:
        """Seqs stored after `seq` (one LIST of a window)."""
        found = []
        async for key in self.store.list(segments_prefix(self.log_id),
                                         start_after=self.key(seq), limit=ORPHAN_WINDOW):
            s = seq_from_key(key)
            if s is not None:
                found.append(s)
        return tuple(found)

    async def check_missing(self, seq: int, known_end: int | None) -> None:
        """`seq` is not stored: raise LogGapError when that is a gap, not the end. It is
        when this read knew a later head (`known_end`, from when it began), or when a
        later stored segment was written after `seq` was durable."""
        if known_end is not None and seq <= known_end:
            raise LogGapError(self.log_id, [seq], f"the log reached seq {known_end} when this "
                              "read began, and the segment is gone")
        later = await self._later_than(seq)
        if later and self.keyring is not None:
            await self._check_later(Tail(None, seq - 1, later))

    async def follow(
        self,
        after_seq: int,
        stop: asyncio.Event | None = None,
        *,
        prefetch: int = 1,
        poll_max_s: float = FOLLOW_POLL_MAX_S,
        tick: Callable[[], None] | None = None,
        tip: TipChannel | None = None,
        known_end: int | None = None,
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Yield (seq, bytes) for after_seq+1, +2, ... as they appear.

        While `tip` (ship's durable-tip channel) is up, fetch only up to the tip it
        announced, up to `prefetch` GETs at once, and otherwise wait for it: no GET for a
        segment that is not there yet, and none before its writer made it durable. When
        the tip is silent for TIP_PROBE_S the store is probed once anyway (the store is
        the truth). Without the channel, probe: up to `prefetch` GETs run ahead while
        behind; once caught up the window drops to one probe, backing off while idle.
        A seq that stays missing (and that the tip does not explain as not yet written)
        is checked for being a gap (check_missing): LogGapError, never a skip.
        """
        seq, delay, window = after_seq + 1, FOLLOW_POLL_MIN_S, 1
        pending: dict[int, asyncio.Task[bytes | None]] = {}
        last_found = time.monotonic()
        gap_check = [0.0]  # when the next LIST for a gap may run (monotonic)
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
                    await self._gap_check(seq, known_end, last_found, gap_check)
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

    async def _gap_check(self, seq: int, known_end: int | None, last_found: float,
                         next_at: list[float]) -> None:
        """A seq below a known end is a gap at once; otherwise one missing for
        GAP_CHECK_AFTER_S is looked at, at most every GAP_CHECK_INTERVAL_S."""
        now = time.monotonic()
        if known_end is not None and seq <= known_end:
            await self.check_missing(seq, known_end)
        elif now - last_found > GAP_CHECK_AFTER_S and now >= next_at[0]:
            next_at[0] = now + GAP_CHECK_INTERVAL_S
            await self.check_missing(seq, None)


async def _sleep_or_stop(delay: float, stop: asyncio.Event | None) -> None:
    if stop is None:
        await asyncio.sleep(delay)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)


class LogWriter(Starting):
    """Appends segments to one log; the single writer of that log_id.

    `append` assigns the next seq, encodes (in a thread) and starts the upload; it runs at
    most `max_in_flight` seqs past `durable_seq` (the highest seq such that every seq up to
    it is stored), so a crash leaves at most `max_in_flight - 1` segments behind a hole.
    A failed upload is retried with the same bytes; a create that meets other bytes under
    the same key is split brain and stops the writer for good.

    The writer never destroys the log: on open it removes only what its own crash can
    leave (see open); anything else stops it with LogStateError, changing nothing.
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
        self.log = DeltaLog(store, log_id, keyring)
        self.keyring = keyring
        self.zstd_level = zstd_level
        self.retry_deadline_s = retry_deadline_s
        self.max_in_flight = max_in_flight
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

        What a crash of this writer can leave is cleaned up: at most max_in_flight - 1
        segments behind a hole, within max_in_flight of the head, each authenticated and
        written before the hole was durable (their records come after the head's
        positions and are read from the source again). Anything else (a longer or older
        hole, a segment that fails authentication, a head that does not link onto its
        predecessor, a segment hidden behind a delete marker right after the head) raises
        LogStateError naming the objects and changes nothing: `drstream log truncate` or
        a restore resolves it.
        """
        if self.opened:
            return self._head_manifest
        await self.log.store.check_create_if_absent(probe_key(self.log_id))
        tail = await self.log.locate()
        head = tail.head
        await self._refuse_hidden_after(head or 0)
        if tail.later:
            await self._clean_crash_window(tail)
        if head is None:
            self._next_seq, self._prev_digest, self.durable_seq = 1, ZERO_DIGEST, 0
            self.opened = True
            return None
        data = await self.log.fetch(head)
        if data is None:
            raise SegmentFormatError("head segment vanished while opening", log_id=self.log_id,
                                     seq=head)
        _, manifest = await asyncio.to_thread(
            read_manifest, data, self.keyring, expect_log_id=self.log_id, expect_seq=head
        )
        if tail.first is not None and head > tail.first:
            await self._check_link(head, data)
        self._next_seq, self._prev_digest, self.durable_seq = head + 1, segment_digest(data), head
        self.durable_nonce = parse_header(data)[0].nonce
        self._head_manifest, self.opened = manifest, True
        log.info("log_opened", log_id=self.log_id, head_seq=head)
        return manifest

    def _stuck(self, what: str, head: int) -> LogStateError:
        return LogStateError(
            f"log {self.log_id}: {what}; the writer changed nothing and stops. Restore what "
            f"is missing or damaged, or remove what follows the last good segment with "
            f"`drstream log truncate --config CONFIG --after {head}` (audited); "
            "`drstream verify --deep` shows the whole log")

    async def _refuse_hidden_after(self, head: int) -> None:
        """A segment right after the head that a versioned store only hides (a delete
        marker) was durable once: writing over it would fork the log. Hidden segments
        further on, within the crash window, are this writer's own clean-up."""
        async for key in self.log.store.hidden(segments_prefix(self.log_id),
                                               start_after=self.log.key(head)):
            seq = seq_from_key(key)
            if seq is None or (seq <= head + self.max_in_flight and seq != head + 1):
                continue
            raise self._stuck(f"segment {seq} ({key}) after the head {head} is hidden behind "
                              "a delete marker (deleted in a versioned bucket, bytes kept)",
                              head)

    async def _clean_crash_window(self, tail: Tail) -> None:
        head, later, missing = tail.head or 0, list(tail.later), tail.missing
        keys = ", ".join(self.log.key(s) for s in later[:8])
        if len(later) >= self.max_in_flight or later[-1] > head + self.max_in_flight:
            raise self._stuck(
                f"{describe_seqs(missing)} missing while {describe_seqs(later)} are stored "
                f"after them ({keys}): more than a crash of this writer (max_in_flight "
                f"{self.max_in_flight}) can leave", head)
        prev: tuple[int, bytes] | None = None
        for seq in later:
            data = await self.log.fetch(seq)
            if data is None:
                continue
            try:
                header, manifest = await asyncio.to_thread(
                    read_manifest, data, self.keyring, expect_log_id=self.log_id,
                    expect_seq=seq)
            except SegmentError as e:
                raise self._stuck(f"{e} (stored after the hole at {describe_seqs(missing)})",
                                  head) from e
            why = chain_break(seq, header, segment_digest(prev[1])) \
                if prev is not None and prev[0] == seq - 1 else None
            d = durable_at_write(manifest)
            if why is not None or (d is not None and d >= missing[0]):
                raise self._stuck(
                    f"segment {seq} ({self.log.key(seq)}) stored after the hole at "
                    f"{describe_seqs(missing)} " + (f"does not link: {why}" if why else
                    f"was written when seq {d} was durable: the hole is a gap"), head)
            prev = (seq, data)
        for seq in reversed(later):
            log.warning("orphan_segment_deleted", log_id=self.log_id, seq=seq,
                        key=self.log.key(seq), durable_head=head,
                        reason="stored behind a hole by an earlier run's crash, never durable")
            await self.log.store.delete(self.log.key(seq))

    async def _check_link(self, head: int, data: bytes) -> None:
        """The head must link onto its predecessor: a head that does not is another
        writer's (a foreign chain) or sits on a damaged segment."""
        prev = await self.log.fetch(head - 1)
        if prev is None:
            raise self._stuck(f"segment {head - 1} vanished below the head {head}", head - 2)
        header, _ = parse_header(data, expect_log_id=self.log_id, expect_seq=head)
        why = chain_break(head, header, segment_digest(prev))
        if why is None:
            return
        try:
            await asyncio.to_thread(read_manifest, prev, self.keyring,
                                    expect_log_id=self.log_id, expect_seq=head - 1)
        except SegmentError as e:
            raise self._stuck(f"{e}; the head {head} ({self.log.key(head)}) was chained onto "
                              "other bytes", head - 2) from e
        raise self._stuck(f"the head {head} ({self.log.key(head)}) does not link onto segment "
                          f"{head - 1} ({self.log.key(head - 1)}): {why} (a foreign chain: "
                          "another writer's segment)", head - 1)

    async def append(self, body: Body) -> int:
        """Encode `body` as the next segment and start uploading it; returns its seq.
        Waits while max_in_flight seqs past the durable head are started."""
        if not self.opened:
            raise DrstreamError("LogWriter.open() must run before append()")
        self._raise_if_failed()
        async with self._append_lock:
            async with self._durable_changed:
                await self._durable_changed.wait_for(
                    lambda: self._next_seq <= self.durable_seq + self.max_in_flight
                    or self.failure is not None)
            self._raise_if_failed()
            seq = self._next_seq
            body = _with_durable_seq(body, self.durable_seq)
            data = await asyncio.to_thread(
                encode_segment, body, log_id=self.log_id, seq=seq,
                prev_digest=self._prev_digest, keyring=self.keyring,
                zstd_level=self.zstd_level,
            )
            self._next_seq, self._prev_digest = seq + 1, segment_digest(data)
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
            raise
        except Exception as e:  # the writer stops for good: later appends re-raise it
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

    async def _retract_after(self, fenced_seq: int) -> None:
        """Fenced at `fenced_seq`: our later segments (uploaded in parallel) link to a
        segment that lost, so they would break the chain for the winner. Stop them and
        delete those that landed, only where the stored bytes are still ours (never
        durable: their predecessor is not in the log)."""
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
        # other bytes are another writer's (with the same log_id): never replaced.
        if await self.log.store.get(key, max_bytes=MAX_SEGMENT_SIZE) == data:
            return
        raise FencedError(
            f"object {key} already exists with other bytes: another writer is using "
            f"log_id {self.log_id!r} (split brain); this writer stops",
            key=key,
        )


def _with_durable_seq(body: Body, durable_seq: int) -> Body:
    """The body with the writer's durable head recorded in its manifest (LOG_EXTRA)."""
    extra = {**body.manifest.extra, LOG_EXTRA: {"durable_seq": durable_seq}}
    return Body(dataclasses.replace(body.manifest, extra=extra), body.batches)
