"""Kafka source: tails topics with read_committed, manual assignment, bounded memory.

librdkafka's consumer is not thread-safe and its calls block, so one dedicated thread owns
the Consumer (poll, pause/resume, discovery, commits) and hands `Delivery`s to the event
loop. Positions live in the log, not in Kafka: the group commits below are for
visibility in standard tooling and are never read back.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from itertools import chain, groupby
from operator import itemgetter
from typing import Any

from confluent_kafka import (
    OFFSET_INVALID,
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    OffsetSpec,
)
from prometheus_client import Counter

from drstream.connectors.kafka.common import ORIGIN_HEADER, client_config
from drstream.connectors.kafka.config import ALWAYS_EXCLUDED, KafkaSourceConfig
from drstream.daemon.errors import SourceError, SourceUnavailableError
from drstream.daemon.lifecycle import Closing
from drstream.daemon.logging import get_logger
from drstream.daemon.metrics import REGISTRY, SOURCE_UP
from drstream.daemon.plugins import Context
from drstream.daemon.records import KafkaColumns
from drstream.daemon.retry import Backoff, retrying
from drstream.daemon.source import Delivery, SourceProbe

log = get_logger("drstream.kafka.source")
LOST_OFFSETS = Counter(
    "drstream_source_lost_offsets", "Offsets deleted on the source cluster (retention) "
    "before ship read them: never replicated, recorded in the log as gaps",
    ["stream", "topic"], registry=REGISTRY)

# What retrying cannot fix: credentials or permissions the cluster refuses.
_REFUSED = frozenset({
    KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._AUTHENTICATION,
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
})

RECORD_OVERHEAD_BYTES = 64  # per-record bookkeeping counted against the buffer bound
POLL_TIMEOUT_S = 0.1
# While the pipeline has not yet taken the previous delivery, the consumer thread keeps
# draining into the next one, waking this often to see whether it was taken: small
# deliveries each pay a position() call over every partition, a positions copy and a
# thread hand-over (benchmarks/source_drain.py: 454 -> 5 records per call at 5 MB/s
# without this batching, 7.7 -> 12.6 consumer CPU us per record).
HANDOVER_POLL_S = 0.002
# status/failover probes: one request's timeout, and the bounds of the read that dates
# the oldest pending record of each partition (it needs one record of each)
PROBE_TIMEOUT_S = 10.0
PROBE_FETCH_BYTES = 64 << 10
PROBE_QUEUE_KBYTES = 16 << 10

Positions = dict[str, dict[str, int]]  # topic -> partition (as str, JSON keys) -> next offset

# Message fields, taken column by column from a consumed list (message_columns);
# typed Any: the stubs say Optional for what a consumed, error-free message always has.
_Field = Callable[[Any], Any]
_TOPIC: _Field = Message.topic
_PARTITION: _Field = Message.partition
_OFFSET: _Field = Message.offset
_TIMESTAMP: _Field = Message.timestamp
_KEY: _Field = Message.key
_VALUE: _Field = Message.value
_HEADERS: _Field = Message.headers
_ERROR: _Field = Message.error
_FIRST, _SECOND = itemgetter(0), itemgetter(1)


class KafkaSource(Closing):
    def __init__(self, config: KafkaSourceConfig, ctx: Context) -> None:
        self.config = config
        self.stream = config.stream
        self.group_id = config.group_id or f"drstream-{ctx.log_id}"
        self.buffer_max_bytes = ctx.buffer_max_bytes
        self.shard = ctx.shard  # None: every partition is this source's
        self._positions: Positions = {}
        self._delivered: Positions = {}
        self._buffered = 0
        self._buffer_lock = threading.Lock()
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._paused = False
        self._topics: dict[str, int] = {}  # topic -> partition count
        self._assigned: list[TopicPartition] = []
        self._shipped_meta: dict[str, Any] = {}
        self._group_offsets: dict[str, Any] = {}
        self._next_discovery = 0.0
        # the first scan of the cluster is retried (capped back-off) this long
        self._connect_backoff = Backoff(1.0, 30.0, deadline_s=ctx.outage_budget_s)
        self._resets: set[tuple[str, int]] = set()  # offset reset errors not yet handled
        self._consumer: Consumer | None = None
        self._admin: AdminClient | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out: asyncio.Queue[Delivery] = asyncio.Queue()
        self._taken = threading.Event()  # the last delivery emitted was read (or none yet)
        self._taken.set()

    # -- event-loop side ---------------------------------------------------------------

    async def start(self, positions: dict[str, Any] | None) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._positions = {t: {p: int(o) for p, o in parts.items()}
                           for t, parts in (positions or {}).items()}
        await retrying(lambda: asyncio.to_thread(self._connect), self._connect_backoff,
                       retriable=lambda e: isinstance(e, SourceUnavailableError),
                       on_retry=self._connect_retry)
        SOURCE_UP.labels(self.stream).set(1)
        self._thread = threading.Thread(target=self._run, name=f"kafka-{self.config.name}",
                                        daemon=True)
        self._thread.start()

    async def read(self, timeout_s: float) -> Delivery | None:
        if self._failure is not None and self._out.empty():
            raise self._failure
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
            # races with a completed get(), leaving a cancelled reader running forever
            async with asyncio.timeout(timeout_s):
                delivery = await self._out.get()
        except TimeoutError:
            return None
        if self._out.empty():
            self._taken.set()
        self._delivered = delivery.positions
        return delivery

    def positions(self) -> dict[str, Any]:
        return self._delivered

    def release(self, nbytes: int) -> None:
        with self._buffer_lock:
            self._buffered -= nbytes

    async def durable(self, positions: dict[str, Any]) -> None:
        offsets = [TopicPartition(t, int(p), int(o))
                   for t, parts in positions.items() for p, o in parts.items()]
        if offsets:
            self._commands.put(lambda: self._commit(offsets))

    def reconfigure(self, config: KafkaSourceConfig) -> None:
        """Swap in a reloaded config; the consumer thread rediscovers at once."""
        self.config = config
        self._next_discovery = 0.0

    async def probe(self, positions: dict[str, Any]) -> SourceProbe:
        return await asyncio.to_thread(self._probe_sync, positions)

    def _probe_sync(self, positions: dict[str, Any]) -> SourceProbe:
        """Pending records and their age from a few batched requests: the offsets of every
        selected partition in one ListOffsets per kind, then the first pending record of
        each behind partition read with one consumer over all of them (reading each
        partition on its own cost 0.5-1 s apiece: 8 minutes for 1,000 partitions)."""
        conf = client_config(self.config)
        timeout = min(self.config.connect_timeout_s, PROBE_TIMEOUT_S)
        try:
            admin = AdminClient(conf)
            md = admin.list_topics(timeout=timeout)
            parts = [TopicPartition(name, p) for name, t in md.topics.items()
                     if t.error is None and self._selected(name) for p in t.partitions
                     if self._owns(name, p)]
            earliest, latest, max_ts = (OffsetSpec.earliest(),  # type: ignore[no-untyped-call]
                                        OffsetSpec.latest(),  # type: ignore[no-untyped-call]
                                        OffsetSpec.max_timestamp())  # type: ignore[no-untyped-call]
            low = _list_offsets(admin, parts, earliest, timeout)
            high = _list_offsets(admin, parts, latest, timeout)
            newest = _list_offsets(admin, parts, max_ts, timeout)
        except (KafkaException, TimeoutError) as e:
            error = e.args[0] if isinstance(e, KafkaException) and e.args else e
            return SourceProbe(reachable=False, error=str(error) or type(e).__name__)
        probe = SourceProbe(reachable=True)
        behind: dict[tuple[str, int], tuple[int, int]] = {}
        for tp in parts:
            key = (tp.topic, tp.partition)
            position = positions.get(tp.topic, {}).get(str(tp.partition))
            start = low[key].offset if position is None else max(position, low[key].offset)
            if high[key].offset > start:
                probe.pending_records += high[key].offset - start
                behind[key] = (start, high[key].offset)
            if high[key].offset > low[key].offset and newest[key].timestamp >= 0:
                probe.newest_record_ms = max(newest[key].timestamp, probe.newest_record_ms or 0)
        if behind:
            firsts = _first_timestamps({**conf, "group.id": f"{self.group_id}-probe"}, behind)
            probe.oldest_pending_ms = min(firsts.values(), default=None)
        return probe

    async def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    # -- consumer thread ---------------------------------------------------------------

    def _connect(self) -> None:
        """Make the consumer and scan the cluster once (topics, partitions, positions).
        A broker that is down or restarting (NOT_LEADER_FOR_PARTITION, timeouts) is
        SourceUnavailableError, retried by start() within the outage budget; refused
        credentials or permissions are SourceError at once."""
        conf = client_config(self.config)
        self._consumer = Consumer({
            **conf,
            "group.id": self.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            # Every partition starts at a concrete offset (the log's, or _start_offset), so
            # a reset only happens when records were deleted under a position: an error
            # event (_AUTO_OFFSET_RESET) that _offsets_lost records as a gap, never a
            # silent jump (or, past the end, a re-read from the start).
            "auto.offset.reset": "error",
            "enable.partition.eof": False,
            # the 1 s default idles the consumer whenever its prefetch queue is full:
            # measured 35-42 MB/s -> 300+ MB/s bare drain with 10 ms
            "fetch.queue.backoff.ms": 10,
            # librdkafka's own prefetch counts against our memory bound too
            "queued.max.messages.kbytes": max(1024, self.buffer_max_bytes // 4096),
            "client.id": f"drstream-ship-{self.config.name}",
        })
        self._admin = AdminClient(conf)
        try:
            self._discover(initial=True)
        except (KafkaException, TimeoutError) as e:
            self._consumer.close()
            self._topics, self._assigned = {}, []
            err = e.args[0] if isinstance(e, KafkaException) and e.args else e
            cls = SourceError if isinstance(err, KafkaError) and (
                err.fatal() or err.code() in _REFUSED) else SourceUnavailableError
            raise cls(
                f"cannot reach Kafka cluster {self.config.name!r} at "
                f"{self.config.bootstrap_servers} within {self.config.connect_timeout_s:g}s: "
                f"{err}"
            ) from e

    def _connect_retry(self, e: Exception, attempt: int, delay: float) -> None:
        SOURCE_UP.labels(self.stream).set(0)
        log.warning("source_connect_retry", source=self.stream, attempt=attempt,
                    retry_in_s=round(delay, 2), budget_s=self._connect_backoff.deadline_s,
                    error=str(e))

    def _run(self) -> None:
        assert self._consumer is not None
        pending: list[Any] = []
        try:
            while not self._stop.is_set():
                self._run_commands()
                if self._resets:
                    self._offsets_lost()
                if time.monotonic() >= self._next_discovery:
                    self._discover(initial=False)
                self._flow_control()
                pending += self._drain(len(pending))
                if self._taken.is_set() or len(pending) >= self.config.consume_batch:
                    delivery = self._to_delivery(pending)
                    pending = []
                    if delivery is not None:
                        self._emit(delivery)
        except BaseException as e:  # surfaced to the pipeline by read()
            self._failure = e if isinstance(e, SourceError) else SourceError(
                f"Kafka source {self.config.name!r} failed: {e}")
            log.error("source_failed", source=self.stream, error=str(e))
        finally:
            self._run_commands()
            with contextlib.suppress(Exception):
                self._consumer.close()

    def _drain(self, pending: int) -> list[Any]:
        """What the consumer has fetched: block for the first record (up to POLL_TIMEOUT_S),
        then take what is already there. consume(N, timeout) would wait for N records or
        the whole timeout, holding a record up to 100 ms at a steady rate (broker ack ->
        returned p99 191 ms against 10 ms with this, benchmarks/source_drain.py). With a
        delivery still untaken, wait only HANDOVER_POLL_S for more."""
        assert self._consumer is not None
        room = self.config.consume_batch - pending
        if pending:
            return self._consumer.consume(room, HANDOVER_POLL_S)
        msgs = self._consumer.consume(1, POLL_TIMEOUT_S)
        if msgs and room > 1:
            msgs += self._consumer.consume(room - 1, 0)
        return msgs

    def _emit(self, delivery: Delivery) -> None:
        assert self._loop is not None
        self._taken.clear()
        with self._buffer_lock:
            self._buffered += delivery.nbytes
        self._loop.call_soon_threadsafe(self._out.put_nowait, delivery)

    def _flow_control(self) -> None:
        """Pause every partition while the pipeline is behind; resume at half the bound."""
        assert self._consumer is not None
        with self._buffer_lock:
            buffered = self._buffered
        if not self._paused and buffered >= self.buffer_max_bytes:
            self._consumer.pause(self._consumer.assignment())
            self._paused = True
            log.info("source_paused", source=self.stream, buffered_bytes=buffered)
        elif self._paused and buffered < self.buffer_max_bytes // 2:
            self._consumer.resume(self._consumer.assignment())
            self._paused = False
            log.info("source_resumed", source=self.stream, buffered_bytes=buffered)

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _commit(self, offsets: list[TopicPartition]) -> None:
        assert self._consumer is not None
        try:
            self._consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as e:  # visibility only: never fatal
            log.warning("visibility_commit_failed", source=self.stream, error=str(e))

    def _advance_positions(self) -> bool:
        """Take librdkafka's positions: they also step over transaction markers and aborted
        records, which the last record's offset + 1 would not (a group offset committed
        past a marker could otherwise never be shown to be covered by the log)."""
        assert self._consumer is not None
        moved = False
        for tp in self._consumer.position(self._assigned):
            parts = self._positions.setdefault(tp.topic, {})
            if tp.offset >= 0 and tp.offset > parts.get(str(tp.partition), -1):
                parts[str(tp.partition)] = tp.offset
                moved = True
        return moved

    def _to_delivery(self, msgs: list[Any]) -> Delivery | None:
        meta, groups, gaps = self._pending_meta, self._pending_groups, self._pending_gaps
        moved = self._advance_positions() if self._assigned else False
        if not msgs and meta is None and groups is None and gaps is None and not moved:
            return None
        batches, nbytes = message_columns(self.stream, msgs, self._keep)
        for b in batches:
            parts = self._positions.setdefault(b.topic, {})
            parts[str(b.partition)] = max(parts.get(str(b.partition), 0), b.offsets[-1] + 1)
        self._pending_meta = self._pending_groups = self._pending_gaps = None
        return Delivery(
            batches=batches, nbytes=nbytes, metadata=meta, group_offsets=groups or {},
            gaps=gaps or {},
            positions={t: dict(parts) for t, parts in self._positions.items()},
        )

    def _keep(self, m: Any) -> bool:
        """False for a message to leave out: an error (logged, fatal ones raise) or a
        record applied here by drstream (shipping it back would loop)."""
        err = m.error()
        if err is not None:
            if err.code() == KafkaError._AUTO_OFFSET_RESET and m.topic() is not None:
                self._resets.add((m.topic(), m.partition()))  # _offsets_lost, next loop
            else:
                self._on_error(err)
            return False
        headers = m.headers()
        return not (headers and self._replicated(headers))

    def _replicated(self, headers: list[tuple[str, bytes | None]]) -> bool:
        skip = self.config.skip_origins
        for name, value in headers:
            if name == ORIGIN_HEADER:
                return "*" in skip or (value or b"").decode(errors="replace") in skip
        return False

    _pending_meta: dict[str, Any] | None = None
    _pending_groups: dict[str, Any] | None = None
    _pending_gaps: dict[str, dict[str, list[int]]] | None = None

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            raise SourceError(f"Kafka cluster {self.config.name!r}: fatal error: {err.str()}")
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            SOURCE_UP.labels(self.stream).set(0)  # back to 1 at the next discovery
        log.warning("source_error", source=self.stream, code=err.name(), error=err.str())

    # -- discovery: topics, partitions, configs, group offsets ---------------------------

    def _discover(self, *, initial: bool) -> None:
        assert self._consumer is not None and self._admin is not None
        self._next_discovery = time.monotonic() + self.config.discovery_interval_s
        self._admin.poll(0)  # hands its queued log lines to the logger (common.client_config)
        timeout = self.config.connect_timeout_s if initial else 10.0
        try:
            md = self._consumer.list_topics(timeout=timeout)
        except KafkaException:
            SOURCE_UP.labels(self.stream).set(0)
            if initial:
                raise
            log.warning("discovery_failed", source=self.stream)
            return
        SOURCE_UP.labels(self.stream).set(1)
        wanted = {
            name: len(t.partitions) for name, t in md.topics.items()
            if t.error is None and self._selected(name)
        }
        new_parts = [(t, p) for t, n in wanted.items() for p in range(n)
                     if p >= self._topics.get(t, 0) and self._owns(t, p)]
        if new_parts:
            self._assign(new_parts, initial=initial)
        dropped = [tp for tp in self._assigned if tp.topic not in wanted]
        if dropped:  # deselected by a reload: stop reading; positions stay in the log
            self._consumer.incremental_unassign(dropped)
            self._assigned = [tp for tp in self._assigned if tp.topic in wanted]
            log.info("partitions_unassigned", source=self.stream, count=len(dropped))
        changed = {t for t, n in wanted.items() if self._topics.get(t) != n}
        self._topics = wanted
        self._refresh_metadata(force=initial or bool(changed))
        if self.config.groups.include:
            self._refresh_groups()

    def _owns(self, topic: str, partition: int) -> bool:
        """A partition this shard ships (every one without shards). Topic metadata is
        shipped by every shard alike: each shard's apply creates the topics it writes to
        itself, never waiting on another shard (docs/shards.md)."""
        return self.shard is None or self.shard.owns(topic, partition)

    def _selected(self, topic: str) -> bool:
        import re

        if any(re.fullmatch(p, topic) for p in ALWAYS_EXCLUDED):
            return False
        return self.config.topics.matches(topic)

    def _assign(self, parts: list[tuple[str, int]], *, initial: bool) -> None:
        assert self._consumer is not None
        tps = []
        for topic, partition in parts:
            known = self._positions.get(topic, {}).get(str(partition))
            if known is not None:
                known = self._past_retention(topic, partition, known)
            offset = known if known is not None else self._start_offset(topic, partition, initial)
            self._positions.setdefault(topic, {})[str(partition)] = offset
            tps.append(TopicPartition(topic, partition, offset))
        self._consumer.incremental_assign(tps)
        self._assigned.extend(TopicPartition(t, p) for t, p in parts)
        if self._paused:
            self._consumer.pause(tps)
        log.info("partitions_assigned", source=self.stream, count=len(tps),
                 topics=sorted({t for t, _ in parts}))

    def _offsets_lost(self) -> None:
        """Partitions whose next offset the cluster no longer has (the consumer's offset
        reset error): records were deleted (retention, delete-records) under a running
        ship before it read them. The exact range is recorded like at a restart
        (_past_retention), and reading resumes at the cluster's first offset."""
        assert self._consumer is not None
        for topic, partition in sorted(self._resets):
            position = self._positions.get(topic, {}).get(str(partition), 0)
            try:
                low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=10)
                resume = self._past_retention(topic, partition, position) \
                    if low > position else min(position, int(high))
                if position > high:  # the partition lost its end (unclean leader change)
                    log.error("source_position_past_end", source=self.stream, topic=topic,
                              partition=partition, position=position, end=int(high))
                self._positions.setdefault(topic, {})[str(partition)] = resume
                # a partition stopped by the reset error cannot seek (_STATE): assign it anew
                tp = TopicPartition(topic, partition, resume)
                self._consumer.incremental_unassign([TopicPartition(topic, partition)])
                self._consumer.incremental_assign([tp])
                if self._paused:
                    self._consumer.pause([tp])
            except KafkaException as e:  # the cluster is not answering: try again next loop
                log.warning("offset_reset_pending", source=self.stream, topic=topic,
                            partition=partition, error=str(e))
                return
            self._resets.discard((topic, partition))

    def _past_retention(self, topic: str, partition: int, position: int) -> int:
        """Where shipping of a partition resumes: `position`, unless the cluster deleted
        records there (retention, delete-records) before they were read. Such a gap can
        never be replicated; it is logged, counted and recorded in the log (manifest
        `extra.<stream>.gaps`) so an audit sees it instead of a silent jump."""
        assert self._consumer is not None
        low, _ = self._consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=self.config.connect_timeout_s)
        if low <= position:
            return position
        gaps = self._pending_gaps if self._pending_gaps is not None else {}
        gaps.setdefault(topic, {})[str(partition)] = [position, int(low)]  # [first, end)
        self._pending_gaps = gaps
        LOST_OFFSETS.labels(self.stream, topic).inc(low - position)
        log.error("source_offsets_lost", source=self.stream, topic=topic, partition=partition,
                  first=position, end=int(low), count=int(low) - position,
                  reason="deleted on the cluster (retention) before they were shipped")
        return int(low)

    def _start_offset(self, topic: str, partition: int, initial: bool) -> int:
        """A concrete offset, so the log records it and a restart never re-resolves it."""
        assert self._consumer is not None
        tp = TopicPartition(topic, partition)
        timeout = self.config.connect_timeout_s
        low, high = self._consumer.get_watermark_offsets(tp, timeout=timeout)
        # Topics and partitions that appear while running start at their beginning.
        mode = self.config.start_from if initial else "earliest"
        if mode == "earliest":
            return int(low)
        if mode == "latest":
            return int(high)
        ts = self.config.start_timestamp_ms() or 0
        [found] = self._consumer.offsets_for_times(
            [TopicPartition(topic, partition, ts)], timeout=timeout)
        return int(high) if found.offset in (OFFSET_INVALID, -1) else int(found.offset)

    def _refresh_metadata(self, *, force: bool) -> None:
        meta = {t: {"partitions": n, "configs": self._topic_configs(t)} for t, n in
                self._topics.items()}
        changed = {t: m for t, m in meta.items() if self._shipped_meta.get(t) != m}
        if changed or force:
            self._shipped_meta = meta
            self._pending_meta = {**(self._pending_meta or {}), **(meta if force else changed)}

    def _topic_configs(self, topic: str) -> dict[str, str]:
        """Only the configs set on the topic itself (the standby applies those)."""
        assert self._admin is not None
        res = ConfigResource(ConfigResource.Type.TOPIC, topic)
        try:
            entries = self._admin.describe_configs([res])[res].result(timeout=10)
        except (KafkaException, TimeoutError) as e:  # the future times out while brokers are down
            log.warning("describe_configs_failed", source=self.stream, topic=topic,
                        error=str(e) or type(e).__name__)
            previous: dict[str, str] = self._shipped_meta.get(topic, {}).get("configs", {})
            return previous
        return {
            name: e.value for name, e in entries.items()
            if not e.is_default and e.source == 1 and e.value is not None  # DYNAMIC_TOPIC_CONFIG
        }

    def _committed(self, group: str) -> dict[str, dict[str, int]]:
        """A group's committed offsets on the replicated topics, read through a consumer
        that never joins the group (AdminClient.list_consumer_group_offsets can crash
        librdkafka 2.16 on a NOT_COORDINATOR answer)."""
        reader = Consumer({**client_config(self.config), "group.id": group,
                           "enable.auto.commit": False})
        try:
            # only the partitions this shard ships: a group's offset travels in the log of
            # the records below it, so its translation on the standby stays exact
            tps = [TopicPartition(t, p) for t, n in self._topics.items() for p in range(n)
                   if self._owns(t, p)]
            parts: dict[str, dict[str, int]] = {}
            for tp in reader.committed(tps, timeout=10) if tps else []:
                if tp.offset >= 0 and tp.error is None:
                    parts.setdefault(tp.topic, {})[str(tp.partition)] = tp.offset
            return parts
        finally:
            reader.close()

    def _refresh_groups(self) -> None:
        assert self._admin is not None
        try:
            listed = self._admin.list_consumer_groups().result(timeout=10)
            offsets: dict[str, Any] = {}
            for g in listed.valid:
                gid = g.group_id
                if gid == self.group_id or not self.config.groups.matches(gid):
                    continue
                parts = self._committed(gid)
                if parts:
                    offsets[gid] = parts
        except (KafkaException, TimeoutError) as e:
            log.warning("group_offsets_failed", source=self.stream,
                        error=str(e) or type(e).__name__)
            return
        if offsets != self._group_offsets:
            self._group_offsets = offsets
            self._pending_groups = offsets


