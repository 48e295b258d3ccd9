"""`drstream status` and `drstream failover` against real clusters.

After failover, a consumer of a group that committed on the primary resumes on the standby
at exactly the record after its last committed one; the report gives RPO 0 when nothing
is missing, names an unreachable primary with the last heartbeat, and is stored as an
audit object in the log store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra.kafka import KafkaCluster
from tests.infra.procs import free_port
from tests.integration.applylib import (
    ProcessPool,
    commit_group,
    create_topics,
    file_store,
    first_records_of_group,
    log_group_offsets,
    process_pool,
    read_topics,
    unique,
    write_dr_config,
)
from tests.integration.shiplib import flush, producer
from tests.support.procs import drstream, wait_for

pytestmark = pytest.mark.integration

PER_PARTITION = 200
COMMITTED = {0: 120, 1: 45}


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


def test_status_then_failover_moves_a_group_to_the_exact_next_record(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path,
    pool: ProcessPool,
) -> None:
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    topic, group = unique("fo"), unique("fo-group")
    create_topics(primary, {topic: 2})
    p = producer(primary)
    for i in range(PER_PARTITION):
        for part in (0, 1):
            p.produce(topic, f"v-{part}-{i}".encode(), f"k{i}".encode(), partition=part)
    flush(p)
    commit_group(primary, group, {(topic, part): off for part, off in COMMITTED.items()})
    setup = write_dr_config(
        tmp_path, store=file_store(tmp_path), source_bootstrap=primary,
        sink_bootstrap=standby, include=[topic], source={"groups": {"include": [group]}},
        apply={"group_sync_interval_s": 3600})

    ship = pool.ship(setup)
    ship.wait_ready()
    wait_for(lambda: group in log_group_offsets(setup), 60, "the group's offsets in the log")
    ship.stop_ok()

    status = drstream("status", "--config", str(setup.path), "--json")
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    head = st["durable_head_seq"]
    assert head and st["streams"][setup.stream]["pending_records"] == 0
    assert st["streams"][setup.stream]["rpo_s"] == 0
    sink = st["sinks"][f"kafka:{setup.sink_name}"]
    assert sink["applied_seq"] == 0 and sink["apply_lag_segments"] == head

    res = drstream("failover", "--config", str(setup.path), "--json", timeout=180)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["applied_seq"] == report["durable_head_seq"] == head
    stream = report["streams"][setup.stream]
    assert stream["primary"] == "reachable"
    assert stream["records_not_replicated"] == 0 and stream["rpo_s"] == 0
    assert group in report["groups_committed"][f"kafka:{setup.sink_name}"]
    audit = Path(setup.raw["store"]["path"]) / report["audit_object"]
    assert json.loads(audit.read_text())["applied_seq"] == head

    primary_records = read_topics(primary, [topic])
    want = {(topic, part) for part in COMMITTED}
    first = first_records_of_group(standby, group, [topic], want)
    for part, off in COMMITTED.items():
        expected = next(r for r in primary_records[(topic, part)] if r.offset == off)
        got = first[(topic, part)]
        assert (got.key, got.value, got.timestamp) == (
            expected.key, expected.value, expected.timestamp), f"partition {part}"


def test_failover_with_the_primary_gone_reports_the_last_heartbeat(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path,
    pool: ProcessPool,
) -> None:
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    topic = unique("fo-gone")
    create_topics(primary, {topic: 1})
    p = producer(primary)
    for i in range(50):
        p.produce(topic, f"v{i}".encode(), partition=0)
    flush(p)
    setup = write_dr_config(tmp_path, store=file_store(tmp_path), source_bootstrap=primary,
                            sink_bootstrap=standby, include=[topic])
    ship = pool.ship(setup)
    ship.wait_ready()
    time.sleep(2.5)  # a heartbeat or two (heartbeat_interval_s 1)
    ship.stop_ok()
    dead = f"127.0.0.1:{free_port()}"
    source = {**setup.raw["sources"][0], "bootstrap_servers": dead, "connect_timeout_s": 2}
    setup.rewrite(sources=[source])

    res = drstream("failover", "--config", str(setup.path), "--json", timeout=180)
    assert res.returncode == 0, res.stderr
    stream = json.loads(res.stdout)["streams"][setup.stream]
    assert stream["primary"] == "unreachable"
    assert stream["last_heartbeat_ms"] and stream["rpo_s_upper_bound"] is not None
    assert len(read_topics(standby, [topic])[(topic, 0)]) == 50
