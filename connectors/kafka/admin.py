"""Topic administration on the standby cluster for the Kafka sink: the same topic names
(or templated), partition counts and topic configs as the primary, and the compacted
checkpoint topic. Runs on the sink's client thread (librdkafka calls block)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

from drstream.daemon.errors import SinkError
from drstream.daemon.logging import get_logger

log = get_logger("drstream.kafka.sink")

ADMIN_TIMEOUT_S = 30.0
CHECKPOINT_TOPIC_CONFIGS = {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"}
DYNAMIC_TOPIC_CONFIG = 1  # ConfigSource: set on the topic itself


class TopicAdmin:
    """What the standby has: partition counts seen or made, configs applied."""

    def __init__(self, admin: AdminClient, sink: str, replication_factor: int,
                 target: Callable[[str], str]) -> None:
        self.admin = admin
        self.sink = sink  # names the sink in errors and logs
        self.replication_factor = replication_factor
        self.target = target  # source topic -> standby topic
        self.partitions: dict[str, int] = {}  # standby topic -> known partition count
        self._configs_applied: dict[str, dict[str, str]] = {}

    def refresh(self, timeout_s: float) -> None:
        md = self.admin.list_topics(timeout=timeout_s)
        self.partitions = {n: len(t.partitions) for n, t in md.topics.items() if t.error is None}

    def ensure_checkpoint_topic(self, topic: str) -> None:
        if topic not in self.partitions:
            self.create([NewTopic(topic, 1, self.replication_factor,
                                  config=CHECKPOINT_TOPIC_CONFIGS)])

    def _wait(self, futures: dict[Any, Any], tolerated: int, what: Callable[[Any], str]) -> None:
        """Wait for each admin future; `tolerated` is the error code that means done."""
        for name, fut in futures.items():
            try:
                fut.result(ADMIN_TIMEOUT_S)
            except KafkaException as e:
                if e.args[0].code() != tolerated:
                    raise SinkError(f"{self.sink}: cannot {what(name)}: {e}") from e

    def create(self, topics: list[Any]) -> None:
        self._wait(self.admin.create_topics(topics), KafkaError.TOPIC_ALREADY_EXISTS,
                   lambda name: f"create topic {name!r}")
        for t in topics:
            self.partitions[t.topic] = t.num_partitions

    def ensure_topics(self, topics: dict[str, Any]) -> None:
        """The primary's topic metadata (a manifest's `extra.topics`) on the standby."""
        create, grow = [], []
        for src, meta in topics.items():
            name, count = self.target(src), int(meta.get("partitions", 1))
            configs = {k: str(v) for k, v in meta.get("configs", {}).items()}
            have = self.partitions.get(name)
            if have is None:
                create.append(NewTopic(name, count, self.replication_factor, config=configs))
                self._configs_applied[name] = configs
            elif have < count:
                grow.append(NewPartitions(name, count))
            if have is not None and self._configs_applied.get(name) != configs:
                self._alter_configs(name, configs)
        if create:
            self.create(create)
            log.info("topics_created", sink=self.sink, topics=[t.topic for t in create])
        if grow:
            self.grow(grow)

    def grow(self, grow: list[Any]) -> None:
        self._wait(self.admin.create_partitions(grow), KafkaError.INVALID_PARTITIONS,
                   lambda name: f"add partitions to {name}")
        for g in grow:
            self.partitions[g.topic] = g.new_total_count
        log.info("partitions_added", sink=self.sink, topics=[g.topic for g in grow])

    def _alter_configs(self, name: str, configs: dict[str, str]) -> None:
        """Make the standby topic's own configs equal the primary's: set what differs and
        delete overrides the primary no longer has (the standby is a mirror)."""
        current = self._topic_overrides(name)
        entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                   for k, v in configs.items() if current.get(k) != v]
        entries += [ConfigEntry(k, None, incremental_operation=AlterConfigOpType.DELETE)
                    for k in current if k not in configs]
        if entries:
            res = ConfigResource(ConfigResource.Type.TOPIC, name, incremental_configs=entries)
            self._wait(self.admin.incremental_alter_configs([res]), KafkaError.NO_ERROR,
                       lambda _: f"set configs of {name}")
        self._configs_applied[name] = configs

    def _topic_overrides(self, name: str) -> dict[str, str]:
        res = ConfigResource(ConfigResource.Type.TOPIC, name)
        try:
            entries = self.admin.describe_configs([res])[res].result(ADMIN_TIMEOUT_S)
        except KafkaException as e:
            raise SinkError(f"{self.sink}: cannot read configs of {name}: {e}") from e
        return {k: e.value for k, e in entries.items()
                if e.source == DYNAMIC_TOPIC_CONFIG and e.value is not None}

    def ensure_partition(self, topic: str, partition: int) -> None:
        """A batch for a partition the standby lacks (no metadata seen): create/grow."""
        have = self.partitions.get(topic)
        if have is None:
            self.create([NewTopic(topic, partition + 1, self.replication_factor)])
        elif partition >= have:
            self.grow([NewPartitions(topic, partition + 1)])