def message_columns(stream: str, msgs: list[Any], keep: Callable[[Any], bool]
                    ) -> tuple[list[KafkaColumns], int]:
    """Consumed messages as one KafkaColumns per partition, and their buffered size.

    Each column is taken from the whole list at once (map over the Message methods): no
    object and no Python step per record, about 30% fewer instructions than a record
    object each (benchmarks/codec.py, "ship messages -> body"). When a message has an
    error, or one carries the origin header (one bulk check), `keep` filters the list
    message by message first (it logs errors and drops replicated records)."""
    headers = list(map(_HEADERS, msgs))
    if any(map(_ERROR, msgs)) or \
            ORIGIN_HEADER in map(_FIRST, chain.from_iterable(filter(None, headers))):
        msgs = [m for m in msgs if keep(m)]
        headers = list(map(_HEADERS, msgs))
    if None in headers:  # records without headers: () encodes like []
        headers = [h or () for h in headers]
    out: dict[tuple[str, int], KafkaColumns] = {}
    start = 0
    for (topic, partition), run in groupby(zip(map(_TOPIC, msgs), map(_PARTITION, msgs),
                                               strict=True)):
        end = start + len(list(run))
        part = msgs[start:end]
        stamps = list(map(_TIMESTAMP, part))
        cols = KafkaColumns(stream, topic, partition, list(map(_OFFSET, part)),
                            list(map(_SECOND, stamps)), list(map(_FIRST, stamps)),
                            list(map(_KEY, part)), list(map(_VALUE, part)), headers[start:end])
        start = end
        if (topic, partition) in out:  # the consumer switched partitions and came back
            out[topic, partition].extend(cols)
        else:
            out[topic, partition] = cols
    nbytes = RECORD_OVERHEAD_BYTES * len(msgs)
    for cols in out.values():
        nbytes += sum(map(len, filter(None, cols.keys))) + sum(map(len, filter(None, cols.values)))
    return list(out.values()), nbytes


