"""`drstream apply` reproduces the primary's committed records on the standby, exactly.

Real primary and standby Kafka clusters, real stores (file and the S3 API server), the
real `drstream ship` and `drstream apply` processes. Every committed record of the
primary must be on the standby exactly once, in partition order, with byte-identical
key, value, headers (once the drstream.* headers the sink adds are removed) and
CreateTime timestamp, its drstream.offset header naming its primary offset; aborted
transactions never appear; tombstones do. Topics are created on the standby with the
primary's partition counts and own configs, and follow partition growth and config
changes made while running. A topic template maps names.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.kafka import KafkaCluster
from tests.integration.applylib import (
    CHECKPOINT_TOPIC,
    ProcessPool,
    Records,
    as_source,
    checkpoint_watch,
    compare_replica,
    count,
    create_topics,
    delete_topic_config,
    log_head_seq,
    next_offsets,
    own_topic_configs,
    process_pool,
    read_topics,
    set_topic_config,
    topic_exists,
    topic_partitions,
    unique,
    wait_log_has,
    write_dr_config,
)
from tests.integration.shiplib import DeliveryCheck, add_partitions, flush, producer, store_fields
from tests.support.procs import wait_for

pytestmark = pytest.mark.integration

# Explicit CreateTime timestamps, an hour old: older ones (beyond retention.ms, 7 days by
# default) make the brokers delete whole segments at their first retention check.
BASE_TS = (int(time.time()) - 3600) * 1000
# A compacted topic whose cleaner stays away during the test: the records carry old
# CreateTime timestamps, so the standby's first commit marker rolls the segment and the
# cleaner would otherwise compact the replica before it is compared.
NO_COMPACTION = {"cleanup.policy": "compact", "min.compaction.lag.ms": "3600000"}
HEADERS: list[tuple[str, bytes | None]] = [
    ("h", b"1"), ("h", b"2"), ("none", None), ("h", b"1"), ("e", b"")]


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    return store_fields(request.param, request, tmp_path)


def produce_round(bootstrap: str, multi: str, multi_parts: int, compact: str, txn: str,
                  round_: int) -> None:
    """Records of every shape: keyed and null-keyed, tombstones, empty and binary values,
    duplicate and None-valued headers, explicit and producer-clock timestamps, and
    transactions, committed and aborted, interleaved with plain records."""
    check = DeliveryCheck()
    p = producer(bootstrap, **{"enable.idempotence": True})
    r = f"r{round_}"
    for i in range(80):
        key: bytes | None = None if i % 3 == 0 else f"{r}-key-{i % 10}".encode()
        value: bytes | None = f"{r}-value-{i}".encode() * (1 + i % 4)
        headers = HEADERS if i % 4 == 1 else None
        if i % 5 == 0:
            value = None  # tombstone, keyed or not
        if i == 7:
            key, value = b"", b""  # empty is not None
        if i == 8:
            value = bytes(range(256))
        p.produce(multi, value, key, partition=i % multi_parts, headers=headers,
                  timestamp=BASE_TS + round_ * 10_000 + i, on_delivery=check)
    for i in range(multi_parts):  # producer clock
        p.produce(multi, f"{r}-now-{i}".encode(), partition=i, on_delivery=check)
    for i in range(40):
        value = None if i % 7 == 3 else f"{r}-compact-{i}".encode()
        p.produce(compact, value, f"ck-{i % 6}".encode(), partition=i % 2,
                  headers=[("dup", b"a"), ("dup", None)] if i % 3 == 0 else None,
                  timestamp=BASE_TS + round_ * 10_000 + 100 + i, on_delivery=check)
    for i in range(12):
        p.produce(txn, f"{r}-plain-before-{i}".encode(), partition=i % 3, on_delivery=check)
    flush(p)
    tx = producer(bootstrap, **{"transactional.id": unique("e2e-txn")})
    tx.init_transactions(60)
    for n, outcome in enumerate(["commit", "abort", "commit", "abort"]):
        tx.begin_transaction()
        for i in range(9):
            word = "aborted" if outcome == "abort" else "txn"
            tx.produce(txn, f"{word}-{r}-{n}-{i}".encode(), f"t{i}".encode(), partition=i % 3,
                       headers=[("txn", str(n).encode())], on_delivery=check)
            if i % 3 == 0:
                tx.produce(multi, f"{word}-{r}-{n}-m{i}".encode(), partition=i % multi_parts,
                           timestamp=BASE_TS + round_ * 10_000 + 200 + i, on_delivery=check)
        if outcome == "abort":
            flush(tx)  # the aborted records really are in the partition logs
            tx.abort_transaction(60)
        else:
            tx.commit_transaction(60)
        for i in range(3):
            p.produce(txn, f"{r}-plain-after-{n}-{i}".encode(), partition=i, on_delivery=check)
    flush(p)
    check.check()


def no_aborted(records: Records) -> None:
    found = [(tp, r.offset, r.value) for tp, recs in records.items() for r in recs
             if r.value is not None and r.value.startswith(b"aborted-")]
    assert not found, f"{len(found)} records of aborted transactions on the standby: {found[:5]}"


@pytest.mark.parametrize("store", ["file", "s3", "gcs", "azure"], indirect=True)
def test_apply_reproduces_committed_records_topics_and_configs(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, kafka_topic_name: str,
    tmp_path: Path, pool: ProcessPool, store: dict[str, Any],
) -> None:
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    base = kafka_topic_name
    multi, compact, txn = f"{base}.multi", f"{base}.compact", f"{base}.txn"
    topics = {multi: 4, compact: 2, txn: 3}
    create_topics(primary, topics, {
        multi: {"retention.ms": "86400000", "max.message.bytes": "2000000"},
        compact: NO_COMPACTION,
    })
    produce_round(primary, multi, 4, compact, txn, 0)
    setup = write_dr_config(tmp_path, store=store, source_bootstrap=primary,
                            sink_bootstrap=standby, include=[re.escape(base) + r"\..*"],
                            log_id=unique("e2e"))
    with checkpoint_watch(standby) as watch:
        ship, apply = pool.ship(setup), pool.apply(setup)
        procs = [ship, apply]
        source = read_topics(primary, topics)
        watch.wait_applied(setup, next_offsets(source), procs=procs)
        assert topic_partitions(standby, multi) == 4

        # While running: a new partition, a changed config, more records (also in it).
        add_partitions(primary, multi, 5)
        set_topic_config(primary, multi, {"retention.ms": "43200000"})
        set_topic_config(primary, txn, {"retention.bytes": "1073741824"})
        produce_round(primary, multi, 5, compact, txn, 1)
        source = read_topics(primary, topics)
        assert source[(multi, 4)], "no records in the partition added while running"
        watch.wait_applied(setup, next_offsets(source), procs=procs)
        wait_for(lambda: all(own_topic_configs(standby, t) == own_topic_configs(primary, t)
                             for t in topics), 30, "standby topic configs to follow", procs)
        ship.stop_ok()
        apply.stop_ok()

    replica = read_topics(standby, topics)
    no_aborted(replica)
    compare_replica(as_source(replica, origin="primary"), source,
                    what=f"standby vs primary ({store['type']} store)")
    tombstones = sum(1 for recs in replica.values() for r in recs if r.value is None)
    assert tombstones >= 20, f"only {tombstones} tombstones on the standby"
    for t in topics:
        assert topic_partitions(standby, t) == topic_partitions(primary, t), t
        want = own_topic_configs(primary, t)
        assert own_topic_configs(standby, t) == want, f"configs of {t} differ"
    assert own_topic_configs(standby, compact)["cleanup.policy"] == "compact"
    assert own_topic_configs(standby, multi)["retention.ms"] == "43200000"
    print(f"{count(replica)} records replicated over {len(replica)} partitions")


def test_topic_template_maps_names(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, kafka_topic_name: str,
    tmp_path: Path, pool: ProcessPool,
) -> None:
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    base = kafka_topic_name
    multi, compact, txn = f"{base}.multi", f"{base}.compact", f"{base}.txn"
    topics = {multi: 3, compact: 2, txn: 3}
    create_topics(primary, topics, {multi: {"retention.ms": "7200000"}, compact: NO_COMPACTION})
    produce_round(primary, multi, 3, compact, txn, 0)
    setup = write_dr_config(tmp_path, store={"type": "file", "path": str(tmp_path / "store")},
                            source_bootstrap=primary, sink_bootstrap=standby,
                            include=[re.escape(base) + r"\..*"], log_id=unique("template"),
                            sink={"topic_template": "{cluster}.{topic}"})
    mapped = {t: f"primary.{t}" for t in topics}
    with checkpoint_watch(standby) as watch:
        ship, apply = pool.ship(setup), pool.apply(setup)
        source = read_topics(primary, topics)
        watch.wait_applied(setup, next_offsets(source), procs=[ship, apply])
        ship.stop_ok()
        apply.stop_ok()

    replica = read_topics(standby, mapped.values())
    no_aborted(replica)
    compare_replica(as_source(replica, origin="primary",
                              topic_map={v: k for k, v in mapped.items()}),
                    source, what="standby (templated names) vs primary")
    for src, target in mapped.items():
        assert topic_partitions(standby, target) == topics[src], target
        assert own_topic_configs(standby, target) == own_topic_configs(primary, src), target
        assert not topic_exists(standby, src), f"{src} was created on the standby untemplated"


def test_config_removed_on_primary_is_removed_on_standby(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, kafka_topic_name: str,
    tmp_path: Path, pool: ProcessPool,
) -> None:
    """Config changes follow (DESIGN 4), removals too: an override deleted on the primary
    (back to the broker default) must not stay on the standby."""
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    topic = f"{kafka_topic_name}.cfg"
    create_topics(primary, {topic: 2}, {topic: {"retention.ms": "7200000",
                                                "max.message.bytes": "2000000"}})
    setup = write_dr_config(tmp_path, store={"type": "file", "path": str(tmp_path / "store")},
                            source_bootstrap=primary, sink_bootstrap=standby,
                            include=[re.escape(topic)], log_id=unique("config"))
    ship, apply = pool.ship(setup), pool.apply(setup)
    procs = [ship, apply]
    wait_for(lambda: topic_exists(standby, topic)
             and own_topic_configs(standby, topic) == own_topic_configs(primary, topic),
             60, "the standby topic with the primary's configs", procs)
    delete_topic_config(primary, topic, "max.message.bytes")
    assert own_topic_configs(primary, topic) == {"retention.ms": "7200000"}
    try:
        wait_for(lambda: own_topic_configs(standby, topic) == own_topic_configs(primary, topic),
                 20, "the removed config to be removed on the standby", procs)
    finally:
        print("standby configs:", own_topic_configs(standby, topic))
        ship.stop_ok()
        apply.stop_ok()


def checkpoint_commits(bootstrap: str, key: str) -> list[int]:
    """The seq of every committed checkpoint record of one flow, in topic order."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("ckpt-count"),
                  "enable.auto.commit": False, "isolation.level": "read_committed",
                  "enable.partition.eof": True})
    seqs: list[int] = []
    try:
        c.assign([TopicPartition(CHECKPOINT_TOPIC, 0, OFFSET_BEGINNING)])
        while True:
            msgs = c.consume(500, 5)
            assert msgs, "timed out reading the checkpoint topic"
            for m in msgs:
                if m.error() is None and m.key() == key.encode():
                    seqs.append(json.loads(m.value())["seq"])
            if any(m.error() is not None for m in msgs):
                return seqs
    finally:
        c.close()


