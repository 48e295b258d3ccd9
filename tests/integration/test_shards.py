"""A log set of 3 shards, each a `drstream ship --shard K` and `drstream apply --shard K`
process on this host (docs/shards.md), against real Kafka clusters and the file store.

1. While a producer writes (plain records and transactions, one in three aborted), random
   shards' ship or apply processes are killed with SIGKILL at random moments and started
   again; afterwards the standby equals the primary record by record on every partition,
   every shard applied exactly the partitions it owns, and consumer groups committed on
   the primary on every partition fail over exactly (`drstream failover` over the set).
2. A shard whose log is damaged (a segment removed from its middle, a bit flipped) or
   fenced (another deployment's ship took it over) is named by `drstream status` (exit 1)
   while the other shards keep shipping and applying, record by record.
3. `drstream shards change` from 2 to 3 shards under load: the standby equals the primary,
   groups fail over exactly, and `replay --until` before and after the change is exact.
The seed is printed; DRSTREAM_TEST_SEED=N replays a schedule.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drstream.daemon.keyring import generate_key_file
from drstream.daemon.layout import segment_key
from drstream.daemon.shards import shard_log_id, shard_of
from tests.infra.kafka import KafkaCluster
from tests.infra.stores import store_fields
from tests.integration.applylib import (
    TP,
    CheckpointWatch,
    DrSetup,
    ProcessPool,
    Records,
    as_source,
    checkpoint_watch,
    commit_group,
    compare_replica,
    count,
    create_topics,
    flip_body_byte,
    next_offsets,
    process_pool,
    read_topics,
    seeded_rng,
    segment_path,
    unique,
    write_dr_config,
)
from tests.integration.shiplib import LoadProducer
from tests.integration.test_apply_groups import check_group, wait_groups_synced
from tests.integration.test_replay import read_target, rfc3339, until_time
from tests.support.procs import DrstreamProcess, drstream, show, wait_for

pytestmark = pytest.mark.integration

SHARDS = 3
KILLS, QUICK_KILLS = 10, 5  # make soak, make test (the suite's time budget)
RATE = 300  # records/s: a 2-core host also runs both brokers and 6 drstream processes
SHIP = {"heartbeat_interval_s": 1, "flush_interval_s": 0.1, "max_bytes": 4096,
        "max_in_flight": 4}


class ShardProcess(DrstreamProcess):
    """`drstream ship|apply --config PATH --shard K` (or K/N)."""

    def __init__(self, command: str, setup: DrSetup, shard: int | str, log_path: Path,
                 label: str) -> None:
        super().__init__([command, "--config", str(setup.path), "--shard", str(shard)],
                         log_path, label)
        self.shard = shard


def start(pool: ProcessPool, command: str, setup: DrSetup, shard: int | str,
          label: str) -> ShardProcess:
    proc = ShardProcess(command, setup, shard, pool.dir / f"{command}-{label}.log", label)
    pool.started.append(proc)  # type: ignore[arg-type]  # reaped and shown like the others
    return proc


def shard_view(setup: DrSetup, shard: int, count: int = SHARDS) -> DrSetup:
    """The set's flow as shard `shard` runs it: its own log, hence its own checkpoint."""
    raw = {**setup.raw, "log_id": shard_log_id(setup.log_id, shard, count)}
    return DrSetup(setup.path, raw)


def owned(targets: dict[TP, int], shard: int, count: int = SHARDS) -> dict[TP, int]:
    return {tp: o for tp, o in targets.items() if shard_of(tp[0], tp[1], count) == shard}


def spread_topics(primary: str, label: str, partitions: int = 4,
                  counts: tuple[int, ...] = (SHARDS,)) -> dict[str, int]:
    """Two topics whose partitions give every shard at least one, for each set size."""
    while True:
        base = unique(label)
        topics = {f"{base}.a": partitions, f"{base}.b": partitions}
        if all({shard_of(t, p, n) for t, c in topics.items() for p in range(c)} == set(range(n))
               for n in counts):
            create_topics(primary, topics)
            return topics