def _list_offsets(admin: AdminClient, parts: list[TopicPartition], spec: Any,
                  timeout: float) -> dict[tuple[str, int], Any]:
    """One ListOffsets request per broker for every partition (read_committed: `latest`
    is the last stable offset, what ship can read)."""
    if not parts:
        return {}
    futures = admin.list_offsets({tp: spec for tp in parts},
                                 isolation_level=IsolationLevel.READ_COMMITTED,
                                 request_timeout=timeout)
    return {(tp.topic, tp.partition): fut.result(timeout) for tp, fut in futures.items()}


def _first_timestamps(conf: dict[str, Any], ranges: dict[tuple[str, int], tuple[int, int]],
                      ) -> dict[tuple[str, int], int]:
    """The timestamp of the first readable record in [start, end) of each partition
    (transaction markers and aborted records skipped), all partitions read at once."""
    consumer = Consumer({**conf, "enable.auto.commit": False,
                         "isolation.level": "read_committed", "enable.partition.eof": False,
                         # one record per partition is all it needs: small fetches
                         "fetch.wait.max.ms": 10, "max.partition.fetch.bytes": PROBE_FETCH_BYTES,
                         "queued.max.messages.kbytes": PROBE_QUEUE_KBYTES})
    found: dict[tuple[str, int], int] = {}
    try:
        consumer.assign([TopicPartition(t, p, start) for (t, p), (start, _) in ranges.items()])
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        waiting = dict(ranges)
        while waiting and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.1):
                key = (m.topic(), m.partition())
                if m.error() is None and key in waiting and (m.offset() or 0) < waiting[key][1]:
                    found[key] = m.timestamp()[1]
                    del waiting[key]
                    consumer.pause([TopicPartition(*key)])
            # partitions whose range holds only markers or aborted records end unread
            for tp in consumer.position([TopicPartition(t, p) for t, p in waiting]):
                if tp.offset >= waiting[(tp.topic, tp.partition)][1]:
                    del waiting[(tp.topic, tp.partition)]
    finally:
        consumer.close()
    return found
