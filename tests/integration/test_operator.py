"""The operator commands against a running pair, as an on-call operator meets them.

- ship and apply run as the systemd units run them (their ExecStart=, Environment=, the
  key handed over by LoadCredential= through $CREDENTIALS_DIRECTORY); status, verify,
  drill and failover run from a shell, where there is no credential directory, given the
  key with `--key k1=file:...`.
- status on a topic of 200 partitions answers in seconds and never shows the standby
  ahead of the log while heartbeats land.
- replay, drill and status reach a standby that wants SASL, with the client properties
  and secrets given the one way every command takes them.

Real clusters, a real file store, the real `drstream` processes; nothing is mocked.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.kafka import KafkaCluster
from tests.integration.applylib import (
    DrSetup,
    ProcessPool,
    commit_group,
    create_topics,
    file_store,
    first_records_of_group,
    process_pool,
    read_topics,
    topic_exists,
    unique,
    wait_log_has,
    write_dr_config,
)
from tests.integration.shiplib import flush, producer
from tests.support.procs import DrstreamProcess, drstream, show, wait_for
from tests.unit.test_systemd_units import UNITS, exec_start, parse_unit, values

pytestmark = pytest.mark.integration

PASSWORD_ENV = "DRSTREAM_TEST_KAFKA_PASSWORD"
PASSWORD = "s3cret-7f2a"


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


def ok(res: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    assert res.returncode == 0, f"{what}: {show(res)}"
    assert "Traceback" not in res.stderr, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def produce_per_partition(bootstrap: str, topic: str, partitions: int, n: int,
                          timestamp_ms: int | None = None) -> None:
    p = producer(bootstrap)
    for i in range(n):
        for part in range(partitions):
            p.produce(topic, f"v-{part}-{i}".encode(), f"k{i}".encode(), partition=part,
                      timestamp=timestamp_ms or 0)
    flush(p)


# --------------------------------------------------------------------------- the units


class UnitProcess(DrstreamProcess):
    """`drstream ship|apply` started from its systemd unit: ExecStart= with `config`,
    Environment=, and each LoadCredential=NAME:PATH copied (mode 0400) into a credential
    directory named by $CREDENTIALS_DIRECTORY, as systemd hands them over."""

    def __init__(self, role: str, config: Path, key: Path, tmp_path: Path) -> None:
        unit = parse_unit(UNITS[role].read_text())
        argv = exec_start(unit, config)
        creds = tmp_path / f"credentials-{role}"
        creds.mkdir()
        for spec in values(unit, "Service", "LoadCredential"):
            name, _, source = spec.partition(":")
            assert source == "/etc/drstream/k1.key", spec  # the key, here a test copy
            shutil.copyfile(key, creds / name)
            (creds / name).chmod(0o400)
        env = dict(kv.split("=", 1) for line in values(unit, "Service", "Environment")
                   for kv in shlex.split(line))
        env["CREDENTIALS_DIRECTORY"] = str(creds)
        super().__init__(argv[1:], tmp_path / f"{role}.log", role, env=env, cli=argv[:1])


def test_operator_commands_from_a_shell_against_the_units(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path,
    pool: ProcessPool,
) -> None:
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    topic, group = unique("op"), unique("op-group")
    create_topics(primary, {topic: 2})
    produce_per_partition(primary, topic, 2, 100)
    commit_group(primary, group, {(topic, 0): 60, (topic, 1): 40})
    setup = write_dr_config(tmp_path, store=file_store(tmp_path), source_bootstrap=primary,
                            sink_bootstrap=standby, include=[topic],
                            source={"groups": {"include": [group]}})
    key = Path(setup.raw["keyring"]["keys"]["k1"].removeprefix("file:"))
    setup.rewrite(keyring={"active": "k1", "keys": {"k1": "credential:drstream-k1"}})
    ship = UnitProcess("ship", setup.path, key, tmp_path)
    apply = UnitProcess("apply", setup.path, key, tmp_path)
    try:
        for proc in (ship, apply):
            proc.wait_ready()
        wait_for(lambda: topic_exists(standby, topic) and len(
            read_topics(standby, [topic], timeout=10).get((topic, 0), [])) == 100, 90,
            "the standby to catch up", [ship, apply])
        config = ["--config", str(setup.path)]
        with_key = [*config, "--key", f"k1=file:{key}"]

        bare = drstream("status", *config)  # a shell has no credential directory
        assert bare.returncode == 2, show(bare)
        assert "CREDENTIALS_DIRECTORY" in bare.stderr and "--key" in bare.stderr

        status = ok(drstream("status", *with_key, "--json", "--max-rpo", "120",
                             "--max-lag", "120"), "status")
        assert status["ok"] and status["streams"][setup.stream]["pending_records"] == 0
        sink = status["sinks"][f"kafka:{setup.sink_name}"]
        assert sink["reachable"] and sink["apply_lag_segments"] >= 0

        verify = drstream("verify", *with_key, "--deep", "--json")
        assert ok(verify, "verify --deep")[0]["records"] == 200

        report = ok(drstream("drill", *with_key, "--json"), "drill")
        assert report["ok"] and report["records"] == 200 and report["mismatches"] == []

        assert apply.terminate() == 0  # the failover runbook: stop apply first
        failover = ok(drstream("failover", *with_key, "--json"), "failover")
        assert failover["applied_seq"] == failover["durable_head_seq"]
        assert group in failover["groups_committed"][f"kafka:{setup.sink_name}"]
    finally:
        for proc in (ship, apply):
            proc.reap()
            print(proc.describe(40))
    first = first_records_of_group(standby, group, [topic], {(topic, 0), (topic, 1)})
    assert first[(topic, 0)].value == b"v-0-60" and first[(topic, 1)].value == b"v-1-40"


# --------------------------------------------------------------------------- status


PARTITIONS_200 = 200
STATUS_TIMEOUT_S = 60  # reading each partition on its own took 0.5-1 s apiece: 100-200 s
OLD_RECORD_AGE_S = 600


def status_json(setup: DrSetup) -> dict[str, Any]:
    res = drstream("status", "--config", str(setup.path), "--json", timeout=STATUS_TIMEOUT_S)
    assert res.returncode in (0, 1), show(res)
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def test_status_on_200_partitions_answers_in_seconds_and_never_shows_negative_lag(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path,
    pool: ProcessPool,
) -> None:
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    topic = unique("wide")
    create_topics(primary, {topic: PARTITIONS_200})
    produce_per_partition(primary, topic, PARTITIONS_200, 1)
    # heartbeats several times a second: a status that reads the head before the
    # checkpoints sees apply pass that head
    setup = write_dr_config(tmp_path, store=file_store(tmp_path), source_bootstrap=primary,
                            sink_bootstrap=standby, include=[topic],
                            ship={"heartbeat_interval_s": 0.2}, apply={"poll_max_s": 0.05})
    ship, apply = pool.ship(setup), pool.apply(setup)
    wait_log_has(setup, {(topic, p): 1 for p in range(PARTITIONS_200)}, [ship, apply])
    sink = f"kafka:{setup.sink_name}"
    wait_for(lambda: status_json(setup)["sinks"][sink]["apply_lag_segments"] < 10, 90,
             "apply to catch up", [ship, apply])
    for _ in range(5):
        st = status_json(setup)
        assert st["streams"][setup.stream]["pending_records"] == 0, st
        assert st["sinks"][sink]["apply_lag_segments"] >= 0, st
        assert st["sinks"][sink]["applied_seq"] <= st["durable_head_seq"], st
    assert ship.terminate() == 0
    # now records the log lacks, the first pending one of a partition old: the RPO is its
    # age; the newest record is known too
    now_ms = int(time.time() * 1000)
    p = producer(primary)
    p.produce(topic, b"old", partition=137, timestamp=now_ms - OLD_RECORD_AGE_S * 1000)
    flush(p)
    produce_per_partition(primary, topic, PARTITIONS_200, 1)
    st = status_json(setup)["streams"][setup.stream]
    assert st["pending_records"] == PARTITIONS_200 + 1, st
    assert OLD_RECORD_AGE_S <= st["rpo_s"] < OLD_RECORD_AGE_S + STATUS_TIMEOUT_S, st
    assert st["newest_record_ms"] >= now_ms, st


# --------------------------------------------------------------------------- a secured standby


@pytest.fixture(scope="module")
def secured_kafka() -> Iterator[KafkaCluster]:
    """A standby whose client listener wants SASL/PLAIN (user drstream)."""
    cluster = KafkaCluster("secured", sasl_users={"drstream": PASSWORD})
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.remove()


SASL = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
        "sasl.username": "drstream"}


def test_replay_drill_and_status_reach_a_secured_standby(
    primary_kafka: KafkaCluster, secured_kafka: KafkaCluster, tmp_path: Path,
    pool: ProcessPool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    primary, secured = primary_kafka.bootstrap_servers, secured_kafka.sasl_bootstrap_servers
    topic = unique("sasl")
    create_topics(primary, {topic: 2})
    produce_per_partition(primary, topic, 2, 25)
    setup = write_dr_config(
        tmp_path, store=file_store(tmp_path), source_bootstrap=primary, sink_bootstrap=secured,
        include=[topic],
        sink={"properties": SASL, "secret_properties": {"sasl.password": f"env:{PASSWORD_ENV}"},
              "connect_timeout_s": 10})
    ship = pool.ship(setup)
    wait_log_has(setup, {(topic, 0): 25, (topic, 1): 25}, [ship])
    assert ship.terminate() == 0
    config = ["--config", str(setup.path)]
    outputs = []

    # the drill's scratch topics go to the config's sink, with that sink's properties
    res = drstream("drill", *config, "--json")
    outputs.append(res.stdout + res.stderr)
    report = ok(res, "drill")
    assert report["ok"] and report["records"] == 50, report

    target = ["--target-bootstrap", secured,
              *(a for k, v in SASL.items() for a in ("--target-property", f"{k}={v}")),
              "--target-secret-property", f"sasl.password=env:{PASSWORD_ENV}"]
    res = drstream("replay", *config, *target, "--rename", "{topic}.restored")
    outputs.append(res.stdout + res.stderr)
    assert res.returncode == 0, show(res)
    restored = read_topics_sasl(secured_kafka, f"{topic}.restored")
    assert restored == 50

    res = drstream("status", *config, "--json")
    outputs.append(res.stdout + res.stderr)
    st = ok(res, "status")
    assert st["sinks"][f"kafka:{setup.sink_name}"]["reachable"], st
    assert st["sinks"][f"kafka:{setup.sink_name}"]["applied_seq"] == 0  # only replays wrote
    assert not any(PASSWORD in out for out in outputs)


def read_topics_sasl(cluster: KafkaCluster, topic: str) -> int:
    """Records in `topic` read through the SASL listener."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": cluster.sasl_bootstrap_servers, **SASL,
                  "sasl.password": PASSWORD, "group.id": unique("sasl-reader"),
                  "enable.auto.commit": False, "isolation.level": "read_committed"})
    try:
        parts = c.list_topics(topic, timeout=30).topics[topic].partitions
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
                for p in parts}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        seen, deadline = 0, time.monotonic() + 60
        while time.monotonic() < deadline:
            seen += sum(1 for m in c.consume(500, 0.5) if m.error() is None)
            if all(tp.offset >= ends[tp.partition] for tp in c.position(
                    [TopicPartition(topic, p) for p in parts])):
                return seen
        raise AssertionError(f"timed out reading {topic} through SASL ({seen} read)")
    finally:
        c.close()

