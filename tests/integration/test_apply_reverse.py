"""Reverse flow (failback, active-active): replicated records never loop.

Two flows run at once on the same topic name: primary -> log A -> standby and
standby -> log B -> primary, each a real `drstream ship` + `drstream apply`. Records are
produced on both sides while they run. The shippers skip records that carry a
drstream.origin header (skip_origins defaults to ["*"]), so once both flows have caught
up every record exists exactly once on each side: the originals produced there plus one
replicated copy of each record produced on the other side (one origin header naming the
other cluster, drstream.offset naming the original's offset), and nothing has two hops.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra.kafka import KafkaCluster
from tests.integration.applylib import (
    ORIGIN_HEADER,
    CheckpointWatch,
    DrSetup,
    ProcessPool,
    Records,
    as_source,
    checkpoint_watch,
    compare_replica,
    count,
    create_topics,
    file_store,
    header_values,
    high_watermarks,
    process_pool,
    read_topics,
    unique,
    write_dr_config,
)
from tests.integration.shiplib import DeliveryCheck, flush, producer
from tests.support.procs import wait_for

pytestmark = pytest.mark.integration

PARTITIONS = 2
PER_ROUND = 60


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


def produce(bootstrap: str, topic: str, tag: str) -> int:
    check = DeliveryCheck()
    p = producer(bootstrap, **{"enable.idempotence": True})
    for i in range(PER_ROUND):
        headers = [("h", tag.encode()), ("h", None)] if i % 3 == 0 else None
        p.produce(topic, f"{tag}-{i}".encode(), None if i % 5 == 0 else f"k{i % 7}".encode(),
                  partition=i % PARTITIONS, headers=headers, on_delivery=check)
    flush(p)
    check.check()
    return PER_ROUND


def split(records: Records) -> tuple[Records, Records]:
    """(originals, copies) of one side, per partition; fails on a record with two hops."""
    originals: Records = {}
    copies: Records = {}
    hops = []
    for tp, recs in records.items():
        originals[tp], copies[tp] = [], []
        for r in recs:
            n = len(header_values(r, ORIGIN_HEADER))
            if n > 1:
                hops.append((tp, r.offset, r.value, r.headers))
            (copies if n else originals)[tp].append(r)
    assert not hops, f"{len(hops)} records replicated more than once (looped): {hops[:3]}"
    return originals, copies


def test_two_way_replication_never_loops(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, kafka_topic_name: str,
    tmp_path: Path, pool: ProcessPool,
) -> None:
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    topic = f"{kafka_topic_name}.both"
    topics = {topic: PARTITIONS}
    create_topics(primary, topics)
    create_topics(standby, topics)
    forward = write_dr_config(tmp_path, store=file_store(tmp_path, "store-a"),
                              source_bootstrap=primary, sink_bootstrap=standby,
                              include=[re.escape(topic)], log_id=unique("forward"),
                              source_name="primary", sink_name="standby")
    back = write_dr_config(tmp_path, store=file_store(tmp_path, "store-b"),
                           source_bootstrap=standby, sink_bootstrap=primary,
                           include=[re.escape(topic)], log_id=unique("back"),
                           source_name="standby", sink_name="primary")
    with checkpoint_watch(standby) as on_standby, checkpoint_watch(primary) as on_primary:
        procs = [pool.ship(forward, "forward"), pool.apply(forward, "forward"),
                 pool.ship(back, "back"), pool.apply(back, "back")]
        for p in procs:
            p.wait_ready()
        produced = {"primary": 0, "standby": 0}
        for round_ in range(3):  # the later rounds land while copies are in flight
            produced["primary"] += produce(primary, topic, f"primary-r{round_}")
            produced["standby"] += produce(standby, topic, f"standby-r{round_}")
        wait_converged(primary, standby, topics, forward, back, on_standby, on_primary, procs)
        for p in procs:
            p.stop_ok()

    on = {"primary": read_topics(primary, [topic]), "standby": read_topics(standby, [topic])}
    parts = {side: split(records) for side, records in on.items()}
    for side, other in (("primary", "standby"), ("standby", "primary")):
        originals, copies = parts[side]
        assert count(originals) == produced[side], \
            f"{side}: {count(originals)} original records, {produced[side]} were produced"
        assert all((r.value or b"").startswith(side.encode()) for recs in originals.values()
                   for r in recs), f"{side}: a record without origin header came from {other}"
        # each record of the other side exactly once, in order, as it is there
        compare_replica(as_source(copies, origin=other), parts[other][0],
                        what=f"copies on the {side} vs originals on the {other}")
        assert count(on[side]) == produced["primary"] + produced["standby"]
    print(f"each side holds {count(on['primary'])} records: "
          f"{produced['primary']} + {produced['standby']}")


def wait_converged(primary: str, standby: str, topics: dict[str, int], forward: DrSetup,
                   back: DrSetup, on_standby: CheckpointWatch, on_primary: CheckpointWatch,
                   procs: list, timeout: float = 90) -> None:
    """Both flows have applied everything their source holds, copies included (which
    their shipper read and skipped), and neither side grew meanwhile: a fixpoint. A loop
    would keep both sides growing and never get here."""
    state: list[str] = []

    def done() -> bool:
        before = (high_watermarks(primary, topics), high_watermarks(standby, topics))
        behind = on_standby.behind(forward, before[0]) + on_primary.behind(back, before[1])
        after = (high_watermarks(primary, topics), high_watermarks(standby, topics))
        state[:] = [f"behind: {behind}", f"ends: {after}"]
        return not behind and before == after

    try:
        wait_for(done, timeout, "both flows to converge", procs, interval=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}\n" + "\n".join(state)) from None
