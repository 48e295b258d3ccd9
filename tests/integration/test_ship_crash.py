"""Crash and outage: the log stays exactly-once and in order through kill -9 and store
outages (S3, GCS, Azure).

While a producer writes continuously (idempotent records and transactions, some aborted)
to 2 topics x 3 partitions, the shipper is killed with SIGKILL at random moments and
started again; or the store's server becomes unreachable through a TCP proxy for a while.
At the end every committed record of the primary is in the log exactly once per
partition, in order, and nothing else is. The seed is printed (DRSTREAM_TEST_SEED
replays a run).
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra.kafka import KafkaCluster
from tests.infra.tcp_proxy import TcpProxy
from tests.integration.shiplib import (
    LoadProducer,
    ShipperPool,
    ShipSetup,
    compare_records,
    create_topic,
    log_head,
    next_offsets,
    read_log,
    read_primary,
    shipper_pool,
    store_fields,
    store_server,
    verify_deep,
    wait_log_reaches,
    write_config,
)
from tests.support.procs import wait_for

pytestmark = pytest.mark.integration

KILLS = 12
# the GCS and Azure runs repeat the file store's: fewer kills in make test, all in make soak
REMOTE_KILLS = 4
# Small segments and short flushes: many uploads in flight when the kill lands.
SHIP = {"heartbeat_interval_s": 1, "flush_interval_s": 0.1, "max_bytes": 4096,
        "max_in_flight": 4}


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ShipperPool]:
    with shipper_pool(tmp_path) as p:
        yield p


def seeded() -> random.Random:
    seed = int(os.environ.get("DRSTREAM_TEST_SEED") or time.time_ns() % 2**31)
    print(f"random seed {seed} (replay with DRSTREAM_TEST_SEED={seed})")
    return random.Random(seed)


def make_topics(bootstrap: str, base: str) -> dict[str, int]:
    topics = {f"{base}.a": 3, f"{base}.b": 3}
    for name, partitions in topics.items():
        create_topic(bootstrap, name, partitions)
    return topics


def head_seq(setup: ShipSetup) -> int:
    return log_head(setup.store, setup.log_id, setup.keyring)[0] or 0


def finish_and_compare(
    bootstrap: str, topics: dict[str, int], load: LoadProducer, setup: ShipSetup,
    pool: ShipperPool,
) -> None:
    """Stop the load, let a fresh shipper catch up, SIGTERM it, compare everything."""
    load.stop()
    print(f"produced {load.produced} records and {load.transactions} transactions "
          f"({load.aborted} aborted)")
    primary = read_primary(bootstrap, topics)
    final = pool.start(setup, "final")
    wait_log_reaches(setup, next_offsets(primary), timeout=90, shipper=final)
    final.stop_ok()
    log = read_log(setup.store, setup.log_id, setup.keyring)
    compare_records(log, primary)
    print(f"log: {sum(len(v) for v in log.values())} records in {head_seq(setup)} segments")
    verify_deep(setup)


@pytest.mark.parametrize("kind", ["file", "gcs", "azure"])
def test_kill9_at_random_moments_keeps_every_record_exactly_once(
    primary_kafka: KafkaCluster, kafka_topic_name: str, tmp_path: Path, pool: ShipperPool,
    kind: str, request: pytest.FixtureRequest, soak: bool,
) -> None:
    rng = seeded()
    kills = KILLS if soak or kind == "file" else REMOTE_KILLS
    bootstrap = primary_kafka.bootstrap_servers
    topics = make_topics(bootstrap, kafka_topic_name)
    setup = write_config(tmp_path, store=store_fields(kind, request, tmp_path),
                         bootstrap=bootstrap, include=[re.escape(kafka_topic_name) + r"\..*"],
                         log_id="crash", ship=SHIP)
    load = LoadProducer(bootstrap, topics, rate_per_s=500, seed=rng.randrange(2**31)).start()
    try:
        load.wait_produced(200)
        heads = []
        for i in range(kills):
            shipper = pool.start(setup, f"run{i}")
            # Half the kills are timed from the spawn (may land during start-up, open or
            # the first fetch), half from "ship_started" (mid-stream, uploads in flight).
            anchor = rng.choice(["spawn", "ready"])
            if anchor == "ready":
                shipper.wait_ready()
            delay = rng.uniform(0.3, 2.0)
            time.sleep(delay)
            assert shipper.alive(), f"shipper died before its kill\n{shipper.describe()}"
            shipper.kill()
            heads.append(head_seq(setup))
            print(f"kill {i + 1}: {delay:.2f}s after {anchor}, head seq {heads[-1]}, "
                  f"{load.produced} produced")
        # The kills must have interrupted real work, not only start-ups.
        progressed = sum(1 for a, b in zip([0, *heads], heads, strict=False) if b > a)
        assert progressed >= kills // 3, f"the log advanced in only {progressed} runs: {heads}"
    finally:
        load.halt()
    finish_and_compare(bootstrap, topics, load, setup, pool)


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_store_outage_through_proxy_is_retried_and_loses_nothing(
    primary_kafka: KafkaCluster, kafka_topic_name: str, tmp_path: Path, pool: ShipperPool,
    kind: str, request: pytest.FixtureRequest,
) -> None:
    rng = seeded()
    bootstrap = primary_kafka.bootstrap_servers
    topics = make_topics(bootstrap, kafka_topic_name)
    with TcpProxy(store_server(kind, request).port) as proxy:
        store = store_fields(kind, request, tmp_path, via=proxy.url)
        setup = write_config(tmp_path, store=store, bootstrap=bootstrap,
                             include=[re.escape(kafka_topic_name) + r"\..*"],
                             log_id="outage", ship=SHIP)
        load = LoadProducer(bootstrap, topics, rate_per_s=500,
                            seed=rng.randrange(2**31)).start()
        try:
            shipper = pool.start(setup, "during-outage")
            shipper.wait_ready()
            wait_for(lambda: head_seq(setup) >= 3, 30, "the first segments")

            before = head_seq(setup)
            accepted = proxy.accepted
            # refuse: connections reset; blackhole: requests hang until the client times
            # out; mute: writes land but their answers are lost (the retry finds its own
            # bytes already stored and must accept them).
            outage = [("refuse", rng.uniform(2.0, 3.0)), ("blackhole", rng.uniform(2.5, 3.5)),
                      ("mute", rng.uniform(1.5, 2.5))]
            rng.shuffle(outage)
            for mode, seconds in outage:
                print(f"{kind} {mode} for {seconds:.1f}s")
                proxy.set_mode(mode)  # type: ignore[arg-type]
                time.sleep(seconds)
                assert shipper.alive(), f"shipper gave up during the outage\n" \
                                        f"{shipper.describe()}"
            assert proxy.accepted > accepted, "the shipper did not even try during the outage"
            proxy.pass_through()
            outage_end = time.monotonic()
            wait_for(lambda: head_seq(setup) > before + 2, 60, "uploads after the outage")
            print(f"log moved from seq {before} to {head_seq(setup)} "
                  f"{time.monotonic() - outage_end:.1f}s after the outage")
            assert shipper.alive(), shipper.describe()
            # a retried request is logged by the store (store_retry: GCS, Azure) or by
            # the outage budget around every store (store_outage_retry)
            out = shipper.output()
            assert '"store_retry"' in out or '"store_outage_retry"' in out, \
                f"no store retry logged during the outage\n{shipper.describe()}"
            load.wait_produced(load.produced + 500)
            shipper.stop_ok()
        finally:
            load.halt()
        finish_and_compare(bootstrap, topics, load, setup, pool)