def set_setup(tmp_path: Path, primary: str, standby: str, topics: dict[str, int],
              group_prefix: str, count: int = SHARDS, store: dict[str, Any] | None = None
              ) -> DrSetup:
    base = next(iter(topics)).rsplit(".", 1)[0]
    setup = write_dr_config(
        tmp_path, store=store or {"type": "file", "path": str(tmp_path / "store")},
        source_bootstrap=primary, sink_bootstrap=standby,
        include=[re.escape(base) + r"\..*"], log_id=unique("shards"), ship=SHIP,
        source={"groups": {"include": [re.escape(group_prefix) + r"-.*"]}},
        apply={"group_sync_interval_s": 1})
    setup.rewrite(shards={"count": count})
    return setup


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    return store_fields(request.param, request, tmp_path)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


class ShardKiller:
    """Keeps every shard's ship and apply running; kills a random one of them after a
    random delay (counted from its spawn or from its 'started' line) and starts it again."""

    def __init__(self, pool: ProcessPool, setup: DrSetup, rng: random.Random) -> None:
        self.pool, self.setup, self.rng = pool, setup, rng
        self.procs = {(role, k): start(pool, role, setup, k, f"{role}-{k}-0")
                      for role in ("ship", "apply") for k in range(SHARDS)}
        self.kills: list[tuple[str, int]] = []

    def run(self, kills: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while len(self.kills) < kills:
            assert time.monotonic() < deadline, f"only {len(self.kills)} kills in {timeout}s"
            role, k = self.rng.choice(sorted(self.procs))
            proc = self.procs[role, k]
            if self.rng.random() < 0.5:
                wait_for(proc.ready, 60, f"{role} shard {k} started", [proc])
            time.sleep(self.rng.uniform(0.2, 2.0))
            for other in self.procs.values():
                assert other.alive(), f"{other.label} died\n{other.describe()}"
            proc.kill()
            self.kills.append((role, k))
            print(f"kill {len(self.kills)}: {role} shard {k}")
            self.procs[role, k] = start(self.pool, role, self.setup, k,
                                        f"{role}-{k}-{len(self.kills)}")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.stop_ok()


def wait_every_shard(watch: CheckpointWatch, setup: DrSetup, targets: dict[TP, int],
                     procs: list[ShardProcess], count: int = SHARDS) -> None:
    for k in range(count):
        watch.wait_applied(shard_view(setup, k, count), owned(targets, k, count), timeout=120,
                           procs=procs)  # type: ignore[arg-type]


def standby_equal_and_failover_exact(setup: DrSetup, standby: str, topics: dict[str, int],
                                     source: Records, group: str, committed: dict[TP, int],
                                     what: str) -> list[dict[str, object]]:
    """The standby equals the primary record by record; `drstream failover` over the set
    commits `group` exactly on every partition. Returns failover's per-shard reports."""
    replica = read_topics(standby, topics)
    compare_replica(as_source(replica, origin="primary"), source,
                    what=f"standby vs primary {what}")
    print(f"{count(replica)} records on the standby, each exactly once, in order")
    res = drstream("failover", "--config", str(setup.path), "--json")
    assert res.returncode == 0, show(res)
    problems = check_group(standby, group, committed, source)
    assert not problems, "\n".join(problems)
    reports: list[dict[str, object]] = json.loads(res.stdout)
    return reports


def test_three_shards_kill9_exactly_once_and_exact_group_failover(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path,
    pool: ProcessPool, store: dict[str, Any], soak: bool,
) -> None:
    rng = seeded_rng()
    kills = KILLS if soak else QUICK_KILLS
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    topics = spread_topics(primary, "shards")
    prefix = unique("sg")
    setup = set_setup(tmp_path, primary, standby, topics, prefix, store=store)
    with checkpoint_watch(standby) as watch:
        load = LoadProducer(primary, topics, rate_per_s=RATE, seed=rng.randrange(2**31))
        load.start()
        try:
            load.wait_produced(100)
            killer = ShardKiller(pool, setup, rng)
            killer.run(kills)
        finally:
            load.halt()
        load.stop()
        print(f"produced {load.produced} records, {load.transactions} transactions "
              f"({load.aborted} aborted); kills {killer.kills}")
        source = read_topics(primary, topics)
        # a group on every partition, committed mid-partition on the primary
        group = f"{prefix}-consumers"
        committed = {tp: recs[len(recs) // 2].offset for tp, recs in source.items()}
        commit_group(primary, group, committed)
        procs = list(killer.procs.values())
        wait_every_shard(watch, setup, next_offsets(source), procs)
        wait_groups_synced(standby, {group: committed}, procs)
        killer.stop_all()

    # every shard applied only its own partitions, under its own log and checkpoint
    with checkpoint_watch(standby) as watch:
        watch._start = None  # read the checkpoint topic from its beginning
        for k in range(SHARDS):
            cp = watch.get(shard_view(setup, k).checkpoint_key)
            assert cp is not None, f"no checkpoint of shard {k}"
            applied = {(t, int(p)) for t, parts in cp["positions"][setup.stream].items()
                       for p in parts}
            assert applied == set(owned(next_offsets(source), k)), f"shard {k}: {applied}"

    reports = standby_equal_and_failover_exact(setup, standby, topics, source, group,
                                               committed, "after kills of random shards")
    logs = [shard_log_id(setup.log_id, k, SHARDS) for k in range(SHARDS)]
    assert [r["log_id"] for r in reports] == logs
    # the set's other commands: every shard's log verified deep, drilled, pruned dry
    res = drstream("verify", "--config", str(setup.path), "--deep", "--json")
    assert res.returncode == 0, show(res)
    assert [r["log_id"] for r in json.loads(res.stdout)] == logs
    res = drstream("drill", "--config", str(setup.path), "--json")
    assert res.returncode == 0, show(res)
    assert [d["log_id"] for d in json.loads(res.stdout)] == logs
    res = drstream("prune", "--config", str(setup.path), "--older-than", "1d", "--dry-run")
    assert res.returncode == 0, show(res)
    assert all(f"prune of log {log_id}" in res.stdout for log_id in logs), show(res)


def take_over_config(setup: DrSetup, tmp_path: Path) -> DrSetup:
    """The same flow under another deployment's key: its ship reads the log (it holds the
    old key too) and writes on with a key this deployment does not hold (split brain)."""
    key = tmp_path / "other-deployment.key"
    generate_key_file(key)
    keys = {**setup.raw["keyring"]["keys"], "k-other": f"file:{key}"}
    other = DrSetup(tmp_path / "other-deployment.yaml",
                    {**setup.raw, "keyring": {"active": "k-other", "keys": keys}})
    other.rewrite()
    return other


def harm_shard(harm: str, setup: DrSetup, pool: ProcessPool,
               procs: dict[tuple[str, int], ShardProcess], tmp_path: Path) -> list[str]:
    """Harm shard 1's log; returns what status must name besides the shard and its log."""
    log_id = shard_view(setup, 1).log_id
    store = tmp_path / "store"
    if harm == "removed":  # a segment deleted from the middle: a gap
        wait_for(lambda: segment_path(store, log_id, 4).exists(), 60, "4 segments of shard 1")
        segment_path(store, log_id, 2).unlink()
        return ["missing", "seq 2"]
    if harm == "tampered":  # one bit flipped in a segment the apply has not reached: MAC
        procs["apply", 1].stop_ok()
        res = drstream("status", "--config", str(setup.path), "--shard", "1", "--json")
        [sink] = json.loads(res.stdout)["shards"]["shard 1/3"]["sinks"].values()
        applied = sink["applied_seq"]
        wait_for(lambda: segment_path(store, log_id, applied + 2).exists(), 60,
                 "shard 1's ship two segments past its apply")
        flip_body_byte(store, log_id, applied + 1)
        key = segment_key(log_id, applied + 1)
        # the apply shard, started again, stops at that segment naming it
        again = start(pool, "apply", setup, 1, "apply-1-again")
        procs["apply", 1] = again
        assert again.wait_exit(60) == 3 and key in again.output(), again.describe()
        return ["damaged", f"seq {applied + 1} object {key}", "authentication failed",
                f"cannot apply past seq {applied}"]
    assert harm == "taken_over"
    # Our ship stalls (a pause, a partition from the store) while another deployment's ship
    # of shard 1 takes the log over; resumed, ours finds its next seq written: fenced.
    fenced = procs["ship", 1]
    os.killpg(fenced.pid, signal.SIGSTOP)
    try:
        stalled_at = max(int(p.stem) for p in (store / "logs" / log_id).glob("*.seg"))
        other = start(pool, "ship", take_over_config(setup, tmp_path), 1, "other-ship-1")
        wait_for(lambda: segment_path(store, log_id, stalled_at + 3).exists(), 60,
                 "the other deployment's ship writing shard 1's log", [other])
    finally:
        os.killpg(fenced.pid, signal.SIGCONT)
    assert fenced.wait_exit(60) == 3, fenced.describe()
    assert "another writer is using log_id" in fenced.output(), fenced.describe()
    assert other.alive(), other.describe()
    return ["k-other", f"object {segment_key(log_id, 0).rsplit('/', 1)[0]}/"]


@pytest.mark.parametrize("harm", ["removed", "tampered", "taken_over"])
def test_status_names_a_damaged_or_fenced_shard_while_the_others_keep_going(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path,
    pool: ProcessPool, harm: str,
) -> None:
    """Shard 1's log loses a segment from its middle, has a bit flipped in the segment its
    apply reads next, or is taken over by another deployment's ship while ours stalls
    (ours is fenced, the log goes on under a key we do not hold). `drstream status` exits
    1 naming shard 1, its log and the segment, and only shard 1; shards 0 and 2 replicate
    what is produced after the harm, record by record."""
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    topics = spread_topics(primary, f"shard-{harm}")
    setup = set_setup(tmp_path, primary, standby, topics, unique("sg"))
    load = LoadProducer(primary, topics, rate_per_s=100, txn_every=10**9).start()
    procs = {(role, k): start(pool, role, setup, k, f"{role}-{k}")
             for role in ("ship", "apply") for k in range(SHARDS)}
    healthy = [p for (_, k), p in procs.items() if k != 1]
    try:
        for proc in procs.values():
            wait_for(proc.ready, 60, f"{proc.label} started", [proc])
        ok = drstream("status", "--config", str(setup.path))
        assert ok.returncode == 0, show(ok)
        assert f"set {setup.log_id} of 3 shards: OK" in ok.stdout, show(ok)

        harmed = shard_view(setup, 1).log_id
        with checkpoint_watch(standby) as watch:
            named = harm_shard(harm, setup, pool, procs, tmp_path)
            after_harm = next_offsets(read_topics(primary, topics))
            res = drstream("status", "--config", str(setup.path))
            assert res.returncode == 1, show(res)
            assert f"PROBLEMS in shard 1/3 (log {harmed});" in res.stdout, show(res)
            problem = next((line for line in res.stdout.splitlines()
                            if "PROBLEM " in line and harmed in line), "")
            assert all(n in problem for n in named), f"{named} not all in {problem!r}\n" \
                + show(res)
            doc = drstream("status", "--config", str(setup.path), "--json")
            assert doc.returncode == 1, show(doc)
            report = json.loads(doc.stdout)
            assert report["failing_shards"] == ["shard 1/3"], show(doc)
            for k in (0, 2):
                shard = report["shards"][f"shard {k}/3"]
                assert shard["ok"] and shard["log_id"] == shard_log_id(setup.log_id, k, 3)
            assert any(harmed in p for p in report["shards"]["shard 1/3"]["problems"])
            narrowed = drstream("status", "--config", str(setup.path), "--shard", "2", "--json")
            assert narrowed.returncode == 0, show(narrowed)
            assert list(json.loads(narrowed.stdout)["shards"]) == ["shard 2/3"]

            # shards 0 and 2 go on: what is produced after the harm reaches the standby
            load.wait_produced(load.produced + 300)
            target = next_offsets(read_topics(primary, topics))
            for k in (0, 2):
                assert sum(owned(target, k).values()) > sum(owned(after_harm, k).values())
                watch.wait_applied(shard_view(setup, k), owned(target, k), timeout=60,
                                   procs=healthy)  # type: ignore[arg-type]
    finally:
        load.halt()
        load.stop()
    source, replica = read_topics(primary, topics), read_topics(standby, topics)
    keep = {tp: end for k in (0, 2) for tp, end in owned(target, k).items()}
    compare_replica(upto(as_source(replica, origin="primary"), keep), upto(source, keep),
                    what=f"standby vs primary on shards 0 and 2 after shard 1 was {harm}")


def upto(records: Records, ends: dict[TP, int]) -> Records:
    """The records of the partitions in `ends`, below each one's end offset."""
    return {tp: [r for r in recs if r.offset < ends[tp]] for tp, recs in records.items()
            if tp in ends}


def replay_until(setup: DrSetup, standby: str, cut_ms: int, source: Records) -> None:
    """`drstream replay --until` over the set (walking from the logs before the count
    change into those after it) equals the primary's records up to the cut."""
    suffix = f".pitr-{unique('x')[-10:]}"
    res = drstream("replay", "--config", str(setup.path), "--until", rfc3339(cut_ms),
                   "--target-bootstrap", standby, "--rename", "{topic}" + suffix,
                   "--name", unique("pitr"))
    assert res.returncode == 0, show(res)
    expected = until_time(source, cut_ms)
    assert 0 < count(expected) < count(source), "the cut falls inside the load"
    compare_replica(read_target(standby, source, suffix), expected,
                    what=f"replay --until {rfc3339(cut_ms)} across the count change")


def test_shard_count_change_2_to_3_under_load(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path,
    pool: ProcessPool,
) -> None:
    """Two shards run under load; their ships and applies stop, `drstream shards change
    --to 3` seals both logs and starts three exactly at their positions. The new set
    starts while the old applies are still down: the new applies wait for them (nothing
    of a partition is written before the old log's records of it); the old applies come
    back and finish their logs. The standby equals the primary record by record, groups
    fail over exactly on every partition, a ship of the old set refuses to start, and
    replays to a time before and after the change are exact."""
    rng = seeded_rng()
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    topics = spread_topics(primary, "reshard", counts=(2, 3))
    prefix = unique("sg")
    setup = set_setup(tmp_path, primary, standby, topics, prefix, count=2)
    load = LoadProducer(primary, topics, rate_per_s=RATE, seed=rng.randrange(2**31)).start()
    try:
        ships = [start(pool, "ship", setup, k, f"old-ship-{k}") for k in range(2)]
        old_applies = [start(pool, "apply", setup, f"{k}/2", f"old-apply-{k}")
                       for k in range(2)]
        for proc in ships + old_applies:
            wait_for(proc.ready, 60, f"{proc.label} started", [proc])
        load.wait_produced(300)
        before_ms = int(time.time() * 1000)
        load.wait_produced(load.produced + 300)
        for proc in ships + old_applies:
            proc.stop_ok()
        res = drstream("shards", "change", "--config", str(setup.path), "--to", "3", "--json")
        assert res.returncode == 0, show(res)
        report = json.loads(res.stdout)
        assert sorted(report["sealed"]) == [shard_log_id(setup.log_id, k, 2) for k in (0, 1)]
        setup.rewrite(shards={"count": 3})
        refused = drstream("ship", "--config", str(setup.path), "--shard", "1/2")
        assert refused.returncode == 3 and "handed over to a set of 3" in refused.stderr, \
            show(refused)
        new = [start(pool, role, setup, k, f"new-{role}-{k}")
               for role in ("ship", "apply") for k in range(3)]
        for proc in new[3:]:
            proc.wait_output('"handover_waiting"')
        old_applies = [start(pool, "apply", setup, f"{k}/2", f"old-apply-again-{k}")
                       for k in range(2)]
        for proc in new[3:]:
            proc.wait_output('"handover_taken"')
        load.wait_produced(load.produced + 600)
        after_ms = int(time.time() * 1000)
        load.wait_produced(load.produced + 300)
    finally:
        load.halt()
    load.stop()
    source = read_topics(primary, topics)
    group = f"{prefix}-after-change"
    committed = {tp: recs[len(recs) // 3].offset for tp, recs in source.items()}
    commit_group(primary, group, committed)
    with checkpoint_watch(standby) as watch:
        wait_every_shard(watch, setup, next_offsets(source), new, count=3)
    wait_groups_synced(standby, {group: committed}, new)
    for proc in new + old_applies:
        proc.stop_ok()
    standby_equal_and_failover_exact(setup, standby, topics, source, group, committed,
                                     "across the 2 -> 3 change")
    replay_until(setup, standby, before_ms, source)
    replay_until(setup, standby, after_ms, source)
