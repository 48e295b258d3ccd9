"""Read-side helpers for drills: per-partition record digests and scratch-topic clean-up."""

from __future__ import annotations

import contextlib
import hashlib
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from drstream.connectors.kafka.common import (
    ORIGIN_HEADER,
    SOURCE_OFFSET_HEADER,
    ClientSettings,
    client_config,
)
from drstream.daemon.codec import update_record_digest
from drstream.daemon.errors import SinkError

READ_TIMEOUT_S = 120.0
DRSTREAM_HEADERS = (ORIGIN_HEADER, SOURCE_OFFSET_HEADER)


def reachable(cluster: ClientSettings, timeout_s: float) -> None:
    """Raise SinkError naming the cluster unless it answers a metadata request."""
    admin = AdminClient(client_config(cluster))
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException as e:
        raise SinkError(f"cannot reach Kafka cluster {cluster.bootstrap_servers} within "
                        f"{timeout_s:g}s: {e.args[0] if e.args else e}", retriable=True) from e


def partition_digests(cluster: ClientSettings, topics: list[str]
                      ) -> dict[tuple[str, int], tuple[int, str]]:
    """(count, sha256) of every committed record per partition, drstream headers removed."""
    bootstrap = cluster.bootstrap_servers
    consumer = Consumer({**client_config(cluster), "group.id": "drstream-drill-reader",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "enable.partition.eof": False})
    try:
        md = consumer.list_topics(timeout=30)
        out = {}
        for topic in topics:
            meta = md.topics.get(topic)
            if meta is None or meta.error is not None:
                continue
            for p in meta.partitions:
                out[(topic, p)] = _digest(consumer, topic, p)
        return out
    except KafkaException as e:
        raise SinkError(f"drill: cannot read scratch topics on {bootstrap}: {e}") from e
    finally:
        consumer.close()


def _digest(consumer: Consumer, topic: str, p: int) -> tuple[int, str]:
    tp = TopicPartition(topic, p)
    _, high = consumer.get_watermark_offsets(tp, timeout=30)
    h, count = hashlib.sha256(), 0
    if high <= 0:
        return 0, h.hexdigest()
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)])
    deadline = time.monotonic() + READ_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.5):
                if m.error() is not None:
                    continue
                raw: list[tuple[str, bytes | None]] = m.headers() or []  # type: ignore[assignment]
                headers = [(k, v) for k, v in raw if k not in DRSTREAM_HEADERS]
                update_record_digest(h, m.timestamp()[1], m.key(), m.value(), headers)
                count += 1
            [pos] = consumer.position([tp])
            if pos.offset >= high:
                return count, h.hexdigest()
    finally:
        consumer.unassign()
    raise SinkError(f"drill: timed out reading {topic}[{p}] on the target")


def delete_topics(cluster: ClientSettings, topics: list[str]) -> None:
    if not topics:
        return
    admin = AdminClient(client_config(cluster))
    for fut in admin.delete_topics(topics).values():
        with contextlib.suppress(KafkaException):  # best effort: the report names them
            fut.result(60)
