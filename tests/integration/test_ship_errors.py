"""`drstream ship` fails loudly and cleanly: split brain, an unreachable cluster, a bad
config; and a SIGTERM drains what was consumed before exiting 0."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra.kafka import KafkaCluster
from tests.infra.procs import free_port
from tests.infra.s3 import S3Server
from tests.infra.tcp_proxy import TcpProxy
from tests.integration.shiplib import (
    DeliveryCheck,
    LoadProducer,
    ShipperPool,
    ShipProcess,
    compare_records,
    create_topic,
    flush,
    log_head,
    next_offsets,
    positions_reached,
    produce_numbered,
    producer,
    read_log,
    read_primary,
    shipper_pool,
    store_fields,
    verify_deep,
    wait_log_reaches,
    write_config,
)
from tests.support.procs import drstream, wait_for

pytestmark = pytest.mark.integration

FENCE_EVENT = '"segment_upload_failed"'
# A fenced shipper must stop by itself, soon after it logged the fencing error.
EXIT_AFTER_FENCE_S = 15.0


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ShipperPool]:
    with shipper_pool(tmp_path) as p:
        yield p


def key_re(log_id: str) -> re.Pattern[str]:
    return re.compile(rf"logs/{re.escape(log_id)}/\d{{20}}\.seg")


def wait_one_fenced(shippers: list[ShipProcess], timeout: float = 60) -> list[ShipProcess]:
    """Wait until a shipper has stopped; fail if one logged the fencing error but is still
    running EXIT_AFTER_FENCE_S later (a fenced writer that hangs instead of stopping)."""
    fenced_at: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stopped = [s for s in shippers if not s.alive()]
        if stopped:
            return stopped
        now = time.monotonic()
        for s in shippers:
            if FENCE_EVENT in s.output():
                fenced_at.setdefault(s.label, now)
                if now - fenced_at[s.label] > EXIT_AFTER_FENCE_S:
                    raise AssertionError(
                        f"shipper {s.label} logged its fencing error more than "
                        f"{EXIT_AFTER_FENCE_S:g}s ago and is still running (it should stop "
                        f"loudly at once)\n{s.describe()}")
        time.sleep(0.2)
    raise AssertionError("no shipper stopped although two write the same log\n"
                         + "\n".join(s.describe() for s in shippers))


def assert_stopped_loudly(s: ShipProcess, log_id: str) -> None:
    rc, out = s.returncode, s.output()
    assert rc not in (0, None), f"fenced shipper exited {rc}\n{s.describe()}"
    assert key_re(log_id).search(out), \
        f"the fenced shipper does not name the segment object\n{s.describe()}"
    assert "split brain" in out or "another writer" in out, s.describe()


def settle(shippers: list[ShipProcess], log_id: str) -> None:
    """Every shipper that logged a fencing error must stop by itself, loudly, within
    EXIT_AFTER_FENCE_S; the others are stopped with SIGTERM (exit 0, or non-zero and loud
    if they were fenced meanwhile)."""
    for s in shippers:
        if FENCE_EVENT in s.output() or not s.alive():
            if s.wait_exit(EXIT_AFTER_FENCE_S) is None:
                raise AssertionError(
                    f"shipper {s.label} was fenced but is still running "
                    f"{EXIT_AFTER_FENCE_S:g}s later (it should stop loudly at once)\n"
                    f"{s.describe()}")
            assert_stopped_loudly(s, log_id)
    for s in shippers:
        if s.alive() and s.terminate(30) != 0:
            assert_stopped_loudly(s, log_id)


@pytest.mark.parametrize("kind", ["file", "s3", "gcs", "azure"])
def test_second_shipper_on_the_same_log_is_fenced_loudly(
    primary_kafka: KafkaCluster, kafka_topic_name: str, tmp_path: Path, pool: ShipperPool,
    kind: str, request: pytest.FixtureRequest,
) -> None:
    """Two shippers with the same config (same log_id, store and topic) run at once: at
    least one stops by itself with an error naming the object, and the log verifies."""
    bootstrap = primary_kafka.bootstrap_servers
    topic = f"{kafka_topic_name}.orders"
    create_topic(bootstrap, topic, 3)
    store = store_fields(kind, request, tmp_path)
    setup = write_config(tmp_path, store=store, bootstrap=bootstrap,
                         include=[re.escape(topic)], log_id="fenced",
                         ship={"heartbeat_interval_s": 0.5, "flush_interval_s": 0.05,
                               "max_bytes": 2048})
    load = LoadProducer(bootstrap, {topic: 3}, rate_per_s=400, txn_every=10**9).start()
    try:
        first = pool.start(setup, "first")
        first.wait_ready()
        wait_for(lambda: (log_head(store, "fenced", setup.keyring)[0] or 0) >= 2, 30,
                 "the first shipper's segments")
        second = pool.start(setup, "second")
        stopped = wait_one_fenced([first, second])
    finally:
        load.halt()
    assert stopped
    settle([first, second], "fenced")
    load.stop()
    # Whoever won, the log is one valid chain: no segment of the loser slipped in.
    verify_deep(setup)
    read_log(setup.store, setup.log_id, setup.keyring)


def test_fenced_shipper_with_records_in_hand_stops_by_itself(
    primary_kafka: KafkaCluster, kafka_topic_name: str, tmp_path: Path, pool: ShipperPool,
) -> None:
    """A newcomer on a busy log has a backlog to ship (a topic only it reads, many small
    deliveries) when it is fenced: it must still stop by itself, loudly, at once. Three
    newcomers in turn, since the hang this guards against depends on timing."""
    bootstrap = primary_kafka.bootstrap_servers
    topic, backlog = f"{kafka_topic_name}.orders", f"{kafka_topic_name}.backlog"
    create_topic(bootstrap, topic, 3)
    create_topic(bootstrap, backlog, 3)
    p = producer(bootstrap)
    for i in range(30_000):
        p.produce(backlog, b"x" * 50, partition=i % 3)
        if i % 5000 == 0:
            p.poll(0)
    flush(p)
    store = {"type": "file", "path": str(tmp_path / "store")}
    ship = {"heartbeat_interval_s": 0.1, "flush_interval_s": 0.02, "max_bytes": 1024}
    first_setup = write_config(tmp_path, store=store, bootstrap=bootstrap, ship=ship,
                               include=[re.escape(topic)], log_id="busy", name="first.yaml")
    newcomer_setup = write_config(tmp_path, store=store, bootstrap=bootstrap, ship=ship,
                                  include=[re.escape(topic), re.escape(backlog)],
                                  log_id="busy", name="newcomer.yaml",
                                  key_path=first_setup.key_path, source={"consume_batch": 100})
    load = LoadProducer(bootstrap, {topic: 3}, rate_per_s=300, txn_every=10**9).start()
    try:
        running = pool.start(first_setup, "first")
        running.wait_ready()
        wait_for(lambda: (log_head(store, "busy", first_setup.keyring)[0] or 0) >= 3, 30,
                 "the first shipper's segments")
        for round_ in range(3):
            newcomer = pool.start(newcomer_setup, f"newcomer-{round_}")
            pair = [running, newcomer]
            wait_one_fenced(pair)
            for s in pair:
                if FENCE_EVENT in s.output() or not s.alive():
                    settle([s], "busy")
            survivors = [s for s in pair if s.alive()]
            if not survivors:
                break
            running = survivors[0]
        settle([running], "busy")
    finally:
        load.halt()
    load.stop()


def test_split_brain_with_overlapping_uploads_keeps_the_chain_valid(
    primary_kafka: KafkaCluster, kafka_topic_name: str, tmp_path: Path, pool: ShipperPool,
    s3: S3Server, s3_bucket: str, s3_creds_env: None,
) -> None:
    """Split brain where the second writer has several uploads in flight (max_in_flight 4,
    slow store link): its first segment is fenced, but its later ones must not land in
    the log behind the first writer's segment (a broken chain nobody can apply past)."""
    bootstrap = primary_kafka.bootstrap_servers
    topic, backlog = f"{kafka_topic_name}.quiet", f"{kafka_topic_name}.backlog"
    create_topic(bootstrap, topic, 1)
    create_topic(bootstrap, backlog, 3)
    p = producer(bootstrap)
    for i in range(3000):
        p.produce(backlog, b"y" * 100, partition=i % 3)
    flush(p)
    with TcpProxy(s3.port) as proxy:
        # The first writer: direct, one heartbeat segment a second.
        first_setup = write_config(
            tmp_path, store=s3.store_fields(s3_bucket, "dr"), bootstrap=bootstrap,
            include=[re.escape(topic)], log_id="split", name="first.yaml",
            ship={"heartbeat_interval_s": 1.0})
        # The second: same log, through a link that holds every chunk 0.3 s, with a backlog
        # that fills all 4 upload slots at once.
        second_setup = write_config(
            tmp_path, store=s3.store_fields(s3_bucket, "dr", endpoint_url=proxy.url),
            bootstrap=bootstrap, include=[re.escape(topic), re.escape(backlog)],
            log_id="split", name="second.yaml", key_path=first_setup.key_path,
            ship={"heartbeat_interval_s": 1.0, "max_bytes": 1024, "flush_interval_s": 0.05,
                  "max_in_flight": 4},
            source={"consume_batch": 50})
        first = pool.start(first_setup, "first")
        first.wait_ready()
        wait_for(lambda: (log_head(first_setup.store, "split", first_setup.keyring)[0] or 0)
                 >= 2, 30, "the first shipper's segments")
        proxy.delay(0.3)
        second = pool.start(second_setup, "second")
        stopped = wait_one_fenced([first, second])
        assert stopped
        if first.alive():
            # The survivor keeps running: at its next appends it replaces any segment the
            # fenced writer's parallel uploads left behind its own (they link elsewhere).
            head = log_head(first_setup.store, "split", first_setup.keyring)[0] or 0
            wait_for(lambda: (log_head(first_setup.store, "split", first_setup.keyring)[0]
                              or 0) >= head + 3, 30, "the surviving shipper's next segments")
        settle([first, second], "split")
    res = drstream("verify", "--config", str(first_setup.path), "--deep")
    assert res.returncode == 0, (
        "split brain left a log that does not verify: a fenced writer's later segment "
        f"landed after the other writer's segment\n{res.stdout}\n"
        + "\n".join(s.describe(8) for s in (first, second)))


