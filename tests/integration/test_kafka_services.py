"""The test Kafka clusters behave like real, independent Kafka: produce/consume, transactions
with read_committed isolation, and data that survives a broker restart."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from tests.infra.kafka import KafkaCluster, require_tool
from tests.infra.procs import ServiceStartError, pid_alive

pytestmark = pytest.mark.integration


def create_topic(cluster: KafkaCluster, topic: str, partitions: int = 1) -> None:
    admin = cluster.admin()  # must outlive the future: a destroyed client fails it
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(timeout=30)


def topics(cluster: KafkaCluster) -> set[str]:
    return set(cluster.admin().list_topics(timeout=10).topics)


def produce(cluster: KafkaCluster, topic: str, values: list[str]) -> None:
    producer = Producer({"bootstrap.servers": cluster.bootstrap_servers, "acks": "all"})
    for value in values:
        producer.produce(topic, value.encode())
    assert producer.flush(30) == 0, "records still unsent after 30s"


def consume_all(cluster: KafkaCluster, topic: str, isolation: str = "read_committed",
                timeout: float = 30.0) -> list[str]:
    """Every record of partition 0 from the beginning up to the end (as `isolation` sees it).

    Partition assignment instead of a subscription: no group rebalance to wait for."""
    consumer = Consumer({
        "bootstrap.servers": cluster.bootstrap_servers,
        "group.id": f"check-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "isolation.level": isolation,
    })
    values: list[str] = []
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    return values
                raise AssertionError(f"consume error: {msg.error()}")
            values.append(msg.value().decode())
        raise AssertionError(f"no end of partition after {timeout}s; got {values}")
    finally:
        consumer.close()


def test_primary_and_standby_are_independent_clusters(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, kafka_topic_name: str
) -> None:
    on_primary, on_standby = f"{kafka_topic_name}-p", f"{kafka_topic_name}-s"
    create_topic(primary_kafka, on_primary)
    create_topic(standby_kafka, on_standby)
    produce(primary_kafka, on_primary, ["p0", "p1", "p2"])
    produce(standby_kafka, on_standby, ["s0", "s1"])

    assert consume_all(primary_kafka, on_primary) == ["p0", "p1", "p2"]
    assert consume_all(standby_kafka, on_standby) == ["s0", "s1"]
    assert on_primary not in topics(standby_kafka)
    assert on_standby not in topics(primary_kafka)
    primary_id = primary_kafka.admin().list_topics(timeout=10).cluster_id
    assert primary_id != standby_kafka.admin().list_topics(timeout=10).cluster_id
    assert primary_kafka.bootstrap_servers != standby_kafka.bootstrap_servers


def test_read_committed_skips_aborted_transaction(
    primary_kafka: KafkaCluster, kafka_topic_name: str
) -> None:
    create_topic(primary_kafka, kafka_topic_name)
    producer = Producer({
        "bootstrap.servers": primary_kafka.bootstrap_servers,
        "transactional.id": f"tx-{kafka_topic_name}",
    })
    producer.init_transactions(30)

    producer.begin_transaction()
    for value in ("c0", "c1", "c2"):
        producer.produce(kafka_topic_name, value.encode())
    producer.commit_transaction(30)

    producer.begin_transaction()
    for value in ("a0", "a1"):
        producer.produce(kafka_topic_name, value.encode())
    # Without the flush, abort would purge the records before they reach the broker and
    # read_uncommitted could not show them.
    assert producer.flush(30) == 0
    producer.abort_transaction(30)

    producer.begin_transaction()
    producer.produce(kafka_topic_name, b"c3")
    producer.commit_transaction(30)

    assert consume_all(primary_kafka, kafka_topic_name, "read_committed") == [
        "c0", "c1", "c2", "c3"]
    # The aborted records are really in the log: read_committed is what hides them.
    assert consume_all(primary_kafka, kafka_topic_name, "read_uncommitted") == [
        "c0", "c1", "c2", "a0", "a1", "c3"]


def test_restart_keeps_data_address_and_serves_again(
    primary_kafka: KafkaCluster, kafka_topic_name: str
) -> None:
    create_topic(primary_kafka, kafka_topic_name)
    produce(primary_kafka, kafka_topic_name, ["r0", "r1"])
    address, old_pid = primary_kafka.bootstrap_servers, primary_kafka.pid

    primary_kafka.restart()  # clean shutdown
    assert (primary_kafka.bootstrap_servers, primary_kafka.workdir.is_dir()) == (address, True)
    assert primary_kafka.pid != old_pid and old_pid is not None and not pid_alive(old_pid)
    assert consume_all(primary_kafka, kafka_topic_name) == ["r0", "r1"]

    produce(primary_kafka, kafka_topic_name, ["r2"])
    primary_kafka.restart(hard=True)  # kill -9, log recovery on start
    assert primary_kafka.bootstrap_servers == address
    assert consume_all(primary_kafka, kafka_topic_name) == ["r0", "r1", "r2"]
    produce(primary_kafka, kafka_topic_name, ["r3"])
    assert consume_all(primary_kafka, kafka_topic_name) == ["r0", "r1", "r2", "r3"]


def test_missing_tools_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(ServiceStartError, match="`java` not found"):
        require_tool("java")
    with pytest.raises(ServiceStartError, match="`mvn` not found"):
        require_tool("mvn")
