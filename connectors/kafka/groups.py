"""Consumer-group failover for the Kafka sink: the group offsets the log carries,
translated to standby offsets and committed for groups with no active members there.

A consumer that fails over resumes at the first replicated record whose source offset
is at or past its primary offset (each applied record carries `drstream.offset`), so it
neither re-reads nor skips. Runs on the sink's client thread (librdkafka calls block).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from drstream.connectors.kafka.admin import ADMIN_TIMEOUT_S
from drstream.connectors.kafka.common import SOURCE_OFFSET_HEADER
from drstream.daemon.errors import SinkError
from drstream.daemon.logging import get_logger

log = get_logger("drstream.kafka.sink")

EMPTY_GROUP_STATES = {"EMPTY", "DEAD", "UNKNOWN"}


class GroupSync:
    def __init__(self, admin: AdminClient, sink: str, target: Callable[[str], str],
                 reader: Callable[[], Consumer]) -> None:
        self.admin = admin
        self.sink = sink  # names the sink in logs
        self.target = target  # source topic -> standby topic
        self.reader = reader  # a read_committed consumer on the standby
        self._committed: dict[str, Any] = {}  # group -> the offsets last committed

    def forget(self) -> None:
        """Commit every group again at the next sync (failover's final sync)."""
        self._committed.clear()

    def sync(self, offsets: dict[str, Any]) -> dict[str, Any]:
        """Commit the translated `offsets["groups"]` that changed, on empty groups; what
        was committed (group -> topic -> partition -> standby offset)."""
        committed: dict[str, Any] = {}
        for group, topics in offsets.get("groups", {}).items():
            if self._committed.get(group) == topics:
                continue
            if not self._group_is_empty(group):
                log.info("group_sync_skipped_active", sink=self.sink, group=group)
                continue
            tps = [TopicPartition(self.target(t), int(p),
                                  self.translate(offsets, t, int(p), int(o)))
                   for t, parts in topics.items() for p, o in parts.items()]
            req = [ConsumerGroupTopicPartitions(group, tps)]
            try:
                self.admin.alter_consumer_group_offsets(req)[group].result(ADMIN_TIMEOUT_S)
            except KafkaException as e:
                log.warning("group_sync_failed", sink=self.sink, group=group, error=str(e))
                continue
            self._committed[group] = topics
            committed[group] = {tp.topic: {} for tp in tps}
            for tp in tps:
                committed[group][tp.topic][str(tp.partition)] = tp.offset
        if committed:
            log.info("groups_synced", sink=self.sink, groups=sorted(committed))
        return committed

    def _group_is_empty(self, group: str) -> bool:
        try:
            desc = self.admin.describe_consumer_groups([group])[group].result(ADMIN_TIMEOUT_S)
        except KafkaException:
            return True  # unknown group: nothing active
        state = getattr(desc.state, "name", str(desc.state)).upper()
        return state in EMPTY_GROUP_STATES or not desc.members

    def translate(self, offsets: dict[str, Any], topic: str, partition: int, offset: int) -> int:
        """Target offset at which a consumer resumes to read exactly what it would have
        read next on the primary: the first replicated record with source offset >= offset.
        `offsets["map"]` is the checkpoint's source -> standby next-offset map."""
        entry = offsets.get("map", {}).get(topic, {}).get(str(partition))
        if entry is None:
            return 0
        src_next, tgt_next = entry
        if offset >= src_next:
            return int(tgt_next)
        return self._search(self.target(topic), partition, offset, int(tgt_next))

    def _search(self, topic: str, partition: int, offset: int, hi: int) -> int:
        consumer = self.reader()
        low, _ = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                timeout=ADMIN_TIMEOUT_S)
        lo = int(low)
        try:
            while lo < hi:
                mid = (lo + hi) // 2
                found = _record_at(consumer, topic, partition, mid, hi)
                if found is None or found[1] >= offset:
                    hi = mid
                else:
                    lo = found[0] + 1
        finally:
            consumer.unassign()
        return lo


def _record_at(consumer: Consumer, topic: str, partition: int, at: int,
               hi: int) -> tuple[int, int] | None:
    """(target offset, source offset) of the first record at or after `at`, below hi."""
    consumer.assign([TopicPartition(topic, partition, at)])
    deadline = time.monotonic() + ADMIN_TIMEOUT_S
    while time.monotonic() < deadline:
        for m in consumer.consume(1, 1.0):
            if m.error() is not None:
                continue
            found = int(m.offset() or 0)
            if found >= hi:
                return None
            for name, value in m.headers() or []:  # type: ignore[str-unpack]
                if name == SOURCE_OFFSET_HEADER and value is not None:
                    return found, int(value)
            return found, -1  # not replicated by us: written on the standby
    raise SinkError(f"offset translation: no record readable at {topic}[{partition}]@{at}")
