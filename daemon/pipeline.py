"""`ship`: sources -> open segment -> LogWriter, with positions travelling in each segment.

The cut is decided where the records arrive, like a producer's linger: once everything the
sources handed over is in the open segment and no upload is in flight, but no sooner than
`min_interval_s` after the previous cut (that bounds the PUT rate); with an upload in
flight, once the oldest record is `flush_interval_s` old; at once at `max_bytes`. The
pipeline writes a heartbeat segment when nothing was written for `heartbeat_interval_s`,
and includes consumer-group offsets only once every record below them is in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from drstream.daemon.blobs import BlobStore
from drstream.daemon.codec import Body, EventBatch, KafkaColumns, make_manifest
from drstream.daemon.config import Config
from drstream.daemon.deltalog import LogWriter
from drstream.daemon.errors import ConfigError, ConfigFieldError, DrstreamError, LogStateError
from drstream.daemon.gcpace import paced_gc
from drstream.daemon.keyring import KeyRing
from drstream.daemon.lifecycle import Starting
from drstream.daemon.logging import get_logger
from drstream.daemon.metrics import BYTES, DURABLE_HEAD, RECORDS, SEGMENTS, SHIP_LAG, Health
from drstream.daemon.shards import SEALED
from drstream.daemon.source import Delivery, Source
from drstream.daemon.store import Store
from drstream.daemon.tip import TipSource

log = get_logger("drstream.ship")


@dataclass
class OpenSegment:
    """Records gathered for the next segment, merged per partition in arrival order."""

    batches: dict[tuple[str, str, int], KafkaColumns] = field(default_factory=dict)
    events: dict[str, EventBatch] = field(default_factory=dict)  # stream -> events in order
    nbytes: int = 0
    records: int = 0
    first_at: float | None = None
    min_ts: int | None = None  # oldest record timestamp (ms) in the segment
    released: dict[int, int] = field(default_factory=dict)  # source index -> bytes
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # stream -> topics
    gaps: dict[str, dict[str, dict[str, list[int]]]] = field(default_factory=dict)  # stream
    # -> topic -> partition -> [first, end) lost on the source before it was read

    def add(self, index: int, stream: str, d: Delivery) -> None:
        for b in d.batches:
            cols = b if isinstance(b, KafkaColumns) else KafkaColumns.of(b)
            if cols.timestamps:
                first = cols.timestamps[0]
                self.min_ts = first if self.min_ts is None else min(self.min_ts, first)
            key = (stream, b.topic, b.partition)
            if key not in self.batches:
                self.batches[key] = KafkaColumns(stream, b.topic, b.partition)
            self.batches[key].extend(cols)
            self.records += len(cols)
        for e in d.events:
            self.events.setdefault(stream, EventBatch(stream, [])).events.extend(e.events)
            self.records += len(e.events)
        if (d.batches or d.events) and self.first_at is None:
            self.first_at = time.monotonic()
        self.nbytes += d.nbytes
        self.released[index] = self.released.get(index, 0) + d.nbytes
        if d.metadata:
            self.metadata.setdefault(stream, {}).update(d.metadata)
        for topic, parts in d.gaps.items():
            self.gaps.setdefault(stream, {}).setdefault(topic, {}).update(parts)


def gate_group_offsets(
    pending: dict[str, Any], positions: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split group offsets into (ready, still pending): an offset is ready once every
    record below it is in the log, i.e. it is <= the log position of its partition."""
    ready: dict[str, Any] = {}
    waiting: dict[str, Any] = {}
    for group, topics in pending.items():
        for topic, parts in topics.items():
            for p, offset in parts.items():
                shipped = positions.get(topic, {}).get(p)
                target = ready if shipped is not None and offset <= shipped else waiting
                target.setdefault(group, {}).setdefault(topic, {})[p] = offset
    return ready, waiting


def _identities(config: Config) -> list[dict[str, Any]]:
    """What names and points each source: changing it needs a restart."""
    return [s.model_dump(include={"type", "name",
                                  *config.connectors.source_type(s).restart_fields})
            for s in config.sources]


