"""Consumer-group failover: a group resumes on the standby at exactly the next record.

Groups commit offsets on the primary (synchronously); the shipper tails them
(`groups.include`, discovery every second) and the applier commits translated offsets on
the standby (`group_sync_interval_s: 1`). A consumer of the same group on the standby must
then receive, as its first record on each partition, exactly the record a consumer on the
primary would read next: the first committed record at or after the committed offset
(same key, value, headers, timestamp; drstream.offset = its primary offset). Covered:
an offset in the middle, one far behind the head (binary search over many applied
records), one at the head (records produced later come first), one inside a gap left by
compaction, one on an aborted record and one on a transaction marker; and a group whose
partitions become ready for the log in different segments.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from drstream.daemon.codec import KafkaRecord
from tests.infra.kafka import KafkaCluster
from tests.integration.applylib import (
    FIELDS,
    OFFSET_HEADER,
    TP,
    DrSetup,
    ProcessPool,
    Records,
    as_source,
    checkpoint_watch,
    commit_group,
    create_topics,
    first_records_of_group,
    group_offsets,
    high_watermarks,
    log_group_offsets,
    log_head_seq,
    next_offsets,
    process_pool,
    read_topics,
    read_uncommitted_offsets,
    unique,
    write_dr_config,
)
from tests.integration.shiplib import DeliveryCheck, flush, producer
from tests.support.procs import wait_for

pytestmark = pytest.mark.integration

# Explicit CreateTime timestamps, an hour old: older ones (beyond retention.ms, 7 days by
# default) make the brokers delete whole segments at their first retention check.
BASE_TS = (int(time.time()) - 3600) * 1000
PLAIN_PER_PARTITION = 600
# Compacts at the cleaner's next pass: every filler record rolls a segment.
COMPACTING = {"cleanup.policy": "compact", "segment.ms": "100",
              "min.cleanable.dirty.ratio": "0.01", "min.compaction.lag.ms": "0"}
COMPACT_KEYS = 5


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


def produce_plain(bootstrap: str, topic: str, partitions: int, n: int, tag: str) -> None:
    check = DeliveryCheck()
    p = producer(bootstrap, **{"enable.idempotence": True})
    for i in range(n):
        for part in range(partitions):
            headers = [("i", str(i).encode()), ("i", None)] if i % 4 == 0 else None
            p.produce(topic, f"{tag}-{part}-{i}".encode(), f"k{i % 37}".encode(),
                      partition=part, headers=headers, timestamp=BASE_TS + i,
                      on_delivery=check)
        if i % 500 == 0:
            p.poll(0)
    flush(p)
    check.check()


def produce_with_transactions(bootstrap: str, topic: str) -> None:
    """Per partition: plain, aborted txn, plain, committed txn, aborted txn, committed
    txn, plain: read_committed offsets have gaps of aborted records and markers."""
    check = DeliveryCheck()
    plain = producer(bootstrap, **{"enable.idempotence": True})
    tx = producer(bootstrap, **{"transactional.id": unique("groups-txn")})
    tx.init_transactions(60)

    def some(prefix: str, n: int) -> None:
        for i in range(n):
            for part in range(2):
                plain.produce(topic, f"{prefix}-{part}-{i}".encode(), f"p{i}".encode(),
                              partition=part, on_delivery=check)
        flush(plain)

    def txn(prefix: str, abort: bool) -> None:
        tx.begin_transaction()
        for i in range(5):
            for part in range(2):
                tx.produce(topic, f"{prefix}-{part}-{i}".encode(), f"t{i}".encode(),
                           partition=part, on_delivery=check)
        if abort:
            flush(tx)
            tx.abort_transaction(60)
        else:
            tx.commit_transaction(60)

    some("plain-a", 10)
    txn("aborted-1", abort=True)
    some("plain-b", 5)
    txn("txn-1", abort=False)
    txn("aborted-2", abort=True)
    txn("txn-2", abort=False)
    some("plain-c", 10)
    check.check()


def wait_compacted(bootstrap: str, topic: str) -> None:
    """Nudge the cleaner (filler records roll segments) until exactly one record per
    duplicated key is left."""
    p = Producer({"bootstrap.servers": bootstrap})
    n = 0

    def compacted() -> bool:
        nonlocal n
        p.produce(topic, b"filler", f"filler-{n}".encode(), partition=0)
        flush(p)
        n += 1
        recs = read_topics(bootstrap, [topic])[(topic, 0)]
        return sum(1 for r in recs if not (r.key or b"").startswith(b"filler")) == COMPACT_KEYS

    wait_for(compacted, 90, f"the log cleaner to compact {topic}", interval=1.0)


def first_at_or_after(records: list[KafkaRecord], offset: int) -> KafkaRecord:
    found = next((r for r in records if r.offset >= offset), None)
    assert found is not None, f"no committed record at or after {offset} on the primary"
    return found


def check_group(standby: str, group: str, committed: dict[TP, int], source: Records
                ) -> list[str]:
    """Join `group` on the standby; its first record per partition must be the primary's
    first committed record at or after the group's committed offset there. Reports the
    committed standby offset next to the right one (that of the expected record's copy,
    or anything after the copy before it)."""
    topics = sorted({t for t, _ in committed})
    standby_offsets = group_offsets(standby, group, committed)
    replica = read_topics(standby, topics)
    problems = []
    for tp, offset in sorted(committed.items()):
        want = first_at_or_after(source[tp], offset)
        copies = [(r.offset, int(dict(r.headers)[OFFSET_HEADER])) for r in replica[tp]]
        at = next((i for i, (_, src) in enumerate(copies) if src == want.offset), None)
        assert at is not None, f"no copy of {tp}@{want.offset} on the standby"
        lowest = copies[at - 1][0] + 1 if at > 0 else 0
        right = f"{lowest}..{copies[at][0]}" if lowest < copies[at][0] else f"{lowest}"
        got_offset = standby_offsets.get(tp)
        if got_offset is None or not lowest <= got_offset <= copies[at][0]:
            problems.append(
                f"group {group} {tp[0]}[{tp[1]}]: committed {offset} on the primary (next "
                f"record there: offset {want.offset}); translated to {got_offset} on the "
                f"standby, should be {right} (standby partition has offsets "
                f"{copies[0][0]}..{copies[-1][0]} for source offsets "
                f"{copies[0][1]}..{copies[-1][1]})")
    if problems:
        return problems
    firsts = first_records_of_group(standby, group, topics, set(committed))
    for tp, offset in sorted(committed.items()):
        want = first_at_or_after(source[tp], offset)
        [got] = as_source({tp: [firsts[tp]]}, origin="primary")[tp]
        diff = [f for f in FIELDS if getattr(got, f) != getattr(want, f)]
        if diff:
            problems.append(
                f"group {group} {tp[0]}[{tp[1]}]: committed {offset} on the primary, "
                f"{standby_offsets.get(tp)} on the standby; first record there is the copy of "
                f"primary offset {got.offset} (value {got.value!r}), expected offset "
                f"{want.offset} (value {want.value!r}); fields differing: {diff}")
    return problems


def wait_groups_synced(standby: str, wanted: dict[str, dict[TP, int]], procs: list,
                       timeout: float = 90) -> None:
    missing: list[str] = []

    def synced() -> bool:
        missing.clear()
        for group, offsets in wanted.items():
            have = group_offsets(standby, group, offsets)
            missing.extend(f"{group} {tp}" for tp in offsets if tp not in have)
        return not missing

    try:
        wait_for(synced, timeout, "translated group offsets on the standby", procs,
                 interval=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}\nmissing: {missing[:10]}") from None


def group_setup(tmp_path: Path, primary: str, standby: str, base: str, prefix: str
                ) -> DrSetup:
    return write_dr_config(
        tmp_path, store={"type": "file", "path": str(tmp_path / "store")},
        source_bootstrap=primary, sink_bootstrap=standby,
        include=[re.escape(base) + r"\..*"], log_id=unique("groups"),
        source={"groups": {"include": [re.escape(prefix) + r"-.*"]}, "discovery_interval_s": 1},
        apply={"group_sync_interval_s": 1})


def test_group_offsets_translate_exactly(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, kafka_topic_name: str,
    tmp_path: Path, pool: ProcessPool,
) -> None:
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    base = kafka_topic_name
    plain, compact, txn = f"{base}.plain", f"{base}.compact", f"{base}.txn"
    topics = {plain: 2, compact: 1, txn: 2}
    create_topics(primary, topics, {compact: COMPACTING})
    p = producer(primary)
    for i in range(12 * COMPACT_KEYS):  # unique keys between versions: gaps mid-partition
        p.produce(compact, f"c{i}".encode(), f"ck-{i % COMPACT_KEYS}".encode(), partition=0,
                  timestamp=BASE_TS + 2 * i)
        p.produce(compact, f"u{i}".encode(), f"filler-u{i}".encode(), partition=0,
                  timestamp=BASE_TS + 2 * i + 1)
    flush(p)
    produce_plain(primary, plain, 2, PLAIN_PER_PARTITION, "plain")
    produce_with_transactions(primary, txn)
    wait_compacted(primary, compact)
    source = read_topics(primary, topics)

    prefix = unique("grp")
    g_mid, g_far, g_end = f"{prefix}-mid", f"{prefix}-far", f"{prefix}-end"
    g_compact, g_txn = f"{prefix}-compact", f"{prefix}-txn"
    # g_mid: a real consumer of the group reads part of the topic and commits.
    c = Consumer({"bootstrap.servers": primary, "group.id": g_mid, "enable.auto.commit": False,
                  "auto.offset.reset": "earliest"})
    c.subscribe([plain])
    seen = 0
    deadline = time.monotonic() + 60
    while seen < 700 and time.monotonic() < deadline:
        seen += sum(1 for m in c.consume(100, 0.5) if m.error() is None)
    c.commit(asynchronous=False)
    c.close()
    assert seen >= 700, f"the {g_mid} consumer read only {seen} records"
    # g_far: far behind the head (hundreds of records applied after it).
    commit_group(primary, g_far, {(plain, 0): 3, (plain, 1): 17})
    # g_end: at the head; records produced after the sync must come first.
    ends = high_watermarks(primary, {plain: 2})
    commit_group(primary, g_end, ends)
    # g_compact: on an offset whose record the cleaner removed.
    offsets = [r.offset for r in source[(compact, 0)]]
    gap = next(b for a, b in itertools.pairwise(offsets) if b > a + 1)
    commit_group(primary, g_compact, {(compact, 0): gap - 1})
    # g_txn: partition 0 on an aborted record, partition 1 on a transaction marker.
    at: dict[TP, int] = {}
    for part in range(2):
        committed = {r.offset for r in source[(txn, part)]}
        data = read_uncommitted_offsets(primary, txn, part)
        aborted = sorted(set(data) - committed)
        markers = sorted(set(range(max(data) + 1)) - set(data))
        assert aborted and markers, f"no gaps in {txn}[{part}]: {data}"
        at[(txn, part)] = aborted[len(aborted) // 2] if part == 0 else markers[0]
    commit_group(primary, g_txn, at)

    parts = {g_mid: list(ends), g_far: list(ends), g_end: list(ends),
             g_compact: [(compact, 0)], g_txn: list(at)}
    wanted = {g: group_offsets(primary, g, tps) for g, tps in parts.items()}
    assert all(wanted.values()), wanted
    print("primary group offsets:", wanted)

    setup = group_setup(tmp_path, primary, standby, base, prefix)
    with checkpoint_watch(standby) as watch:
        ship, apply = pool.ship(setup), pool.apply(setup)
        procs = [ship, apply]
        wait_groups_synced(standby, wanted, procs)
        produce_plain(primary, plain, 2, 3, "after-sync")
        source = read_topics(primary, topics)
        watch.wait_applied(setup, next_offsets(source), procs=procs)
        problems = []
        for group, committed in wanted.items():
            problems += check_group(standby, group, committed, source)
        ship.stop_ok()
        apply.stop_ok()
    assert not problems, "\n".join(problems)


def test_group_offsets_ready_in_different_segments_are_all_committed(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, kafka_topic_name: str,
    tmp_path: Path, pool: ProcessPool,
) -> None:
    """A group's offset on partition 0 reaches the log in one segment, its offset on
    partition 1 (committed ahead of the records, which arrive later) in a later one. The
    applier, catching up over both segments before its next group sync, must still commit
    both partitions on the standby."""
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    base = kafka_topic_name
    plain = f"{base}.plain"
    create_topics(primary, {plain: 2})
    produce_plain(primary, plain, 2, 50, "plain")
    prefix = unique("grp")
    group = f"{prefix}-split"
    setup = group_setup(tmp_path, primary, standby, base, prefix)
    with checkpoint_watch(standby) as watch:
        ship, apply = pool.ship(setup), pool.apply(setup)
        watch.wait_applied(setup, next_offsets(read_topics(primary, [plain])),
                           procs=[ship, apply])
        apply.stop_ok()
        applied = int(watch.get(setup.checkpoint_key)["seq"])  # type: ignore[index]
        # the restarted apply's first segment (and its first group sync) comes before
        wait_for(lambda: log_head_seq(setup) >= applied + 2, 30, "heartbeat segments", [ship])
        commit_group(primary, group, {(plain, 0): 20, (plain, 1): 53})
        wait_for(lambda: log_group_offsets(setup).get(group) == {plain: {"0": 20}}, 30,
                 "partition 0 of the group in the log", [ship])
        produce_plain(primary, plain, 2, 5, "later")  # partition 1 reaches 55 > 53
        wait_for(lambda: log_group_offsets(setup).get(group) == {plain: {"0": 20, "1": 53}},
                 30, "partition 1 of the group in the log", [ship])
        apply = pool.apply(setup, "restarted")
        source = read_topics(primary, [plain])
        watch.wait_applied(setup, next_offsets(source), procs=[ship, apply])
        wanted = {(plain, 0): 20, (plain, 1): 53}
        try:
            wait_groups_synced(standby, {group: wanted}, [ship, apply], timeout=20)
        finally:
            print("standby offsets of the group:", group_offsets(standby, group, wanted))
            print("checkpoint groups:",
                  (watch.get(setup.checkpoint_key) or {}).get("offsets", {}).get("groups"))
        problems = check_group(standby, group, wanted, source)
        ship.stop_ok()
        apply.stop_ok()
    assert not problems, "\n".join(problems)
