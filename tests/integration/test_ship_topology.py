"""Topology changes while `drstream ship` runs, and the topic metadata the log carries.

- a topic created after the start that matches the include regex is shipped;
- a partition added to a shipped topic is shipped from its beginning;
- topics matching an exclude regex (or no include regex) are not shipped at all;
- the first segment's manifest names every shipped topic with its partition count and its
  own configs, and a later segment carries the new partition count.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.kafka import KafkaCluster
from tests.integration.shiplib import (
    STREAM,
    DeliveryCheck,
    Segment,
    ShipperPool,
    add_partitions,
    compare_records,
    create_topic,
    flush,
    next_offsets,
    producer,
    read_primary,
    read_segments,
    records_of,
    shipper_pool,
    verify_deep,
    wait_log_reaches,
    write_config,
)

pytestmark = pytest.mark.integration

RETENTION_MS = "123456789"


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ShipperPool]:
    with shipper_pool(tmp_path) as p:
        yield p


def produce(bootstrap: str, topic: str, partitions: range, count: int, tag: str) -> None:
    check = DeliveryCheck()
    p = producer(bootstrap)
    for i in range(count):
        for part in partitions:
            p.produce(topic, f"{tag}-{part}-{i}".encode(), f"k{i}".encode(), partition=part,
                      on_delivery=check)
    flush(p)
    check.check()


def topic_meta(seg: Segment) -> dict[str, Any]:
    meta: dict[str, Any] = seg.manifest.extra.get(STREAM, {}).get("topics", {})
    return meta


def test_new_topics_and_partitions_are_shipped_and_excluded_ones_are_not(
    primary_kafka: KafkaCluster, kafka_topic_name: str, tmp_path: Path, pool: ShipperPool,
) -> None:
    bootstrap = primary_kafka.bootstrap_servers
    base = kafka_topic_name
    grows = f"{base}.grows"  # replicated from the start, later gets more partitions
    late = f"{base}.late"  # created after the shipper started
    skipped = f"{base}.skip-me"  # matches include and exclude
    skipped_late = f"{base}.skip-late"
    unrelated = f"{base}-unrelated"  # matches no include regex
    create_topic(bootstrap, grows, 2, {"cleanup.policy": "compact", "retention.ms": RETENTION_MS})
    create_topic(bootstrap, skipped, 1)
    create_topic(bootstrap, unrelated, 1)
    produce(bootstrap, grows, range(2), 20, "before")
    produce(bootstrap, skipped, range(1), 5, "skip")
    produce(bootstrap, unrelated, range(1), 5, "unrelated")

    setup = write_config(
        tmp_path, store={"type": "file", "path": str(tmp_path / "store")}, bootstrap=bootstrap,
        include=[re.escape(base) + r"\..*"], exclude=[re.escape(base) + r"\.skip.*"],
        log_id="topology", source={"discovery_interval_s": 1},
    )
    shipper = pool.start(setup)
    shipper.wait_ready()

    create_topic(bootstrap, late, 3, {"retention.ms": RETENTION_MS})
    create_topic(bootstrap, skipped_late, 1)
    produce(bootstrap, late, range(3), 10, "late")
    produce(bootstrap, skipped_late, range(1), 5, "skip")
    produce(bootstrap, grows, range(2), 10, "during")
    wait_log_reaches(setup, next_offsets(read_primary(bootstrap, [grows, late])), timeout=60,
                     shipper=shipper)

    add_partitions(bootstrap, grows, 4)
    produce(bootstrap, grows, range(4), 10, "grown")

    primary = read_primary(bootstrap, [grows, late])
    assert len(primary) == 7 and all(primary.values())
    wait_log_reaches(setup, next_offsets(primary), timeout=60, shipper=shipper)
    shipper.stop_ok()

    segments = read_segments(setup.store, setup.log_id, setup.keyring)
    log = records_of(segments)
    compare_records(log, primary)
    assert {t for t, _ in log} == {grows, late}

    head = segments[-1].manifest.positions[STREAM]
    for name in (skipped, skipped_late, unrelated):
        assert name not in head, f"{name} has a position in the log"
        assert all(name not in topic_meta(s) for s in segments), f"{name} has log metadata"

    # The first segment describes the topics that existed at the start.
    first = topic_meta(segments[0])
    assert set(first) == {grows}, f"first segment metadata: {first}"
    assert first[grows]["partitions"] == 2
    configs = first[grows]["configs"]
    assert configs.get("cleanup.policy") == "compact", configs
    assert configs.get("retention.ms") == RETENTION_MS, configs
    # Only the topic's own settings, not the broker defaults.
    assert "segment.bytes" not in configs and "max.message.bytes" not in configs, configs

    # Later segments carry the new topic and then the partition growth.
    late_meta = [topic_meta(s)[late] for s in segments if late in topic_meta(s)]
    assert late_meta, "no segment carries the metadata of the topic created later"
    assert late_meta[0]["partitions"] == 3
    assert late_meta[0]["configs"].get("retention.ms") == RETENTION_MS
    grown = [s.seq for s in segments if topic_meta(s).get(grows, {}).get("partitions") == 4]
    assert grown, "no segment carries the new partition count of the grown topic"
    assert grown[0] > segments[0].seq
    assert topic_meta(segments[grown[0]-1])[grows]["configs"].get("cleanup.policy") == "compact"
    # The new partitions were shipped from their beginning.
    for p in (2, 3):
        assert log[(grows, p)][0].offset == 0
    verify_deep(setup)
