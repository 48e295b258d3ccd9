"""`drstream bench` on Kafka: stamped records into a topic of the bench's own on the
primary (the source's cluster), through the user's running ship and apply, read back on
the standby (the sink's cluster) under the sink's topic name.

Each record carries the headers `bench.id` (its number) and `bench.ts` (its produce
time, wall clock ns), as the lag benchmark under benchmarks/lag stamps them, so either
reader can time the other's records. Record i goes to partition i % partitions.
"""

from __future__ import annotations

import array
import os
import threading
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as TP
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from drstream.connectors.kafka.common import client_config
from drstream.connectors.kafka.config import KafkaSinkConfig, KafkaSourceConfig
from drstream.daemon.errors import ConfigFieldError, DrstreamError
from drstream.daemon.logging import get_logger
from drstream.daemon.plugins import BenchSpec, ConnectorConfig

log = get_logger("drstream.bench")

ID_HEADER = "bench.id"
TS_HEADER = "bench.ts"
ADMIN_TIMEOUT_S = 30.0
PAYLOAD_POOL_BYTES = 1 << 20  # random bytes the values are cut from: compress like data
# Idempotent, acks=all: per partition records land in produce order, exactly once.
PRODUCER_CONF = {"acks": "all", "enable.idempotence": True, "linger.ms": 5,
                 "compression.type": "none"}


