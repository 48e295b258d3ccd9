"""`drstream ship` copies exactly the committed records of the primary, field by field.

Real Kafka, real stores (file and S3 API server), the real `drstream ship` process: what
the decoded log holds per partition must equal what a read_committed consumer reads from
the primary (offset, key, value, headers, timestamp and its type), aborted transactions
must be absent, and `drstream verify --deep` must accept the log.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra.kafka import KafkaCluster
from tests.integration.shiplib import (
    DeliveryCheck,
    Records,
    ShipperPool,
    compare_records,
    create_topic,
    flush,
    next_offsets,
    producer,
    read_log,
    read_primary,
    shipper_pool,
    store_fields,
    verify_deep,
    wait_log_reaches,
    write_config,
)

pytestmark = pytest.mark.integration

BASE_TS = 1_700_000_000_000


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ShipperPool]:
    with shipper_pool(tmp_path) as p:
        yield p


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, object]:
    return store_fields(request.param, request, tmp_path)


def produce_plain(bootstrap: str, multi: str, compact: str, appendtime: str, round_: int
                  ) -> int:
    """Non-transactional records of every shape; returns how many were produced."""
    check = DeliveryCheck()
    p = producer(bootstrap, **{"enable.idempotence": True})
    n = 0
    r = f"r{round_}"
    for i in range(60):
        part = i % 4
        key: bytes | None = None if i % 3 == 0 else f"{r}-key-{i % 10}".encode()
        value: bytes | None = f"{r}-value-{i}".encode() * (1 + i % 4)
        headers: list[tuple[str, bytes | None]] | None = None
        if i % 5 == 0:
            value = None  # tombstone (keyed or not)
        if i % 4 == 1:
            headers = [("h", b"1"), ("h", b"2"), ("none", None), ("h", b"1"), ("e", b"")]
        if i == 7:
            key, value = b"", b""  # empty is not None
        if i == 8:
            value = bytes(range(256))  # binary, not UTF-8
        p.produce(multi, value, key, partition=part, headers=headers,
                  timestamp=BASE_TS + round_ * 1000 + i, on_delivery=check)
        n += 1
    # no timestamp given: the producer's clock (CreateTime) is used
    for i in range(8):
        p.produce(multi, f"{r}-now-{i}".encode(), partition=i % 4, on_delivery=check)
        n += 1
    for i in range(40):
        key = f"ck-{i % 6}".encode()
        value = None if i % 7 == 3 else f"{r}-c-{i}".encode()
        p.produce(compact, value, key, partition=i % 2, on_delivery=check,
                  headers=[("k", key), ("k", None)] if i % 2 else None)
        n += 1
    for i in range(10):
        p.produce(appendtime, f"{r}-la-{i}".encode(), timestamp=BASE_TS + i, on_delivery=check)
        n += 1
    flush(p)
    check.check()
    return n


def produce_transactions(bootstrap: str, txn_topic: str, multi: str, round_: int) -> int:
    """Committed and aborted transactions (aborted records are flushed to the broker
    first, so they really sit in the partitions); returns the committed record count."""
    check = DeliveryCheck()
    tx = producer(bootstrap, **{"transactional.id": f"content-{txn_topic}-{round_}"})
    plain = producer(bootstrap)
    tx.init_transactions(60)
    committed = 0
    for t in range(6):
        abort = t % 3 == 1
        tx.begin_transaction()
        for i in range(9):
            value = f"{'ABORTED' if abort else 'committed'}-r{round_}-t{t}-{i}".encode()
            tx.produce(txn_topic, value, f"tk{i}".encode(), partition=i % 3,
                       headers=[("txn", str(t).encode())], on_delivery=check)
            if i % 4 == 0:
                tx.produce(multi, value, None, partition=i % 4, on_delivery=check)
        # interleave plain records with the open transaction
        plain.produce(txn_topic, f"plain-r{round_}-t{t}".encode(), partition=t % 3,
                      on_delivery=check)
        flush(plain)
        if abort:
            flush(tx)
            tx.abort_transaction(60)
        else:
            tx.commit_transaction(60)
            committed += 9 + 3
        committed += 1
    check.check()
    return committed


def assert_no_aborted(records: Records) -> None:
    for tp, recs in records.items():
        for r in recs:
            assert not (r.value or b"").startswith(b"ABORTED"), \
                f"aborted record shipped: {tp} offset {r.offset} {r.value!r}"


def test_ship_copies_exactly_the_committed_records(
    primary_kafka: KafkaCluster, kafka_topic_name: str, store: dict[str, object],
    tmp_path: Path, pool: ShipperPool,
) -> None:
    bootstrap = primary_kafka.bootstrap_servers
    base = kafka_topic_name
    multi, compact, txn = f"{base}.multi", f"{base}.compact", f"{base}.txn"
    appendtime, empty = f"{base}.appendtime", f"{base}.empty"
    other = f"{base}-notincluded"
    create_topic(bootstrap, multi, 4)
    create_topic(bootstrap, compact, 2, {"cleanup.policy": "compact"})
    create_topic(bootstrap, txn, 3)
    create_topic(bootstrap, appendtime, 1, {"message.timestamp.type": "LogAppendTime"})
    create_topic(bootstrap, empty, 2)
    create_topic(bootstrap, other, 1)
    topics = [multi, compact, txn, appendtime, empty]

    # Round 0 sits in the topics before the shipper starts; round 1 arrives while it runs.
    expected = produce_plain(bootstrap, multi, compact, appendtime, 0)
    expected += produce_transactions(bootstrap, txn, multi, 0)
    flush_other = producer(bootstrap)
    flush_other.produce(other, b"must not be shipped")
    flush(flush_other)

    setup = write_config(tmp_path, store=store, bootstrap=bootstrap,
                         include=[re.escape(base) + r"\..*"], log_id="content")
    shipper = pool.start(setup)
    shipper.wait_ready()
    expected += produce_plain(bootstrap, multi, compact, appendtime, 1)
    expected += produce_transactions(bootstrap, txn, multi, 1)

    primary = read_primary(bootstrap, topics)
    assert sum(len(v) for v in primary.values()) == expected
    assert_no_aborted(primary)
    wait_log_reaches(setup, next_offsets(primary), timeout=90, shipper=shipper)
    shipper.stop_ok()

    log = read_log(setup.store, setup.log_id, setup.keyring)
    assert {t for t, _ in log} <= set(topics), f"unexpected topics in the log: {set(log)}"
    assert_no_aborted(log)
    compare_records(log, primary)
    # spot checks of the shapes the comparison covers
    flat = [r for recs in log.values() for r in recs]
    assert any(r.value is None and r.key is not None for r in flat), "no keyed tombstone"
    assert any(r.value is None and r.key is None for r in flat), "no null-key tombstone"
    assert any(r.key == b"" and r.value == b"" for r in flat), "no empty key/value"
    assert any([h for h, _ in r.headers].count("h") == 3 and ("none", None) in r.headers
               for r in flat), "no duplicate / None headers"
    assert {r.timestamp_type for r in log[(appendtime, 0)]} == {2}  # LogAppendTime
    assert {r.timestamp_type for r in log[(multi, 0)]} == {1}  # CreateTime
    assert (empty, 0) not in log or log[(empty, 0)] == []
    verify_deep(setup)