def test_unreachable_cluster_is_retried_for_the_outage_budget_then_named(
    tmp_path: Path, pool: ShipperPool,
) -> None:
    """A cluster that never answers is retried (a broker restart must not end ship) for
    service.outage_budget_s, here 4 s; then ship exits 3 naming the address."""
    port = free_port()
    with socket.socket() as s:  # nothing may listen there
        assert s.connect_ex(("127.0.0.1", port)) != 0
    address = f"127.0.0.1:{port}"
    setup = write_config(tmp_path, store={"type": "file", "path": str(tmp_path / "store")},
                         bootstrap=address, include=["orders.*"], log_id="unreachable",
                         source={"connect_timeout_s": 1})
    setup.rewrite(service={**setup.raw["service"], "outage_budget_s": 4})
    started = time.monotonic()
    shipper = pool.start(setup)
    rc = shipper.wait_exit(60)
    elapsed = time.monotonic() - started
    assert rc is not None, f"shipper still running 60s after start\n{shipper.describe()}"
    assert rc == 3, shipper.describe()
    assert address in shipper.output(), shipper.describe()
    assert '"source_connect_retry"' in shipper.output(), shipper.describe()
    assert 4 <= elapsed < 30, f"took {elapsed:.1f}s to give up (outage_budget_s: 4)"
    print(f"gave up after {elapsed:.1f}s with exit {rc}")