class KafkaBench:
    def __init__(self, source: ConnectorConfig, sink: ConnectorConfig, spec: BenchSpec) -> None:
        if not isinstance(source, KafkaSourceConfig) or not isinstance(sink, KafkaSinkConfig):
            raise ConfigFieldError("--stream", getattr(source, "stream", None),
                                   "bench needs a Kafka source and a Kafka sink applying it")
        self.source, self.sink, self.spec = source, sink, spec
        self.stream = source.stream
        self.topic = spec.name or f"drstream-bench-{time.strftime('%Y%m%d%H%M%S')}-" \
            f"{os.urandom(2).hex()}"
        if not source.topics.matches(self.topic) or self.topic.startswith("drstream."):
            raise ConfigFieldError("--topic", self.topic, f"the source {source.stream} does "
                                   "not select it (its topics.include/exclude): ship would "
                                   "never read it; name one it selects")
        self.standby_topic = sink.target_topic(self.topic, sink.source.split(":", 1)[-1])
        self.target = (f"topic {self.topic} on {source.bootstrap_servers} -> topic "
                       f"{self.standby_topic} on {sink.bootstrap_servers}")
        self._produced = array.array("q")
        self._arrival = array.array("q")
        self._delivered: dict[int, list[tuple[int, int]]] = {}  # partition -> (offset, id)
        self._covered_upto: dict[int, int] = {}  # partition -> entries of _delivered covered
        self._window: list[float] = []
        self._counts = {"sent": 0, "acked": 0, "failed": 0, "arrived": 0, "duplicates": 0,
                        "unknown": 0}
        self._created: list[str] = []
        self._payload = os.urandom(PAYLOAD_POOL_BYTES)

    # -- the topics ---------------------------------------------------------------------

    def prepare(self, timeout_s: float) -> None:
        primary = AdminClient(client_config(self.source))
        fut = primary.create_topics([NewTopic(self.topic, self.spec.partitions)])[self.topic]
        try:
            fut.result(ADMIN_TIMEOUT_S)
        except KafkaException as e:
            if e.args and e.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                raise ConfigFieldError("--topic", self.topic, "exists on the primary: bench "
                                       "writes to a topic of its own") from None
            raise DrstreamError(f"bench: cannot create topic {self.topic} on "
                                f"{self.source.bootstrap_servers}: {e}") from e
        self._created.append(self.topic)
        log.info("bench_topic_created", topic=self.topic, partitions=self.spec.partitions)
        standby = AdminClient(client_config(self.sink))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._partitions_on(standby) >= self.spec.partitions:
                return
            time.sleep(0.2)
        raise DrstreamError(
            f"bench: topic {self.standby_topic} did not appear on the standby "
            f"{self.sink.bootstrap_servers} within {timeout_s:g}s: are ship and apply running "
            f"with this config (ship finds new topics every discovery_interval_s)?")

    def _partitions_on(self, admin: AdminClient) -> int:
        try:
            md = admin.list_topics(self.standby_topic, timeout=5)
        except KafkaException:
            return 0
        t = md.topics.get(self.standby_topic)
        return 0 if t is None or t.error is not None else len(t.partitions)

    def remove(self) -> list[str]:
        """The bench topic on the primary, then its copy on the standby; never a topic
        that was there before the bench."""
        if not self._created:
            return []
        removed = []
        for settings, topic in ((self.source, self.topic), (self.sink, self.standby_topic)):
            admin = AdminClient(client_config(settings))
            try:
                admin.delete_topics([topic])[topic].result(ADMIN_TIMEOUT_S)
                removed.append(f"{topic} on {settings.bootstrap_servers}")
            except KafkaException as e:
                log.warning("bench_topic_not_removed", topic=topic,
                            cluster=settings.bootstrap_servers, error=str(e))
        return removed

    # -- the load -----------------------------------------------------------------------

    def produce(self, spec: BenchSpec, stop: threading.Event) -> None:
        p = Producer({**client_config(self.source), **PRODUCER_CONF})
        parts, size = spec.partitions, spec.record_bytes
        started = time.monotonic()
        sent = 0
        while not stop.is_set():
            elapsed = time.monotonic() - started
            if elapsed >= spec.seconds:
                break
            due = min(int(elapsed * spec.rate) + 1, int(spec.seconds * spec.rate))
            while sent < due:
                self._send(p, sent, sent % parts, size)
                sent += 1
            p.poll(0)
            # sleep to the next record at low rates, 1 ms at high ones
            time.sleep(min(0.05, max(0.001, 1 / spec.rate)))
        if p.flush(ADMIN_TIMEOUT_S) > 0:
            log.warning("bench_records_undelivered", count=len(p))

    def _send(self, p: Producer, i: int, partition: int, size: int) -> None:
        now = time.time_ns()
        start = (i * 7919) % (len(self._payload) - size) if size < len(self._payload) else 0
        headers: list[tuple[str, str | bytes | None]] = [(ID_HEADER, b"%d" % i),
                                                         (TS_HEADER, b"%d" % now)]
        self._produced.append(now)
        self._counts["sent"] += 1

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                self._counts["failed"] += 1
                self._produced[i] = 0
                return
            self._counts["acked"] += 1
            self._delivered.setdefault(msg.partition(), []).append((msg.offset(), i))

        while True:
            try:
                p.produce(self.topic, self._payload[start:start + size], b"%d" % i,
                          partition=partition, headers=headers, on_delivery=delivered)
                return
            except BufferError:
                p.poll(0.02)

    def read(self, stop: threading.Event) -> None:
        c = Consumer({**client_config(self.sink), "group.id": f"drstream-bench-{self.topic}",
                      "enable.auto.commit": False, "isolation.level": "read_committed",
                      "enable.partition.eof": False, "fetch.wait.max.ms": 20})
        try:
            c.assign([TP(self.standby_topic, p, OFFSET_BEGINNING)
                      for p in range(self.spec.partitions)])
            while not stop.is_set():
                for m in c.consume(2000, 0.05):
                    if m.error() is None:
                        self._arrived(time.time_ns(), m.headers())
        finally:
            c.close()

    def _arrived(self, now: int, headers: Any) -> None:
        i = stamp = -1
        for k, v in headers or ():
            if k == ID_HEADER:
                i = int(v)
            elif k == TS_HEADER:
                stamp = int(v)
        if i < 0 or i >= len(self._produced) or self._produced[i] != stamp:
            self._counts["unknown"] += 1
            return
        if i >= len(self._arrival):
            self._arrival.extend(array.array("q", [0]) * (i + 1 - len(self._arrival) + 4096))
        if self._arrival[i]:
            self._counts["duplicates"] += 1
            return
        self._arrival[i] = now
        self._counts["arrived"] += 1
        self._window.append((now - stamp) / 1e6)

    # -- what the core reads --------------------------------------------------------------

    def produced_ns(self) -> array.array[int]:
        return self._produced

    def arrival_ns(self) -> array.array[int]:
        return self._arrival

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def take_window(self) -> list[float]:
        window, self._window = self._window, []
        return window

    def covered(self, positions: Any) -> list[int]:
        nexts = positions.get(self.topic, {}) if isinstance(positions, dict) else {}
        out = []
        for part, entries in list(self._delivered.items()):
            upto = self._covered_upto.get(part, 0)
            nxt = int(nexts.get(str(part), 0))
            while upto < len(entries) and entries[upto][0] < nxt:
                out.append(entries[upto][1])
                upto += 1
            self._covered_upto[part] = upto
        return out


def kafka_bench(source: ConnectorConfig, sink: ConnectorConfig, spec: BenchSpec) -> KafkaBench:
    return KafkaBench(source, sink, spec)
