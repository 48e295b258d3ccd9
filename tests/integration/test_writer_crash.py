"""kill -9 of `ship` while several uploads are in flight, 20 times, while `apply` follows:
the writer's clean-up at each restart removes only what its own crash left (segments
behind a hole, never durable), never a segment that was durable, and the standby ends
exactly equal to the primary, record by record.

ship writes through a TCP proxy that fails one request in five at random, so an upload
waits for its retry while later ones (max_in_flight 4, a segment every 50 ms) land, and
a kill can leave a hole with later segments stored behind it. Half the kills land at a
random moment, half the moment the test sees such a hole in the bucket (it lists the
log every few milliseconds). apply reads the same bucket directly. After
each kill the store's contiguous run is recorded: every segment in it was durable, and
must still be there, byte for byte, at the end. The seed is printed
(DRSTREAM_TEST_SEED=N replays a schedule).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from drstream.daemon.deltalog import DeltaLog
from drstream.daemon.layout import segments_prefix, seq_from_key
from tests.infra.kafka import KafkaCluster
from tests.infra.s3 import S3Server
from tests.infra.tcp_proxy import TcpProxy
from tests.integration.applylib import (
    DrSetup,
    ProcessPool,
    as_source,
    checkpoint_watch,
    compare_replica,
    count,
    create_topics,
    next_offsets,
    process_pool,
    read_topics,
    seeded_rng,
    unique,
    write_dr_config,
)
from tests.integration.shiplib import LoadProducer, _opened

pytestmark = pytest.mark.integration

KILLS, SOAK_KILLS = 8, 20  # make test, make soak
SHIP = {"heartbeat_interval_s": 1, "flush_interval_s": 0.05, "max_bytes": 2048,
        "max_in_flight": 4}


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


async def _stored(fields: dict[str, object], log_id: str) -> dict[int, str]:
    """seq -> SHA-256 of every segment stored, and which of them form the contiguous run."""
    async with _opened(fields) as store:
        log = DeltaLog(store, log_id)
        out = {}
        async for key in store.list(segments_prefix(log_id)):
            seq = seq_from_key(key)
            data = await log.fetch(seq) if seq is not None else None
            if seq is not None and data is not None:
                out[seq] = hashlib.sha256(data).hexdigest()
        return out


def contiguous(stored: dict[int, str]) -> dict[int, str]:
    """The run from seq 1 (this log is never pruned): segments stored behind a lost seq 1
    were never durable."""
    run, seq = {}, 1
    while seq in stored:
        run[seq] = stored[seq]
        seq += 1
    return run


def wait_for_a_hole(s3: S3Server, bucket: str, prefix: str, timeout: float = 3.0) -> bool:
    """Until a listing shows a segment stored behind a missing one (or the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                    Prefix=prefix)
        seqs = sorted(s for p in pages for o in p.get("Contents", [])
                      if (s := seq_from_key(o["Key"])) is not None)
        if seqs and seqs[-1] - seqs[0] + 1 != len(seqs):
            return True
        time.sleep(0.005)
    return False


def test_kill9_with_uploads_in_flight_never_removes_a_durable_segment(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, s3: S3Server, s3_bucket: str,
    s3_creds_env: None, kafka_topic_name: str, tmp_path: Path, pool: ProcessPool, soak: bool,
) -> None:
    rng = seeded_rng()
    kills = SOAK_KILLS if soak else KILLS
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    topics = {f"{kafka_topic_name}.a": 3, f"{kafka_topic_name}.b": 3}
    create_topics(primary, topics)
    store = s3.store_fields(s3_bucket, "dr")
    apply_setup = write_dr_config(tmp_path, store=store, source_bootstrap=primary,
                                  sink_bootstrap=standby, log_id=unique("wcrash"), ship=SHIP,
                                  include=[re.escape(kafka_topic_name) + r"\..*"])
    with TcpProxy(s3.port) as proxy, checkpoint_watch(standby) as watch:
        proxy.flaky(0.2)
        raw = copy.deepcopy(apply_setup.raw)
        # a failed request waits 0.2-0.4 s for its retry: later uploads land meanwhile
        raw["store"] = {**store, "endpoint_url": proxy.url, "backoff_base_s": 0.4,
                        "backoff_max_s": 0.8}
        ship_setup = DrSetup(tmp_path / "ship.yaml", raw)
        ship_setup.rewrite()
        load = LoadProducer(primary, topics, rate_per_s=300, seed=rng.randrange(2**31)).start()
        durable: dict[int, str] = {}
        orphans = 0
        try:
            apply = pool.apply(apply_setup, "apply")
            load.wait_produced(100)
            for i in range(kills):
                ship = pool.ship(ship_setup, f"ship-{i}")
                ship.wait_ready(60)
                if i % 2:
                    time.sleep(rng.uniform(0.3, 1.2))
                else:
                    wait_for_a_hole(s3, s3_bucket, f"dr/{segments_prefix(apply_setup.log_id)}")
                assert ship.alive(), ship.describe()
                ship.kill()
                orphans += ship.output().count('"orphan_segment_deleted"')
                stored = asyncio.run(_stored(store, apply_setup.log_id))
                run = contiguous(stored)
                gone = {s: d for s, d in durable.items() if run.get(s) != d}
                assert not gone, f"kill {i + 1}: durable segments removed or changed: " \
                                 f"{sorted(gone)[:10]}\n{ship.describe()}"
                durable.update(run)
                print(f"kill {i + 1}: head {max(run, default=0)}, "
                      f"{len(stored) - len(run)} stored behind a hole")
            assert apply.alive(), apply.describe()
        finally:
            load.halt()
        load.stop()
        print(f"{load.produced} produced; {orphans} crash leftovers cleaned by restarts")
        assert orphans > 0, "no kill left a hole: this run did not exercise the clean-up"
        source = read_topics(primary, topics)
        final = pool.ship(ship_setup, "ship-final")
        watch.wait_applied(apply_setup, next_offsets(source), timeout=180, procs=[final, apply])
        final.stop_ok()
        apply.stop_ok()
        stored = asyncio.run(_stored(store, apply_setup.log_id))
        gone = {s: d for s, d in durable.items() if stored.get(s) != d}
        assert not gone, f"durable segments removed or changed: {sorted(gone)[:10]}"
    replica = read_topics(standby, topics)
    compare_replica(as_source(replica, origin="primary"), source,
                    what=f"standby vs primary after {kills} kills of ship")
    print(f"{count(replica)} records on the standby, each exactly once, in order; "
          f"{len(durable)} durable segments all kept")