def test_bad_topic_regex_is_a_validation_error(tmp_path: Path) -> None:
    setup = write_config(tmp_path, store={"type": "file", "path": str(tmp_path / "store")},
                         bootstrap="127.0.0.1:9", include=["orders["], log_id="badregex")
    res = drstream("validate", str(setup.path))
    assert res.returncode == 2, res
    assert "sources[0].topics.include" in res.stderr, res.stderr
    assert "orders[" in res.stderr, res.stderr
    # ship refuses the same config the same way, before touching anything
    res = drstream("ship", "--config", str(setup.path))
    assert res.returncode == 2, res
    assert "sources[0].topics.include" in res.stderr, res.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.seg"))


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_sigterm_drains_consumed_records_before_exit_0(
    primary_kafka: KafkaCluster, kafka_topic_name: str, tmp_path: Path, pool: ShipperPool,
    kind: str, request: pytest.FixtureRequest,
) -> None:
    bootstrap = primary_kafka.bootstrap_servers
    topic = f"{kafka_topic_name}.drain"
    create_topic(bootstrap, topic, 2)
    # No cut for a minute after the first and no heartbeat: only the drain can write
    # what is open.
    setup = write_config(tmp_path, store=store_fields(kind, request, tmp_path),
                         bootstrap=bootstrap, include=[re.escape(topic)], log_id="drain",
                         ship={"heartbeat_interval_s": 60, "min_interval_s": 60,
                               "flush_interval_s": 60})
    shipper = pool.start(setup)
    shipper.wait_ready()
    # The first segment (topic metadata) is written at once; then nothing until the drain.
    wait_for(lambda: log_head(setup.store, setup.log_id, setup.keyring)[0] is not None, 30,
             "the metadata segment")
    head_before, _ = log_head(setup.store, setup.log_id, setup.keyring)
    check = DeliveryCheck()
    p = producer(bootstrap)
    for i in range(300):
        p.produce(topic, f"drain-{i}".encode(), f"k{i % 7}".encode(), partition=i % 2,
                  on_delivery=check)
    flush(p)
    check.check()
    primary = read_primary(bootstrap, [topic])
    # The consumer fetches within a fetch.wait.max.ms (500 ms); nothing is cut for 60 s.
    time.sleep(2.0)
    head, manifest = log_head(setup.store, setup.log_id, setup.keyring)
    assert head == head_before and positions_reached(manifest, next_offsets(primary)), \
        "a segment was cut before the SIGTERM: this test would not show the drain"
    shipper.stop_ok(timeout=60)
    assert '"ship_stopped"' in shipper.output()
    compare_records(read_log(setup.store, setup.log_id, setup.keyring), primary)
    wait_log_reaches(setup, next_offsets(primary), timeout=5)
    verify_deep(setup)