class Shipper(Starting):
    def __init__(self, config: Config, store: Store, keyring: KeyRing) -> None:
        self.config = config
        self.ship = config.ship
        self.writer = LogWriter(
            store, config.log_id, keyring, max_in_flight=self.ship.max_in_flight,
            zstd_level=self.ship.zstd_level, retry_deadline_s=self.ship.upload_retry_deadline_s,
        )
        self.blobs = BlobStore(store, config.log_id, keyring, zstd_level=self.ship.zstd_level)
        ctx = config.context(self.blobs)
        self.sources: list[Source] = [config.connectors.source(s, ctx) for s in config.sources]
        self.positions: dict[str, Any] = {}
        self.pending_groups: dict[str, dict[str, Any]] = {}
        self.last_append = time.monotonic()  # heartbeats count from the start
        self._last_cut = -float("inf")  # min_interval_s counts from the previous cut only
        self.ready = asyncio.Event()
        self.health = Health()
        # sources that can be unready on their own (a registry that is down)
        self.health.checks = [h for h in (getattr(s, "health", None) for s in self.sources)
                              if h is not None]
        self.lag_s = 0.0
        self._pending_min_ts: dict[int, int] = {}  # seq in flight -> oldest record timestamp
        self._inbox: asyncio.Queue[tuple[int, Delivery]] = asyncio.Queue(maxsize=64)
        # set by a reader that queued a delivery and by the writer when an upload settled
        self._wake = asyncio.Event()
        self.writer.on_durable = self._wake.set
        self.tip_source: TipSource = self.writer  # what ship's HTTP server streams (daemon/tip.py)
        self._open = OpenSegment()
        self._commit_tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Open the log, resume every source at the head's positions (idempotent)."""
        if self.ready.is_set():
            return
        manifest = await self.writer.open()
        if manifest is not None and SEALED in manifest.extra:
            raise LogStateError(
                f"log {self.config.log_id} was handed over to a set of "
                f"{manifest.extra[SEALED].get('count')} shards (drstream shards change): "
                "this shard of the old set ships no more; run the new set's shards")
        self.positions = dict(manifest.positions) if manifest else {}
        for src in self.sources:
            await src.start(self.positions.get(src.stream))
            self.positions[src.stream] = src.positions() or self.positions.get(src.stream, {})
        self.ready.set()
        log.info("ship_started", log_id=self.config.log_id, next_seq=self.writer.next_seq,
                 sources=[s.stream for s in self.sources])

    async def run(self, stop: asyncio.Event) -> None:
        """Ship until `stop` is set, then drain: flush the open segment and the uploads."""
        await self.start()
        readers = [asyncio.create_task(self._reader(i, s, stop)) for i, s in
                   enumerate(self.sources)]
        try:
            async with paced_gc():  # the buffered records' header lists: daemon/gcpace.py
                await self._loop(stop, readers)
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        await self._drain()

    async def _reader(self, index: int, src: Source, stop: asyncio.Event) -> None:
        while not stop.is_set():
            delivery = await src.read(0.2)
            if delivery is not None:
                await self._inbox.put((index, delivery))
                self._wake.set()

    def summary(self) -> str:
        lag = self.lag_s
        return (f"ship: durable seq {self.writer.durable_seq}, next {self.writer.next_seq}, "
                f"lag {lag:.2f}s")

    def reload(self, config: Config) -> None:
        """Live changes: topic/group selection, intervals and limits, log level."""
        if _identities(config) != _identities(self.config):
            raise ConfigError(str(self.config.log_id), [ConfigFieldError(
                "sources", "...", "adding, removing or re-pointing a source needs a restart")])
        for src, new in zip(self.sources, config.sources, strict=True):
            src.reconfigure(new)
        self.config, self.ship = config, config.ship
        self.health.stall_after_s = config.service.stall_after_s

    def _update_lag(self) -> None:
        now_ms = time.time() * 1000
        oldest = min(self._pending_min_ts.values(), default=None)
        if self._open.min_ts is not None:
            oldest = self._open.min_ts if oldest is None else min(oldest, self._open.min_ts)
        lag = 0.0 if oldest is None else max(0.0, (now_ms - oldest) / 1000)
        self.lag_s = lag
        for src in self.sources:
            SHIP_LAG.labels(src.stream).set(lag)

    async def _loop(self, stop: asyncio.Event, readers: list[asyncio.Task[None]]) -> None:
        while not stop.is_set():
            self.health.tick()
            self._update_lag()
            for task in readers:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._wait_s()):
                    await self._wake.wait()
            self._wake.clear()
            await self._take_inbox()
            await self._maybe_cut()
        self._drain_inbox()

    async def _take_inbox(self) -> None:
        """Everything the readers queued into the open segment, cutting at max_bytes."""
        while not self._inbox.empty():
            index, delivery = self._inbox.get_nowait()
            if self._open.nbytes and self._open.nbytes + delivery.nbytes > self.ship.max_bytes:
                await self.cut()  # keep segments near max_bytes, not max + a batch
            self._accept(index, delivery)

    def _drain_inbox(self) -> None:
        while not self._inbox.empty():
            self._accept(*self._inbox.get_nowait())

    def _accept(self, index: int, delivery: Delivery) -> None:
        stream = self.sources[index].stream
        self._open.add(index, stream, delivery)
        self.positions[stream] = delivery.positions
        for group, offsets in delivery.group_offsets.items():
            self.pending_groups.setdefault(stream, {})[group] = offsets

    def _has_content(self) -> bool:
        seg = self._open
        return bool(seg.records or seg.metadata or seg.gaps) or self._groups_ready()

    def _cut_due(self, now: float) -> float:
        """When the open segment (with content) is to be cut: min_interval_s after the
        previous cut, and with an upload in flight not before the age cap either (the
        writer wakes the loop when the upload settles)."""
        earliest = self._last_cut + self.ship.min_interval_s
        if self.writer.unsettled == 0:
            return earliest
        first = self._open.first_at if self._open.first_at is not None else now
        return max(earliest, first + self.ship.flush_interval_s)

    def _wait_s(self) -> float:
        now = time.monotonic()
        deadline = self.last_append + self.ship.heartbeat_interval_s
        if self._has_content():
            deadline = min(deadline, self._cut_due(now))
        return max(0.0, min(deadline - now, 0.5))

    async def _maybe_cut(self) -> None:
        now = time.monotonic()
        if self._open.nbytes >= self.ship.max_bytes:
            await self.cut()
        elif self._has_content():
            if now >= self._cut_due(now):
                await self.cut()
        elif now - self.last_append >= self.ship.heartbeat_interval_s:
            await self.cut()

    def _groups_ready(self) -> bool:
        return any(gate_group_offsets(p, self.positions.get(s, {}))[0]
                   for s, p in self.pending_groups.items())

    async def cut(self) -> int:
        """Append the open segment (or a heartbeat) and start its upload."""
        seg, self._open = self._open, OpenSegment()
        extra: dict[str, Any] = {}
        for stream, topics in seg.metadata.items():
            extra.setdefault(stream, {})["topics"] = topics
        for stream, gaps in seg.gaps.items():
            extra.setdefault(stream, {})["gaps"] = gaps
        for stream, pending in list(self.pending_groups.items()):
            ready, waiting = gate_group_offsets(pending, self.positions.get(stream, {}))
            if ready:
                extra.setdefault(stream, {})["groups"] = ready
            self.pending_groups[stream] = waiting
        batches: list[KafkaColumns | EventBatch] = [*seg.batches.values(), *seg.events.values()]
        # Kafka positions are topic -> {partition: offset}; other sources' are flat values
        positions = {s: {t: dict(p) if isinstance(p, dict) else p for t, p in parts.items()}
                     for s, parts in self.positions.items()}
        body = Body(make_manifest(positions, list(batches), extra=extra), list(batches))
        seq = await self.writer.append(body)
        self.last_append = self._last_cut = time.monotonic()
        if seg.min_ts is not None:
            self._pending_min_ts[seq] = seg.min_ts
        for stream in {b.stream for b in batches}:
            RECORDS.labels("ship", stream).inc(sum(
                len(b) if isinstance(b, KafkaColumns) else len(b.events)
                for b in batches if b.stream == stream))
        BYTES.labels("raw").inc(seg.nbytes)
        SEGMENTS.labels("ship", body.manifest.kind).inc()
        for index, nbytes in seg.released.items():
            self.sources[index].release(nbytes)
        task = asyncio.create_task(self._after_durable(seq, positions))
        self._commit_tasks.add(task)
        task.add_done_callback(self._commit_tasks.discard)
        log.debug("segment_appended", seq=seq, records=seg.records, bytes=seg.nbytes)
        return seq

    async def _after_durable(self, seq: int, positions: dict[str, Any]) -> None:
        with contextlib.suppress(DrstreamError):
            await self.writer.wait_durable(seq)
            self._pending_min_ts.pop(seq, None)
            DURABLE_HEAD.set(self.writer.durable_seq)
            for src in self.sources:
                await src.durable(positions.get(src.stream, {}))

    async def close(self) -> None:
        """Close the sources and the writer (idempotent); run() drains before it does."""
        for src in self.sources:
            await src.close()
        await self.writer.close()

    async def _drain(self) -> None:
        """Stop intake has happened; flush what is open and wait for uploads, bounded."""
        try:
            async with asyncio.timeout(self.ship.drain_deadline_s):
                if self._open.records or self._open.metadata or self._open.gaps:
                    await self.cut()
                await self.writer.flush()
                if self._commit_tasks:
                    await asyncio.gather(*list(self._commit_tasks), return_exceptions=True)
        except TimeoutError:
            log.error("drain_deadline_exceeded", deadline_s=self.ship.drain_deadline_s,
                      durable_seq=self.writer.durable_seq, next_seq=self.writer.next_seq)
            raise DrstreamError(
                f"shutdown drain did not finish within {self.ship.drain_deadline_s:g}s; "
                f"segments after {self.writer.durable_seq} were not stored (their records "
                "will be shipped again on restart)") from None
        finally:
            await self.close()
        log.info("ship_stopped", durable_seq=self.writer.durable_seq)
