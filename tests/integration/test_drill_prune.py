"""`drstream drill` proves a log restores (or names the segment that does not) and
`drstream prune` trims a log without taking what a reader still needs.

Real primary and standby Kafka clusters, a real file store, the real `drstream ship`,
`apply`, `drill`, `prune` and `verify` commands. Logs are decoded to know what each
segment holds; replicas are compared record by record with the log or the primary.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka.admin import AdminClient

from drstream.connectors.kafka.common import Cluster
from drstream.connectors.kafka.verify import delete_topics
from drstream.daemon.deltalog import seq_from_key
from tests.infra.kafka import KafkaCluster
from tests.integration.applylib import (
    CheckpointWatch,
    DrSetup,
    ProcessPool,
    Records,
    as_source,
    checkpoint_watch,
    compare_replica,
    copy_log,
    count,
    create_topics,
    drill,
    file_store,
    flip_body_byte,
    high_watermarks,
    process_pool,
    read_topics,
    topic_partitions,
    unique,
    wait_log_has,
    write_dr_config,
)
from tests.integration.shiplib import (
    DeliveryCheck,
    Segment,
    flush,
    producer,
    read_segments,
    records_of,
)
from tests.support.procs import drstream, show, wait_for

pytestmark = pytest.mark.integration

PARTITIONS = 2


# --------------------------------------------------------------------------- helpers


def ok(res: subprocess.CompletedProcess[str], what: str) -> str:
    assert res.returncode == 0, f"{what}: {show(res)}"
    return res.stdout


def produce(bootstrap: str, topic: str, start: int, n: int) -> None:
    check = DeliveryCheck()
    p = producer(bootstrap, **{"enable.idempotence": True})
    for i in range(start, start + n):
        p.produce(topic, f"value-{i}".encode() * (1 + i % 3), f"key-{i % 13}".encode(),
                  partition=i % PARTITIONS, headers=[("i", str(i).encode())] if i % 7 else None,
                  on_delivery=check)
        p.poll(0)
    flush(p)
    check.check()


def ship_all(pool: ProcessPool, setup: DrSetup, primary: str, topic: str, label: str) -> int:
    """Ship everything the topic holds now, stop the shipper; returns the head seq."""
    ship = pool.ship(setup, label)
    head = wait_log_has(setup, high_watermarks(primary, {topic: PARTITIONS}), [ship])
    ship.stop_ok()
    return head


def applied_seq(watch: CheckpointWatch, key: str) -> int:
    cp = watch.get(key)
    return int(cp["seq"]) if cp else 0


def apply_through(pool: ProcessPool, setup: DrSetup, seq: int, key: str, label: str) -> str:
    """Run `drstream apply` until its checkpoint `key` reaches `seq`; stop it; its output."""
    with checkpoint_watch(setup.raw["sinks"][0]["bootstrap_servers"]) as watch:
        apply = pool.apply(setup, label)
        wait_for(lambda: applied_seq(watch, key) >= seq, 120,
                 f"apply {label} to reach seq {seq}", [apply], interval=0.2)
        assert applied_seq(watch, key) == seq, f"apply went past seq {seq}"
    apply.stop_ok()
    out = apply.output()
    assert '"level": "error"' not in out, f"apply {label} logged errors\n{apply.describe()}"
    return out


def stored_seqs(store_path: Path, log_id: str) -> list[int]:
    names = [p.name for p in (store_path / "logs" / log_id).iterdir()]
    seqs = [seq_from_key(f"logs/{log_id}/{name}") for name in names]
    return sorted(s for s in seqs if s is not None)


def topics_with_suffix(bootstrap: str, suffix: str) -> list[str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    return sorted(t for t in admin.list_topics(timeout=10).topics if t.endswith(suffix))


def read_replica(standby: str, records: Records, topic_map: dict[str, str]) -> Records:
    return as_source(read_topics(standby, sorted(topic_map)), origin="primary",
                     topic_map=topic_map)


def with_all_partitions(records: Records, topic: str) -> Records:
    return {(topic, p): records.get((topic, p), []) for p in range(PARTITIONS)}


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


# --------------------------------------------------------------------------- drill


@dataclass
class DrillLog:
    raw: dict[str, Any]  # config of the pristine log
    topic: str
    segments: list[Segment]
    records: Records


@pytest.fixture(scope="module")
def drill_log(primary_kafka: KafkaCluster, standby_kafka: KafkaCluster,
              tmp_path_factory: pytest.TempPathFactory) -> DrillLog:
    tmp = tmp_path_factory.mktemp("drill-log")
    primary = primary_kafka.bootstrap_servers
    topic = unique("drill")
    create_topics(primary, {topic: PARTITIONS})
    produce(primary, topic, 0, 600)
    setup = write_dr_config(tmp, store=file_store(tmp), source_bootstrap=primary,
                            sink_bootstrap=standby_kafka.bootstrap_servers,
                            include=[re.escape(topic)], log_id=unique("drill"),
                            source={"consume_batch": 50},
                            ship={"max_bytes": 2048, "heartbeat_interval_s": 30})
    with process_pool(tmp) as pool:
        ship_all(pool, setup, primary, topic, "ship")
    segments = read_segments(setup.raw["store"], setup.log_id, setup.keyring)
    records = records_of(segments)
    assert count(records) == 600, count(records)
    assert sum(1 for s in segments if s.manifest.record_count) >= 5, \
        f"want several segments with records, got {len(segments)} segments"
    return DrillLog(setup.raw, topic, segments, records)


def test_drill_of_a_healthy_log_passes(
    drill_log: DrillLog, standby_kafka: KafkaCluster, tmp_path: Path,
) -> None:
    setup, store = copy_log(drill_log.raw, tmp_path)
    res, report = drill(setup)
    assert res.returncode == 0, f"drill of a healthy log failed: {show(res)}"
    assert report["ok"] is True, report
    assert report["mismatches"] == [], report
    assert report["log_id"] == setup.log_id
    assert isinstance(report["rto_s"], int | float) and report["rto_s"] >= 0, report
    assert report["records"] == count(drill_log.records), report
    assert report["applied_through_seq"] == drill_log.segments[-1].seq, report
    assert report["partitions"] == PARTITIONS, report
    assert report["target"] == standby_kafka.bootstrap_servers, report
    audit = store / report["audit_object"]
    assert report["audit_object"].startswith("audit/") and audit.is_file(), \
        f"no audit object {report['audit_object']} in the store"
    stored = json.loads(audit.read_text())
    assert stored["ok"] is True and stored["log_id"] == setup.log_id, stored
    assert stored["records"] == report["records"], stored
    # without --keep the scratch topics are removed
    suffix = report["scratch_suffix"]
    wait_for(lambda: not topics_with_suffix(standby_kafka.bootstrap_servers, suffix), 60,
             f"scratch topics *{suffix} to be deleted")
    print(f"drill passed: {report['records']} records, RTO {report['rto_s']}s, "
          f"report {report['audit_object']}")


def test_drill_of_a_tampered_log_fails_naming_the_segment(
    drill_log: DrillLog, standby_kafka: KafkaCluster, tmp_path: Path,
) -> None:
    setup, store = copy_log(drill_log.raw, tmp_path)
    with_records = [s.seq for s in drill_log.segments if s.manifest.record_count]
    seq = with_records[len(with_records) // 2]
    flip_body_byte(store, setup.log_id, seq)
    res, report = drill(setup)
    assert res.returncode == 1, f"drill of a tampered log: want exit 1, {show(res)}"
    assert report["ok"] is False, report
    error = report.get("error", "")
    assert f"log {setup.log_id}" in error and re.search(rf"\bseq {seq}\b", error), \
        f"the drill error does not name log {setup.log_id} seq {seq}: {report}"
    audit = store / report["audit_object"]
    assert audit.is_file(), f"no audit object {report['audit_object']}"
    assert json.loads(audit.read_text())["ok"] is False
    left = topics_with_suffix(standby_kafka.bootstrap_servers, report["scratch_suffix"])
    if left:  # a failed drill leaves what it wrote before the bad segment
        print(f"scratch topics left by the failed drill: {left}")
        delete_topics(Cluster(standby_kafka.bootstrap_servers), left)
    print(f"drill failed as it must: {error}")


# --------------------------------------------------------------------------- prune


def test_prune_keeps_what_apply_and_the_head_need(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path,
    pool: ProcessPool,
) -> None:
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    topic = unique("prune")
    create_topics(primary, {topic: PARTITIONS})
    setup = write_dr_config(tmp_path, store=file_store(tmp_path), source_bootstrap=primary,
                            sink_bootstrap=standby, include=[re.escape(topic)],
                            log_id=unique("prune"), source={"consume_batch": 50},
                            ship={"max_bytes": 2048, "heartbeat_interval_s": 30})
    store = Path(setup.raw["store"]["path"])
    log_id = setup.log_id

    # wave A, applied: the standby's checkpoint is at k
    produce(primary, topic, 0, 400)
    k = ship_all(pool, setup, primary, topic, "ship-a")
    assert k >= 4, f"wave A made only {k} segments"
    apply_through(pool, setup, k, setup.checkpoint_key, "apply-a")
    # wave B, not applied yet: the head moves past k
    produce(primary, topic, 400, 400)
    head = ship_all(pool, setup, primary, topic, "ship-b")
    assert head > k + 1, (k, head)
    segments = read_segments(setup.raw["store"], log_id, setup.keyring)
    assert segments[-1].seq == head
    time.sleep(1.5)  # every segment is now older than 1s
    prune = ["prune", "--config", str(setup.path)]

    out = ok(drstream(*prune, "--older-than", "1h"), "prune --older-than 1h")
    assert "deleted 0 segments" in out and "newer than the cutoff" in out, out
    out = ok(drstream(*prune, "--older-than", "1s", "--dry-run"), "prune --dry-run")
    assert f"would delete {k - 1} segments (seq 1..{k - 1})" in out, out
    assert stored_seqs(store, log_id) == list(range(1, head + 1)), "a dry run deleted segments"

    out = ok(drstream(*prune, "--older-than", "1s"), "prune --older-than 1s")
    assert f"deleted {k - 1} segments (seq 1..{k - 1}); kept from seq {k}" in out, out
    assert f"applied through seq {k}" in out, out
    assert stored_seqs(store, log_id) == list(range(k, head + 1)), \
        f"want seqs {k}..{head} left, have {stored_seqs(store, log_id)}"
    res = drstream("verify", "--config", str(setup.path), "--json")
    [report] = json.loads(ok(res, "verify after prune"))
    assert report["ok"] and report["first_seq"] == k and report["last_seq"] == head, report

    # the apply that stopped at k continues from there
    apply_through(pool, setup, head, setup.checkpoint_key, "apply-b")
    source = read_topics(primary, [topic])
    assert count(source) == 800
    compare_replica(read_replica(standby, source, {topic: topic}), source,
                    what="standby after prune and apply restart")

    # a sink that never applied anything starts at the oldest stored segment, k
    suffix = f".fresh-{uuid.uuid4().hex[:8]}"
    raw = yaml.safe_load(setup.path.read_text())
    raw["sinks"][0].update(name="fresh", topic_template="{topic}" + suffix)
    fresh = DrSetup(tmp_path / "fresh.yaml", raw)
    fresh.rewrite()
    out = apply_through(pool, fresh, head, fresh.checkpoint_key, "apply-fresh")
    assert '"apply_from_pruned_log"' in out, out[-3000:]
    expected = with_all_partitions(records_of(segments[k - 1:]), topic)
    assert 0 < count(expected) < 800, count(expected)
    compare_replica(read_replica(standby, expected, {topic + suffix: topic}), expected,
                    what=f"fresh sink from the pruned log (segments {k}..{head})")
    assert topic_partitions(standby, topic + suffix) == PARTITIONS

    # every sink at the head: everything but the head goes
    out = ok(drstream(*prune, "--older-than", "1s"), "second prune")
    assert f"deleted {head - k} segments (seq {k}..{head - 1}); kept from seq {head}" in out, out
    assert stored_seqs(store, log_id) == [head]
    [report] = json.loads(ok(drstream("verify", "--config", str(setup.path), "--json"),
                             "verify after the second prune"))
    assert report["ok"] and report["first_seq"] == head == report["last_seq"], report
    print(f"log of {head} segments, apply at {k}: prune kept {k}..{head}; fresh sink "
          f"applied {count(expected)} records from seq {k}")
