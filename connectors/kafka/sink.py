"""Kafka sink: each segment is one transaction holding its records AND its checkpoint.

The checkpoint record (applied seq, segment digest, source->target offsets, group offsets)
goes to a compacted topic on the standby inside the same transaction as the records, so
after any crash the standby holds either both or neither: exactly once. A second apply
with the same transactional.id fences this one (init_transactions), never both writing.

librdkafka's producer calls block, so every call runs on one dedicated thread.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any, TypeVar, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from drstream.connectors.kafka.admin import ADMIN_TIMEOUT_S, TopicAdmin
from drstream.connectors.kafka.common import ORIGIN_HEADER, SOURCE_OFFSET_HEADER, client_config
from drstream.connectors.kafka.config import KafkaSinkConfig
from drstream.connectors.kafka.groups import GroupSync
from drstream.daemon.accel import produce_batch
from drstream.daemon.codec import Body, KafkaBatch
from drstream.daemon.errors import SinkError, SinkFencedError
from drstream.daemon.lifecycle import Closing
from drstream.daemon.logging import get_logger
from drstream.daemon.plugins import Context
from drstream.daemon.records import AppliedSegment, Checkpoint, ProduceBatch
from drstream.daemon.shards import HANDOVER

log = get_logger("drstream.kafka.sink")
T = TypeVar("T")

# src topic -> partition (str) -> [source next offset, target next offset]
OffsetMap = dict[str, dict[str, list[int]]]
# A log taken over from others waits for their applies: poll their checkpoints this often,
# and say what it waits for every HANDOVER_LOG_EVERY_S.
HANDOVER_POLL_S = 1.0
HANDOVER_LOG_EVERY_S = 10.0


class KafkaSink(Closing):
    def __init__(self, config: KafkaSinkConfig, ctx: Context) -> None:
        self.config = config
        self.name = config.sink_name
        self.log_id = log_id = ctx.log_id
        self.cluster = config.source.split(":", 1)[-1]
        self.txn_id = config.transactional_id or f"drstream-apply-{log_id}-{config.name}"
        self._ckpt_key = f"{log_id}/{config.name}".encode()
        # headers every produced record ends with, before its source offset
        self._tail = ((ORIGIN_HEADER, self.cluster.encode()),)
        # apply decodes segments straight into produce() arguments of this form
        self.produce_form = (self._tail, SOURCE_OFFSET_HEADER)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"kafka-sink-{config.name}")
        self._cp = Checkpoint()
        self._producer: Producer | None = None
        self._topics: TopicAdmin | None = None
        self._groups: GroupSync | None = None
        self._reader: Consumer | None = None
        self._closed = False

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def checkpoint(self) -> Checkpoint:
        return self._cp

    async def peek(self) -> Checkpoint:
        try:
            cp: Checkpoint = await self._call(self._read_checkpoint)
        except KafkaException as e:
            code = e.args[0].code() if e.args else None
            if code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION):
                return Checkpoint()  # no apply has run against this cluster yet
            raise SinkError(f"{self.name}: cannot read checkpoints from "
                            f"{self.config.bootstrap_servers}: {e}", retriable=True) from e
        return cp

    # -- start: reach the cluster, fence older instances, read the checkpoint ----------

    async def start(self) -> Checkpoint:
        if self._producer is None:
            await self._call(self._start_sync)
        return self._cp

    def _start_sync(self) -> None:
        conf = client_config(self.config)
        admin = AdminClient(conf)
        self._topics = TopicAdmin(admin, self.name, self.config.replication_factor,
                                  self._target)
        self._groups = GroupSync(admin, self.name, self._target, self._consumer)
        try:
            self._topics.refresh(self.config.connect_timeout_s)
        except KafkaException as e:
            raise SinkError(
                f"{self.name}: cannot reach Kafka cluster {self.config.name!r} at "
                f"{self.config.bootstrap_servers} within {self.config.connect_timeout_s:g}s: "
                f"{e.args[0] if e.args else e}", retriable=True) from e
        self._topics.ensure_checkpoint_topic(self.config.checkpoint_topic)
        self._producer = Producer({
            **conf,
            "transactional.id": self.txn_id,
            "enable.idempotence": True,
            "transaction.timeout.ms": int(self.config.transaction_timeout_s * 1000),
            "linger.ms": 5,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
            "client.id": f"drstream-apply-{self.config.name}",
        })
        try:
            # Aborts whatever a crashed predecessor left open and fences it for good.
            self._producer.init_transactions(self.config.connect_timeout_s * 4)
        except KafkaException as e:
            raise SinkError(f"{self.name}: init_transactions failed: {e}", retriable=True) from e
        self._cp = self._read_checkpoint()
        log.info("sink_started", sink=self.name, applied_seq=self._cp.seq, txn_id=self.txn_id)

    def _read_checkpoint(self) -> Checkpoint:
        return self._read_checkpoints([self._ckpt_key]).get(self._ckpt_key, Checkpoint())

    def _read_checkpoints(self, keys: list[bytes]) -> dict[bytes, Checkpoint]:
        """The newest committed checkpoint of each of `keys` (those that have one)."""
        consumer = self._consumer()
        topic = self.config.checkpoint_topic
        last: dict[bytes, bytes] = {}
        try:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0),
                                                     timeout=ADMIN_TIMEOUT_S)
            consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
            deadline = time.monotonic() + ADMIN_TIMEOUT_S
            while high > 0 and time.monotonic() < deadline:
                for m in consumer.consume(500, 0.5):
                    key = m.key()
                    if m.error() is None and key in keys and m.value() is not None:
                        last[key] = m.value()  # type: ignore[assignment]
                [pos] = consumer.position([TopicPartition(topic, 0)])
                if pos.offset >= high:
                    break
            else:
                if high > 0:
                    raise SinkError(f"{self.name}: timed out reading checkpoint topic {topic}")
        finally:
            consumer.unassign()
        return {key: decode_checkpoint(value) for key, value in last.items()}

    def _take_over(self, handover: dict[str, Any], positions: dict[str, Any],
                   offsets: OffsetMap, groups: dict[str, Any]) -> None:
        """The first segment of a log that took over from others (a shard count change,
        daemon/reshard.py): wait until this cluster's apply of every old log has applied
        that log's seal, so no partition is written out of order, then take over their
        offset maps and group offsets for the partitions this log now carries, so a group
        on a partition that gets no new record still translates exactly."""
        wanted = {f"{p['log_id']}/{self.config.name}".encode(): int(p["seq"])
                  for p in handover.get("from", [])}
        waited = 0.0
        while True:
            found = self._read_checkpoints(list(wanted))
            behind = {k.decode(): (found[k].seq if k in found else 0, seq)
                      for k, seq in wanted.items() if k not in found or found[k].seq < seq}
            if not behind:
                break
            if waited % HANDOVER_LOG_EVERY_S == 0:
                log.info("handover_waiting", sink=self.name, log_id=self.log_id,
                         behind={k: f"applied {a} of {s}" for k, (a, s) in behind.items()})
            time.sleep(HANDOVER_POLL_S)
            waited += HANDOVER_POLL_S
        mine = {(t, p) for t, parts in positions.items() for p in parts}
        for cp in found.values():
            for t, parts in cp.offsets.get("map", {}).items():
                for p, entry in parts.items():
                    if (t, p) in mine:
                        offsets.setdefault(t, {})[p] = list(entry)
            for g, topics in cp.offsets.get("groups", {}).items():
                for t, parts in topics.items():
                    for p, o in parts.items():
                        if (t, p) in mine:
                            groups.setdefault(g, {}).setdefault(t, {})[p] = o
        log.info("handover_taken", sink=self.name, log_id=self.log_id,
                 partitions=len(mine), from_logs=[k.decode() for k in wanted])

    def _consumer(self) -> Consumer:
        if self._reader is None:
            self._reader = Consumer({
                **client_config(self.config),
                "group.id": f"drstream-apply-reader-{self.log_id}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": False,
                # Each offset-translation probe re-assigns and waits for one record; with
                # the default 500 ms every probe after the first cost ~0.5 s (~5 s per
                # partition), on the thread that also applies segments.
                "fetch.wait.max.ms": 10,
            })
        return self._reader

    # -- apply one segment --------------------------------------------------------------

    async def apply(self, seq: int, digest: bytes, created_at_ms: int, body: Body) -> None:
        await self._call(self._apply_sync, [AppliedSegment(seq, digest, created_at_ms, body, 0)])

    async def apply_batch(self, segments: list[AppliedSegment]) -> None:
        """Consecutive segments in one transaction, with the last one's checkpoint."""
        await self._call(self._apply_sync, segments)

    def _apply_sync(self, segments: list[AppliedSegment]) -> None:
        offsets = {t: {p: list(v) for p, v in parts.items()}
                   for t, parts in self._cp.offsets.get("map", {}).items()}
        groups = {g: {t: dict(parts) for t, parts in topics.items()}
                  for g, topics in self._cp.offsets.get("groups", {}).items()}
        work = []
        admin = self._topics
        assert admin is not None
        admin.admin.poll(0)  # hands its queued log lines to the logger (common.client_config)
        for seg in segments:
            handover = seg.body.manifest.extra.get(HANDOVER)
            if handover is not None:
                self._take_over(handover, seg.body.manifest.positions.get(self.config.source, {}),
                                offsets, groups)
            extra = seg.body.manifest.extra.get(self.config.source, {})
            if extra.get("topics"):
                admin.ensure_topics(extra["topics"])
            batches = [pb for b in seg.body.batches if isinstance(b, ProduceBatch | KafkaBatch)
                       and b.stream == self.config.source
                       for pb in (self._produce_form(b),) if len(pb)]
            for b in batches:
                admin.ensure_partition(self._target(b.topic), b.partition)
            # A segment carries only the group offsets that became ready (gate_group_offsets:
            # per partition), so merge partition by partition; a per-group update would drop
            # the partitions an earlier segment brought.
            for g, topics in extra.get("groups", {}).items():
                for t, parts in topics.items():
                    groups.setdefault(g, {}).setdefault(t, {}).update(parts)
            work.append((seg.body, batches))
        # cp holds `offsets`, which the transaction fills in with the target offsets
        cp = self._next_checkpoint(segments, offsets, groups)
        first, last = segments[0].seq, segments[-1].seq
        label = str(first) if first == last else f"{first}-{last}"
        try:
            self._transaction(label, work, offsets)
            self._commit(cp)
        except KafkaException as e:
            self._abort_or_raise(label, e)
        self._cp = cp

    def _produce_form(self, b: ProduceBatch | KafkaBatch) -> ProduceBatch:
        """A decoded batch as produce() arguments (segments opened here come so)."""
        return b if isinstance(b, ProduceBatch) else produce_batch(b, self._tail,
                                                                   SOURCE_OFFSET_HEADER)

    def _target(self, topic: str) -> str:
        return self.config.target_topic(topic, self.cluster)

    def _transaction(self, label: str, work: list[tuple[Body, list[ProduceBatch]]],
                     offsets: OffsetMap) -> None:
        p = self._producer
        assert p is not None
        p.begin_transaction()
        last: dict[tuple[str, int], int] = {}

        def delivered(err: KafkaError | None, msg: Any) -> None:
            if err is None:
                key = (msg.topic(), msg.partition())
                last[key] = max(last.get(key, -1), msg.offset())

        for _, batches in work:
            for b in batches:
                self._produce_batch(p, b, delivered)
        if p.flush(self.config.transaction_timeout_s) > 0:
            raise SinkError(f"{self.name}: segment {label}: records not delivered in time",
                            retriable=True)
        # In log order, so a partition's entry ends with the last segment that moved it;
        # `last` is that segment's final delivery, the newest for the partition.
        for body, batches in work:
            positions = body.manifest.positions.get(self.config.source, {})
            for b in batches:
                key = (self._target(b.topic), b.partition)
                if key not in last:
                    raise SinkError(f"{self.name}: segment {label}: no delivery report for "
                                    f"{key[0]}[{key[1]}]", retriable=True)
                src_next = positions.get(b.topic, {}).get(str(b.partition),
                                                          (b.last_offset or 0) + 1)
                offsets.setdefault(b.topic, {})[str(b.partition)] = [src_next, last[key] + 1]
            for topic, parts in positions.items():  # partitions that moved only over markers
                for part, src_next in parts.items():
                    entry = offsets.get(topic, {}).get(part)
                    if entry is not None and entry[0] < src_next:
                        entry[0] = src_next

    def _produce_batch(self, p: Producer, b: ProduceBatch, delivered: Any) -> None:
        topic, partition, produce = self._target(b.topic), b.partition, p.produce
        n, headers_col = len(b), cast(list[Any], b.headers)  # the stubs' header type is narrower
        # Only the last record asks for its delivery report; the loop is the hot path of a
        # restore: the arguments come decoded as they are passed, nothing per record here.
        for value, key, headers, ts in islice(zip(b.values, b.keys, headers_col, b.timestamps,
                                                  strict=True), n - 1):
            try:  # the common case without the retry wrapper's cost per record
                produce(topic, value, key, partition, headers=headers, timestamp=ts)
            except (BufferError, KafkaException):
                self._produce(p, topic, partition, key, value, headers, ts, None)
        self._produce(p, topic, partition, b.keys[-1], b.values[-1], headers_col[-1],
                      b.timestamps[-1], delivered)

    @staticmethod
    def _produce(p: Producer, topic: str, partition: int, key: bytes | None,
                 value: bytes | None, headers: list[Any], ts: int, cb: Any) -> None:
        deadline = time.monotonic() + ADMIN_TIMEOUT_S
        while True:
            try:
                if cb is None:
                    p.produce(topic, value, key, partition, headers=headers, timestamp=ts)
                else:
                    p.produce(topic, value, key, partition, headers=headers, timestamp=ts,
                              on_delivery=cb)
                return
            except BufferError:
                p.poll(0.05)
            except KafkaException as e:
                # Partitions just added (admin.py) are unknown to the producer's cached
                # metadata until it is refreshed: produce() fails at once without this.
                if e.args[0].code() != KafkaError._UNKNOWN_PARTITION or \
                        time.monotonic() >= deadline:
                    raise
                p.list_topics(topic, timeout=5)
                p.poll(0.05)

    def _next_checkpoint(self, segments: list[AppliedSegment], offsets: OffsetMap,
                         groups: dict[str, Any]) -> Checkpoint:
        newest = self._cp.max_record_ms
        for seg in segments:
            ts = seg.body.manifest.max_timestamp_ms
            if ts is not None:
                newest = ts if newest is None else max(newest, ts)
        last = segments[-1]
        return Checkpoint(seq=last.seq, digest=last.digest, created_at_ms=last.created_at_ms,
                          max_record_ms=newest, positions=last.body.manifest.positions,
                          offsets={"map": offsets, "groups": groups})

    def _commit(self, cp: Checkpoint) -> None:
        p = self._producer
        assert p is not None
        value = encode_checkpoint(cp)
        self._produce(p, self.config.checkpoint_topic, 0, self._ckpt_key, value, [], 0, None)
        p.commit_transaction(self.config.transaction_timeout_s)

    def _abort_or_raise(self, seq: str, e: KafkaException) -> None:
        err = e.args[0] if e.args else None
        p = self._producer
        if isinstance(err, KafkaError) and (err.fatal() or err.code() in (
                KafkaError._FENCED, KafkaError.PRODUCER_FENCED)):
            raise SinkFencedError(
                f"{self.name}: segment {seq}: fenced by another apply using transactional.id "
                f"{self.txn_id!r}; this apply stops") from e
        if p is not None:
            try:
                p.abort_transaction(self.config.transaction_timeout_s)
            except KafkaException as abort_err:
                raise SinkError(f"{self.name}: segment {seq}: abort failed: {abort_err}") from e
        raise SinkError(f"{self.name}: segment {seq}: transaction aborted: {e}",
                        retriable=True) from e

    # -- consumer-group offsets (groups.py) ---------------------------------------------

    async def sync_groups(self, force: bool = False) -> dict[str, Any]:
        if not self.config.sync_groups or self._groups is None:
            return {}
        groups = self._groups
        if force:
            groups.forget()
        result: dict[str, Any] = await self._call(groups.sync, self._cp.offsets)
        return result

    def translate(self, topic: str, partition: int, offset: int) -> int:
        """The standby offset a consumer of `topic` at primary `offset` resumes at."""
        assert self._groups is not None
        return int(self._groups.translate(self._cp.offsets, topic, partition, offset))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def close_sync() -> None:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            if self._producer is not None:
                self._producer.flush(5)
                self._producer = None

        await self._call(close_sync)
        self._executor.shutdown(wait=True)


def encode_checkpoint(cp: Checkpoint) -> bytes:
    return json.dumps({
        "v": 1, "seq": cp.seq, "digest": cp.digest.hex(), "created_at_ms": cp.created_at_ms,
        "max_record_ms": cp.max_record_ms, "positions": cp.positions, "offsets": cp.offsets,
    }, separators=(",", ":")).encode()


def decode_checkpoint(raw: bytes) -> Checkpoint:
    try:
        doc = json.loads(raw)
        return Checkpoint(seq=int(doc["seq"]), digest=bytes.fromhex(doc["digest"]),
                          created_at_ms=int(doc["created_at_ms"]),
                          max_record_ms=doc.get("max_record_ms"),
                          positions=doc.get("positions", {}), offsets=doc.get("offsets", {}))
    except (ValueError, KeyError, TypeError) as e:
        raise SinkError(f"unreadable checkpoint record: {e}") from e