def test_records_deleted_before_they_were_shipped_are_recorded_as_a_gap(
    primary_kafka: KafkaCluster, kafka_topic_name: str, tmp_path: Path, pool: ShipperPool,
) -> None:
    """Records the cluster deletes (retention, delete-records) while ship is down can never
    be replicated; on restart ship says so (error log, metric) and records the exact range
    in the log, where `verify --deep` shows it, instead of silently jumping over it."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    from tests.integration.shiplib import read_segments

    bootstrap = primary_kafka.bootstrap_servers
    topic = f"{kafka_topic_name}.retention"
    create_topic(bootstrap, topic, 1)
    setup = write_config(tmp_path, store={"type": "file", "path": str(tmp_path / "store")},
                         bootstrap=bootstrap, include=[re.escape(topic)], log_id="gap")

    produce_numbered(bootstrap, topic, 100, "before")
    first = pool.start(setup)
    first.wait_ready()
    wait_log_reaches(setup, {(topic, 0): 100}, shipper=first)
    first.stop_ok()
    produce_numbered(bootstrap, topic, 100, "while-down")  # offsets 100..199
    admin = AdminClient({"bootstrap.servers": bootstrap})
    [fut] = admin.delete_records([TopicPartition(topic, 0, 150)]).values()
    fut.result(30)  # offsets below 150 are gone: 100..149 were never shipped
    second = pool.start(setup)
    second.wait_ready()
    wait_log_reaches(setup, {(topic, 0): 200}, shipper=second)
    second.stop_ok()
    assert '"source_offsets_lost"' in second.output(), second.output()[-2000:]
    gaps = [s.manifest.extra["kafka:primary"]["gaps"]
            for s in read_segments(setup.store, setup.log_id, setup.keyring)
            if "gaps" in s.manifest.extra.get("kafka:primary", {})]
    assert gaps == [{topic: {"0": [100, 150]}}], gaps
    offsets = [r.offset for r in read_log(setup.store, setup.log_id, setup.keyring)[(topic, 0)]]
    assert offsets == [*range(100), *range(150, 200)]
    res = drstream("verify", "--config", str(setup.path), "--deep")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SOURCE GAP kafka:primary {topic}[0] offsets 100..149" in res.stdout, res.stdout
