"""`apply`: follow the log, check every link and MAC, hand each segment to every sink.

Sinks own their checkpoints (written atomically with their data), so resuming is just:
start each sink, begin after the lowest applied seq, and skip a segment for any sink that
already has it. The chain is checked against the digest each checkpoint recorded, so a
log that was rewritten under a running standby stops apply instead of being trusted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from drstream.daemon.blobs import BlobStore
from drstream.daemon.codec import Body
from drstream.daemon.config import Config
from drstream.daemon.deltalog import DeltaLog
from drstream.daemon.errors import ChainError, ConfigError, ConfigFieldError, DrstreamError
from drstream.daemon.gcpace import paced_gc
from drstream.daemon.keyring import KeyRing
from drstream.daemon.lifecycle import Starting
from drstream.daemon.logging import get_logger
from drstream.daemon.metrics import APPLIED_SEGMENT_TIME as APPLIED_TIME
from drstream.daemon.metrics import APPLIED_SEQ, APPLY_LAG, BYTES, RECORDS, SEGMENTS, Health
from drstream.daemon.records import AppliedSegment, Header, SealedSegment
from drstream.daemon.segment import (
    ZERO_DIGEST,
    SegmentHeader,
    chain_break,
    decode_segment,
    decode_segment_produce,
    parse_header,
    segment_digest,
)
from drstream.daemon.sink import Sink
from drstream.daemon.store import Store
from drstream.daemon.tip import TipChannel

log = get_logger("drstream.apply")

# what the feeder queues: decoded here, or sealed, to be opened in produce form (see run)
Item = AppliedSegment | SealedSegment
# a sink's produce() form: headers every record ends with, and the source-offset header
ProduceForm = tuple[tuple[Header, ...], str | None]
Opened = tuple[list[AppliedSegment], DrstreamError | None]

@dataclass
class ApplyProgress:
    applied_seq: int = 0
    applied_at: float = 0.0  # monotonic time of the last apply
    segment_created_ms: int = 0  # write time of the last applied segment
    records: int = 0
    lag_s: float = 0.0  # segment write -> apply, for the last segment applied


class Applier(Starting):
    def __init__(self, config: Config, store: Store, keyring: KeyRing, *,
                 tip_channel: bool = False) -> None:
        """`tip_channel`: hear ship's durable tip (apply.tip_from) instead of probing only,
        as the apply service does (daemon/tip.py)."""
        self.config = config
        self.keyring = keyring
        self.log = DeltaLog(store, config.log_id, keyring)
        self.blobs = BlobStore(store, config.log_id, keyring)
        ctx = config.context(self.blobs)
        self.sinks: list[Sink] = [config.connectors.sink(s, ctx) for s in config.sinks]
        self.progress = ApplyProgress()
        # replay and drill filter or observe each decoded segment before the sinks see it
        self.transform: Callable[[int, Body, int], Body] | None = None  # seq, body, created_at_ms
        self.ready = asyncio.Event()
        self.health = Health()
        self._prev_digest = ZERO_DIGEST
        self._next_group_sync = 0.0
        self._after = 0
        self._form: ProduceForm | None = None
        self._opened_digest = ZERO_DIGEST  # the chain as far as opened (ahead of applied)
        address = config.tip_address() if tip_channel else None
        self.tip = TipChannel(address, config.log_id) if address else None

    async def start(self) -> int:
        """Start every sink; returns the seq to resume after (the lowest checkpoint).
        Idempotent: a second call returns the same seq."""
        if self.ready.is_set():
            return self._after
        checkpoints = [await sink.start() for sink in self.sinks]
        lowest = min(checkpoints, key=lambda cp: cp.seq)
        if lowest.seq > 0:
            data = await self.log.fetch(lowest.seq)
            if data is None:
                raise ChainError("applied segment is gone from the store (pruned too far?)",
                                 log_id=self.log.log_id, seq=lowest.seq)
            if segment_digest(data) != lowest.digest:
                raise ChainError("stored segment differs from the one applied: log rewritten",
                                 log_id=self.log.log_id, seq=lowest.seq)
            self._prev_digest = self._opened_digest = lowest.digest
            after = lowest.seq
        else:
            after = await self._start_of_pruned_log()
        self.progress.applied_seq = self._after = after
        self.progress.segment_created_ms = lowest.created_at_ms
        self.ready.set()
        log.info("apply_started", log_id=self.log.log_id, after_seq=after,
                 sinks=[s.name for s in self.sinks])
        return after

    async def _start_of_pruned_log(self) -> int:
        """A sink that applied nothing starts at the oldest stored segment; after a prune
        that is not seq 1, and its predecessor's digest is taken from its own header."""
        first = await self.log.log_start()
        if first is None or first == 1:
            return 0
        data = await self.log.fetch(first)
        if data is None:
            raise ChainError("oldest segment vanished while starting", log_id=self.log.log_id,
                             seq=first)
        self._prev_digest = self._opened_digest = parse_header(
            data, expect_log_id=self.log.log_id, expect_seq=first)[0].prev_digest
        log.warning("apply_from_pruned_log", log_id=self.log.log_id, first_seq=first)
        return first - 1

    async def run(self, stop: asyncio.Event, *, until_seq: int | None = None,
                  known_end: int | None = None) -> int:
        """Apply until `stop` (or through `until_seq`); returns the last applied seq.
        `known_end`: a head the log was seen to reach (a missing seq up to it is a gap).

        Segments already fetched when one is taken are applied together (up to
        apply.batch_max_segments / batch_max_bytes): a sink that supports it commits them
        in one transaction, so a backlog is not paced by one commit per segment, while a
        caught-up standby still applies each segment as soon as it appears."""
        after = await self.start()
        if until_seq is not None and after >= until_seq:
            return after
        # Unbounded queue, bounded by `slots`: the follower's end marker always fits.
        queue: asyncio.Queue[Item | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.config.apply.prefetch)
        self._form = self._produce_form()
        feeder = asyncio.create_task(self._feed(after, stop, until_seq, known_end, queue,
                                                slots))
        tasks = [feeder] + ([asyncio.create_task(self.tip.run(stop))] if self.tip else [])
        async with paced_gc():
            try:
                if self._form is not None:
                    await self._run_sealed(queue, slots)
                else:
                    while (item := await queue.get()) is not None:
                        slots.release()
                        await self._apply_decoded([item, *self._take_ready(queue, slots)])
                        await self._maybe_sync_groups()
                await feeder  # raises what stopped the follower (a bad segment, the store)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return self.progress.applied_seq

    async def _run_sealed(self, queue: asyncio.Queue[Item | None],
                          slots: asyncio.Semaphore) -> None:
        """Two stages: the next group is opened (MAC, decrypt, decode to produce()
        arguments) on a worker thread while the sink writes the one before, so neither
        waits for the other; a restore measured opening at ~15% of a group's time."""
        writing: asyncio.Task[None] | None = None
        try:
            while (item := await queue.get()) is not None:
                slots.release()
                group = [item, *self._take_ready(queue, slots)]
                opened = await self._open_group(group)
                if writing is not None:
                    await writing
                    writing = None
                    await self._maybe_sync_groups()
                    # what arrived during that write joins this group's transaction
                    if opened[1] is None and (more := self._take_ready(
                            queue, slots, len(group), sum(i.nbytes for i in group))):
                        opened = _joined(opened, await self._open_group(more))
                writing = asyncio.create_task(self._write_opened(*opened))
                if opened[1] is not None:
                    await writing  # raises it, once the segments before it are written
            if writing is not None:
                await writing
                writing = None
        finally:
            if writing is not None:  # a write already on the sink's thread runs to its end
                await asyncio.gather(writing, return_exceptions=True)

    def _produce_form(self) -> ProduceForm | None:
        """A lone sink that takes records as produce() arguments (its `produce_form`),
        where replay's filter, if any, takes that form too: segments are then decoded
        straight into that form, with no record objects; else None (decoded, then
        handed to every sink)."""
        form = getattr(self.sinks[0], "produce_form", None)
        if len(self.sinks) != 1 or form is None:
            return None
        if self.transform is not None and not getattr(self.transform, "produce_form", False):
            return None
        return cast(ProduceForm, form)

    async def _feed(self, after: int, stop: asyncio.Event, until_seq: int | None,
                    known_end: int | None, queue: asyncio.Queue[Item | None],
                    slots: asyncio.Semaphore) -> None:
        """Fetch ahead of the sinks (and, unless the sink opens segments itself, check
        and decode, overlapping with writing the current ones); the first bad segment
        ends the feed after every segment before it has been queued."""
        cfg = self.config.apply
        prev = self._prev_digest
        try:
            async for seq, data in self.log.follow(after, stop, prefetch=cfg.prefetch,
                                                   poll_max_s=cfg.poll_max_s,
                                                   tick=self.health.tick, tip=self.tip,
                                                   known_end=known_end):
                seg: Item
                if self._form is not None:
                    seg = SealedSegment(seq, data)
                else:
                    seg = await self._decode(seq, data, prev)
                    prev = seg.digest
                await slots.acquire()
                queue.put_nowait(seg)
                if until_seq is not None and seq >= until_seq:
                    break
        finally:
            queue.put_nowait(None)

    def _take_ready(self, queue: asyncio.Queue[Item | None], slots: asyncio.Semaphore,
                    have: int = 1, size: int = 0) -> list[Item]:
        """Segments already fetched (and decoded), to apply with the `have` segments of
        `size` bytes taken before them, up to the batch limits."""
        cfg = self.config.apply
        out: list[Item] = []
        while (len(out) + have < cfg.batch_max_segments and size < cfg.batch_max_bytes
               and not queue.empty()):
            item = queue.get_nowait()
            if item is None:  # the follower ended: the loop sees the marker next
                queue.put_nowait(None)
                break
            slots.release()
            out.append(item)
            size += item.nbytes
        return out

    async def _open_group(self, items: list[Item]) -> Opened:
        sealed = [s for s in items if isinstance(s, SealedSegment)]
        assert self._form is not None
        opened = await asyncio.to_thread(self._open_with, sealed, *self._form)
        if opened[0]:
            self._opened_digest = opened[0][-1].digest
        return opened

    async def _write_opened(self, opened: list[AppliedSegment],
                            error: DrstreamError | None) -> None:
        """Write the group (what the sink has already is only checked, by the chain),
        then raise the error that ended its opening, if any: the segments before a bad
        one are applied, as on the decoding path."""
        await self._apply_decoded(opened)
        if error is not None:
            raise error

    async def _apply_decoded(self, items: Sequence[Item]) -> None:
        decoded = [s for s in items if isinstance(s, AppliedSegment)]
        for sink in self.sinks:
            todo = [s for s in decoded if s.seq > sink.checkpoint().seq]
            if not todo:
                continue
            batch_apply = getattr(sink, "apply_batch", None)
            if batch_apply is not None and len(todo) > 1:
                await batch_apply(todo)
            else:
                for s in todo:
                    await sink.apply(s.seq, s.digest, s.created_at_ms, s.body)
        for seg in decoded:
            self._applied(seg)

    async def _decode(self, seq: int, data: bytes, prev: bytes) -> AppliedSegment:
        header, _ = parse_header(data, expect_log_id=self.log.log_id, expect_seq=seq)
        if chain_break(seq, header, prev) is not None:
            raise ChainError("prev_digest does not match the segment applied before it",
                             log_id=self.log.log_id, seq=seq)
        header, body, digest = await asyncio.to_thread(self._decode_sync, seq, data)
        if self.transform is not None:
            body = self.transform(seq, body, header.created_at_ms)
        return AppliedSegment(seq, digest, header.created_at_ms, body, len(data))

    def _open_with(self, segments: list[SealedSegment], tail: tuple[Header, ...],
                   offset_header: str | None
                   ) -> tuple[list[AppliedSegment], DrstreamError | None]:
        """On a worker thread: chain link, MAC, decrypt, decode to produce() arguments,
        replay's filter. The group's first link is checked against the last segment
        opened. Returns what it opened and the error that stopped it (or None)."""
        out: list[AppliedSegment] = []
        prev = self._opened_digest
        try:
            for s in segments:
                header, _ = parse_header(s.data)
                if chain_break(s.seq, header, prev) is not None:
                    raise ChainError("prev_digest does not match the segment applied before "
                                     "it", log_id=self.log.log_id, seq=s.seq,
                                     key=self.log.key(s.seq))
                header, body = decode_segment_produce(
                    s.data, self.keyring, tail, offset_header, expect_log_id=self.log.log_id,
                    expect_seq=s.seq)
                if self.transform is not None:
                    body = self.transform(s.seq, body, header.created_at_ms)
                prev = segment_digest(s.data)
                out.append(AppliedSegment(s.seq, prev, header.created_at_ms, body, s.nbytes))
        except DrstreamError as e:
            return out, e
        return out, None

    def _decode_sync(self, seq: int, data: bytes) -> tuple[SegmentHeader, Body, bytes]:
        header, body = decode_segment(data, self.keyring, expect_log_id=self.log.log_id,
                                      expect_seq=seq)
        return header, body, segment_digest(data)

    def _applied(self, seg: AppliedSegment) -> None:
        self._prev_digest = seg.digest
        p, body = self.progress, seg.body
        p.applied_seq, p.applied_at = seg.seq, time.monotonic()
        p.segment_created_ms = seg.created_at_ms
        p.records += body.manifest.record_count
        APPLIED_SEQ.set(seg.seq)
        APPLIED_TIME.set(seg.created_at_ms / 1000)
        p.lag_s = max(0.0, time.time() - seg.created_at_ms / 1000)
        APPLY_LAG.set(p.lag_s)
        RECORDS.labels("apply", self.log.log_id).inc(body.manifest.record_count)
        SEGMENTS.labels("apply", body.manifest.kind).inc()
        BYTES.labels("applied").inc(seg.nbytes)

    def summary(self) -> str:
        p = self.progress
        return f"apply: applied seq {p.applied_seq}, lag {p.lag_s:.2f}s"

    def reload(self, config: Config) -> None:
        """Live changes: apply intervals, prefetch, group sync interval."""
        if [s.model_dump() for s in config.sinks] != [s.model_dump() for s in self.config.sinks]:
            raise ConfigError(str(config.log_id), [ConfigFieldError(
                "sinks", "...", "changing sinks needs a restart")])
        self.config = config
        self.health.stall_after_s = config.service.stall_after_s

    async def _maybe_sync_groups(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_group_sync:
            return
        self._next_group_sync = now + self.config.apply.group_sync_interval_s
        for sink in self.sinks:
            try:
                await sink.sync_groups()
            except DrstreamError as e:
                log.warning("group_sync_failed", sink=sink.name, error=str(e))

    async def sync_groups_now(self) -> dict[str, dict[str, object]]:
        return {sink.name: await sink.sync_groups(force=True) for sink in self.sinks}

    async def close(self) -> None:
        """Close every sink (idempotent)."""
        for sink in self.sinks:
            await sink.close()


def _joined(first: Opened, second: Opened) -> Opened:
    """Two consecutive opened groups as one (the first ended without an error)."""
    return first[0] + second[0], second[1]