def test_backlog_is_applied_in_batched_transactions(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, kafka_topic_name: str,
    tmp_path: Path, pool: ProcessPool,
) -> None:
    """Segments already fetched share a transaction: a backlog of many small segments is
    committed in fewer transactions than segments, with the same records exactly once."""
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    multi, compact, txn = (f"{kafka_topic_name}.{s}" for s in ("multi", "compact", "txn"))
    topics = {multi: 3, compact: 2, txn: 3}
    create_topics(primary, topics, {compact: NO_COMPACTION})
    setup = write_dr_config(tmp_path, store={"type": "file", "path": str(tmp_path / "store")},
                            source_bootstrap=primary, sink_bootstrap=standby,
                            include=[re.escape(kafka_topic_name) + r"\..*"],
                            log_id=unique("batch"), apply={"batch_max_segments": 8, "prefetch": 8})
    ship = pool.ship(setup)
    for round_ in range(12):  # rounds apart in time: a segment (or more) each
        produce_round(primary, multi, 3, compact, txn, round_)
        time.sleep(0.4)
    source = read_topics(primary, topics)
    wait_log_has(setup, next_offsets(source), [ship], timeout=90)
    ship.stop_ok()
    head = log_head_seq(setup)
    with checkpoint_watch(standby) as watch:
        apply = pool.apply(setup)
        watch.wait_applied(setup, next_offsets(source), procs=[apply])
        apply.stop_ok()
    seqs = checkpoint_commits(standby, setup.checkpoint_key)
    assert seqs == sorted(seqs) and seqs[-1] == head, (seqs, head)
    assert len(seqs) < head, f"{len(seqs)} commits for {head} segments: nothing was batched"
    compare_replica(as_source(read_topics(standby, topics), origin="primary"), source,
                    what="standby vs primary after a batched backlog")

