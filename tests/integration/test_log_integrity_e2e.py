"""The log against its readers, with real Kafka clusters, on the file store and the moto
S3 server: a failover stops at a gap instead of taking it for the end; a log whose newest
segments were removed under an applied standby is reported as truncated, a quiet one as
stale; an interrupted named replay keeps what it still needs through a prune; a running
ship records records the primary deleted before it read them; ship waits for a primary
that is down at start instead of exiting.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from drstream.daemon.layout import replay_pins_prefix
from tests.contract.integrity import (
    LOG,
    LogSetup,
    make_log,
    open_setup,
    replace,
    s3_fields,
)
from tests.infra.kafka import KafkaCluster
from tests.integration.applylib import as_source, read_topics
from tests.integration.shiplib import (
    DeliveryCheck,
    ShipperPool,
    create_topic,
    flush,
    produce_numbered,
    producer,
    read_log,
    read_segments,
    shipper_pool,
    store_fields,
    wait_log_reaches,
    write_config,
)
from tests.support.procs import drstream, show, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(params=["file", "s3"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ShipperPool]:
    with shipper_pool(tmp_path) as p:
        yield p


@pytest.fixture
async def standby_log(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
                      standby_kafka: KafkaCluster) -> AsyncIterator[LogSetup]:
    """A 40-segment log, and a config whose sink is a fresh one on the standby cluster."""
    fields = {"type": "file", "path": str(tmp_path / "store")} if kind == "file" \
        else s3_fields(request)
    name = f"sb-{uuid.uuid4().hex[:8]}"
    sink = {"type": "kafka", "name": name, "bootstrap_servers": standby_kafka.bootstrap_servers,
            "topic_template": "{topic}." + name, "connect_timeout_s": 20}
    async with open_setup(kind, fields, tmp_path, sinks=[sink],
                          ship={"heartbeat_interval_s": 1}) as s:
        await make_log(s)
        yield s


async def run(*args: str, timeout: float = 180) -> Any:
    return await asyncio.to_thread(drstream, *args, timeout=timeout)


async def test_failover_stops_at_a_gap(standby_log: LogSetup) -> None:
    await standby_log.store.delete(standby_log.key(20))
    res = await run("failover", "--config", str(standby_log.config_path))
    assert res.returncode == 3 and "seq 20" in res.stderr, show(res)
    assert "Traceback" not in res.stderr


async def test_a_truncated_log_is_reported_against_the_standby(standby_log: LogSetup) -> None:
    cfg = str(standby_log.config_path)
    res = await run("failover", "--config", cfg)
    assert res.returncode == 0 and "applied through seq 40" in res.stdout, show(res)
    res = await run("status", "--config", cfg)
    assert res.returncode == 0 and "PROBLEM" not in res.stdout, show(res)
    for seq in (39, 40):  # the newest segments, gone without a trace in the log itself
        await standby_log.store.delete(standby_log.key(seq))
    res = await run("status", "--config", cfg)
    assert res.returncode == 1, show(res)
    assert re.search(r"truncated: sink \S+ applied through seq 40 but the log ends at 38",
                     res.stdout), show(res)
    res = await run("verify", "--config", cfg)
    assert res.returncode == 1 and "truncated" in res.stdout, show(res)
    # and nothing has been written for more than 3 heartbeat intervals (1 s): stale
    await asyncio.sleep(3.5)
    res = await run("status", "--config", cfg)
    assert "WARNING        stale log: the head (seq 38)" in res.stdout, show(res)


async def test_prune_keeps_what_an_interrupted_named_replay_needs(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path,
        standby_kafka: KafkaCluster) -> None:
    fields = {"type": "file", "path": str(tmp_path / "store")} if kind == "file" \
        else s3_fields(request)
    suffix = uuid.uuid4().hex[:8]
    async with open_setup(kind, fields, tmp_path) as s:
        await make_log(s, 30)
        cfg, name = str(s.config_path), f"restore-{suffix}"
        good = await s.store.get(s.key(15)) or b""
        await replace(s.store, s.key(15), good[:-1] + bytes([good[-1] ^ 1]))
        replay = ["replay", "--config", cfg, "--target-bootstrap",
                  standby_kafka.bootstrap_servers, "--rename", "{topic}." + suffix,
                  "--name", name]
        res = await run(*replay)
        assert res.returncode == 3 and s.key(15) in res.stderr, show(res)
        pins = [k async for k in s.store.list(replay_pins_prefix(LOG))]
        assert len(pins) == 1 and name in pins[0], pins

        await asyncio.sleep(1.2)
        res = await run("prune", "--config", cfg, "--older-than", "1s", "--no-sink-check")
        assert res.returncode == 0, show(res)
        assert f"replay '{name}' is unfinished and needs seq 1 on" in res.stdout, show(res)
        assert await s.store.exists(s.key(1))

        await replace(s.store, s.key(15), good)  # repaired: the replay resumes at 14
        res = await run(*replay)
        assert res.returncode == 0, show(res)
        assert not [k async for k in s.store.list(replay_pins_prefix(LOG))]
        topic = f"orders.{suffix}"
        replica = await asyncio.to_thread(read_topics, standby_kafka.bootstrap_servers, [topic])
        source = as_source(replica, origin="primary")[(topic, 0)]
        assert [r.offset for r in source] == list(range(60)), "not exactly once"
        res = await run("prune", "--config", cfg, "--older-than", "1s", "--no-sink-check")
        assert res.returncode == 0 and "deleted 29 segments" in res.stdout, show(res)


@pytest.mark.parametrize("store_kind", ["file", "s3"])
def test_a_running_ship_records_what_the_primary_deleted_before_it_read_it(
        primary_kafka: KafkaCluster, kafka_topic_name: str, tmp_path: Path, pool: ShipperPool,
        store_kind: str, request: pytest.FixtureRequest) -> None:
    """The primary deletes records a running ship has not read yet (here ship is frozen
    with SIGSTOP, as a long GC pause or a full store would hold it): the exact lost range
    is logged, counted and recorded in the log, and nothing after it is lost."""
    bootstrap = primary_kafka.bootstrap_servers
    topic = f"{kafka_topic_name}.overtaken"
    create_topic(bootstrap, topic, 1)
    setup = write_config(tmp_path, store=store_fields(store_kind, request, tmp_path),
                         bootstrap=bootstrap, include=[re.escape(topic)], log_id="overtaken")

    produce_numbered(bootstrap, topic, 100, "read")
    ship = pool.start(setup)
    ship.wait_ready()
    wait_log_reaches(setup, {(topic, 0): 100}, shipper=ship)
    os.killpg(ship.pid, signal.SIGSTOP)
    try:
        # a fetch request in flight (a long poll of up to fetch.wait.max.ms, 500 ms) would
        # still bring new records into the frozen process's socket: let it come back empty
        time.sleep(2.0)
        produce_numbered(bootstrap, topic, 100, "unread")  # offsets 100..199
        admin = AdminClient({"bootstrap.servers": bootstrap})
        [fut] = admin.delete_records([TopicPartition(topic, 0, 150)]).values()
        fut.result(30)  # 100..149 are gone before ship read them
    finally:
        os.killpg(ship.pid, signal.SIGCONT)
    wait_log_reaches(setup, {(topic, 0): 200}, shipper=ship)
    ship.stop_ok()
    out = ship.output()
    assert '"source_offsets_lost"' in out and '"first": 100' in out and '"end": 150' in out, \
        out[-3000:]
    gaps = [seg.manifest.extra["kafka:primary"]["gaps"]
            for seg in read_segments(setup.store, setup.log_id, setup.keyring)
            if "gaps" in seg.manifest.extra.get("kafka:primary", {})]
    assert gaps == [{topic: {"0": [100, 150]}}], gaps
    offsets = [r.offset for r in read_log(setup.store, setup.log_id, setup.keyring)[(topic, 0)]]
    assert offsets == [*range(100), *range(150, 200)]
    res = drstream("verify", "--config", str(setup.path), "--deep")
    assert res.returncode == 0, show(res)
    assert f"SOURCE GAP kafka:primary {topic}[0] offsets 100..149" in res.stdout, res.stdout


def test_ship_waits_for_a_primary_that_is_down_at_start(
        primary_kafka: KafkaCluster, kafka_topic_name: str, tmp_path: Path,
        pool: ShipperPool) -> None:
    """The primary's broker is down when ship starts (a restart, a region blip): ship is
    not ready and retries its first scan instead of exiting, then ships once it is back."""
    bootstrap = primary_kafka.bootstrap_servers
    topic = f"{kafka_topic_name}.late"
    create_topic(bootstrap, topic, 1)
    setup = write_config(tmp_path, store={"type": "file", "path": str(tmp_path / "store")},
                         bootstrap=bootstrap, include=[re.escape(topic)], log_id="late",
                         source={"connect_timeout_s": 2})
    primary_kafka.stop()
    try:
        ship = pool.start(setup)
        wait_for(lambda: ship.output().count('"source_connect_retry"') >= 2, 60,
                 "ship to retry its first scan", [ship])
        assert '"ship_started"' not in ship.output()
    finally:
        primary_kafka.start()
    ship.wait_ready(120)
    check, p = DeliveryCheck(), producer(bootstrap)
    for i in range(50):
        p.produce(topic, f"late-{i}".encode(), partition=0, on_delivery=check)
    flush(p)
    check.check()
    wait_log_reaches(setup, {(topic, 0): 50}, shipper=ship)
    ship.stop_ok()
