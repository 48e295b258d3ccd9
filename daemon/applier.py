"""`apply`: follow the log, check every link and MAC, hand each segment to every sink.

Sinks own their checkpoints (written atomically with their data), so resuming is just:
start each sink, begin after the lowest applied seq, and skip a segment for any sink that
already has it. The chain is checked against the digest each checkpoint recorded, so a
log that was rewritten under a running standby stops apply instead of being trusted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
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
from drstream.daemon.sink import Opener, Sink
from drstream.daemon.store import Store
from drstream.daemon.tip import TipChannel

log = get_logger("drstream.apply")

# what the feeder queues: decoded here, or sealed for a sink that opens it (apply_sealed)
Item = AppliedSegment | SealedSegment
SealedApply = Callable[[list[SealedSegment], Opener], Awaitable[list[AppliedSegment]]]

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
        self._sealed: SealedApply | None = None
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
            self._prev_digest = lowest.digest
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
        first = await self.log.first_seq()
        if first is None or first == 1:
            return 0
        data = await self.log.fetch(first)
        if data is None:
            raise ChainError("oldest segment vanished while starting", log_id=self.log.log_id,
                             seq=first)
        self._prev_digest = parse_header(data, expect_log_id=self.log.log_id,
                                         expect_seq=first)[0].prev_digest
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
        self._sealed = self._sealed_sink()
        feeder = asyncio.create_task(self._feed(after, stop, until_seq, known_end, queue,
                                                slots))
        tasks = [feeder] + ([asyncio.create_task(self.tip.run(stop))] if self.tip else [])
        async with paced_gc():
            try:
                while (item := await queue.get()) is not None:
                    slots.release()
                    await self._apply_group([item, *self._take_ready(queue, slots)])
                    await self._maybe_sync_groups()
                await feeder  # raises what stopped the follower (a bad segment, the store)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return self.progress.applied_seq

    def _sealed_sink(self) -> SealedApply | None:
        """A lone sink that opens segments itself (one thread hop per group, records
        decoded straight into its write calls), where replay's filter, if any, takes
        that form; else None: segments are decoded here, then handed over."""
        apply_sealed = getattr(self.sinks[0], "apply_sealed", None)
        if len(self.sinks) != 1 or apply_sealed is None:
            return None
        if self.transform is not None and not getattr(self.transform, "produce_form", False):
            return None
        return cast(SealedApply, apply_sealed)

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
                if self._sealed is not None:
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

    def _take_ready(self, queue: asyncio.Queue[Item | None],
                    slots: asyncio.Semaphore) -> list[Item]:
        """Segments already fetched (and decoded), to apply with the one just taken."""
        cfg = self.config.apply
        out: list[Item] = []
        size = 0
        while (len(out) + 1 < cfg.batch_max_segments and size < cfg.batch_max_bytes
               and not queue.empty()):
            item = queue.get_nowait()
            if item is None:  # the follower ended: the loop sees the marker next
                queue.put_nowait(None)
                break
            slots.release()
            out.append(item)
            size += item.nbytes
        return out

    async def _apply_group(self, items: list[Item]) -> None:
        if self._sealed is not None:
            sealed = [s for s in items if isinstance(s, SealedSegment)]
            fresh = [s for s in sealed if s.seq > self.sinks[0].checkpoint().seq]
            done = sealed[:len(sealed) - len(fresh)]
            for seg in await asyncio.to_thread(self._open, done) if done else []:
                self._applied(seg)  # the sink has it already: only the chain moves on
            for seg in await self._sealed(fresh, self._open_with) if fresh else []:
                self._applied(seg)
            return
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

    def _open(self, segments: list[SealedSegment]) -> list[AppliedSegment]:
        opened, error = self._open_with(segments, (), None)
        if error is not None:
            raise error
        return opened

    def _open_with(self, segments: list[SealedSegment], tail: tuple[Header, ...],
                   offset_header: str | None
                   ) -> tuple[list[AppliedSegment], DrstreamError | None]:
        """The Opener a sink's apply_sealed calls on its own thread (daemon/sink.py):
        chain link, MAC, decrypt, decode to produce() arguments, replay's filter. The
        group's first link is checked against the last segment applied."""
        out: list[AppliedSegment] = []
        prev = self._prev_digest
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
