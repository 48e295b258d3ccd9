"""Crashes: `kill -9` of apply (and of ship and apply together) never loses or duplicates.

While a producer writes continuously to 2 topics x 3 partitions of the primary (plain
idempotent records, transactions, one in three aborted), `drstream apply` is killed with
SIGKILL at random moments and started again; in the second test `drstream ship` and
`drstream apply` are both killed, each on its own random schedule; in the third, the
durable-tip channel between them (ship's HTTP port, daemon/tip.py) dies mid-stream in
every way (black-holed, refused, ship killed) while ship keeps writing. apply follows
ship's tip in all three, so a kill of ship also kills the channel. Small segments keep
uploads and apply transactions in flight when the kill lands. Afterwards every committed
record of the primary is on the standby exactly once per partition, in order, field by
field (its drstream.offset naming its primary offset), and nothing of an aborted
transaction is. The seed is printed; DRSTREAM_TEST_SEED=N replays a schedule.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra.kafka import KafkaCluster
from tests.infra.procs import free_port
from tests.infra.tcp_proxy import TcpProxy
from tests.integration.applylib import (
    CheckpointWatch,
    DrProcess,
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
    read_uncommitted_offsets,
    seeded_rng,
    unique,
    write_dr_config,
)
from tests.integration.shiplib import LoadProducer
from tests.support.procs import wait_for

pytestmark = pytest.mark.integration

KILLS = 10
RATE = 300  # records/s: a 2-core machine also runs both brokers, ship and apply
# Small segments and short flushes: many segments, so a kill lands mid-transaction often.
SHIP = {"heartbeat_interval_s": 1, "flush_interval_s": 0.1, "max_bytes": 4096,
        "max_in_flight": 4}


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


def setup_flow(primary: str, standby: str, base: str, tmp_path: Path, label: str,
               ship_port: int | None = None, tip_from: str | None = None
               ) -> tuple[dict[str, int], DrSetup]:
    """The flow, with ship's HTTP port fixed (restarts keep it) and apply following
    ship's durable tip there, or at `tip_from` (a proxy in front of it)."""
    topics = {f"{base}.a": 3, f"{base}.b": 3}
    create_topics(primary, topics)
    ship_port = ship_port or free_port()
    setup = write_dr_config(tmp_path, store={"type": "file", "path": str(tmp_path / "store")},
                            source_bootstrap=primary, sink_bootstrap=standby,
                            include=[re.escape(base) + r"\..*"], log_id=unique(label),
                            ship=SHIP, apply={"tip_from": tip_from or "auto"})
    setup.rewrite(service={"ship_metrics_listen": f"127.0.0.1:{ship_port}",
                           "apply_metrics_listen": None})
    return topics, setup


def applied_seq(watch: CheckpointWatch, setup: DrSetup) -> int:
    cp = watch.get(setup.checkpoint_key)
    return int(cp["seq"]) if cp else 0


def finish_and_compare(primary: str, standby: str, topics: dict[str, int], load: LoadProducer,
                       setup: DrSetup, watch: CheckpointWatch, pool: ProcessPool,
                       ship: DrProcess | None, apply: DrProcess | None = None) -> None:
    """Stop the load, let apply and ship (fresh ones unless given alive) catch up, stop
    both, compare all. A live apply is kept: a second one would fence it, and could be
    stopped while still starting up once the first had caught up."""
    load.stop()
    print(f"produced {load.produced} plain records and {load.transactions} transactions "
          f"({load.aborted} aborted)")
    source = read_topics(primary, topics)
    ship = ship if ship is not None and ship.alive() else pool.ship(setup, "ship-final")
    apply = apply if apply is not None and apply.alive() else pool.apply(setup, "apply-final")
    started = time.monotonic()
    watch.wait_applied(setup, next_offsets(source), timeout=120, procs=[ship, apply])
    print(f"final apply caught up in {time.monotonic() - started:.1f}s, "
          f"seq {applied_seq(watch, setup)}")
    ship.stop_ok()
    apply.stop_ok()
    replica = read_topics(standby, topics)
    aborted = [(tp, r.offset) for tp, recs in replica.items() for r in recs
               if (r.value or b"").startswith(b"aborted-")]
    assert not aborted, f"records of aborted transactions on the standby: {aborted[:5]}"
    compare_replica(as_source(replica, origin="primary"), source,
                    what="standby vs primary after the kills")
    # Records of apply transactions that a kill interrupted (aborted by the next apply's
    # fencing) are in the partitions but invisible to read_committed readers.
    written = sum(len(read_uncommitted_offsets(standby, t, p))
                  for t, n in topics.items() for p in range(n))
    print(f"{count(replica)} records on the standby, each exactly once, in order; "
          f"{written - count(replica)} more in apply transactions aborted by the kills")


def test_apply_kill9_at_random_moments_is_exactly_once(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, kafka_topic_name: str,
    tmp_path: Path, pool: ProcessPool,
) -> None:
    rng = seeded_rng()
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    topics, setup = setup_flow(primary, standby, kafka_topic_name, tmp_path, "crash-apply")
    with checkpoint_watch(standby) as watch:
        load = LoadProducer(primary, topics, rate_per_s=RATE, seed=rng.randrange(2**31))
        load.start()
        try:
            ship = pool.ship(setup, "ship")
            load.wait_produced(100)
            seqs = []
            for i in range(KILLS):
                apply = pool.apply(setup, f"apply-{i}")
                # Half timed from the spawn (start-up, fencing, checkpoint read), half
                # from "apply_started" (mid-stream, a transaction likely open).
                anchor = rng.choice(["spawn", "ready"])
                if anchor == "ready":
                    apply.wait_ready()
                delay = rng.uniform(0.2, 2.5)
                time.sleep(delay)
                assert apply.alive(), f"apply died before its kill\n{apply.describe()}"
                apply.kill()
                seqs.append(applied_seq(watch, setup))
                print(f"kill {i + 1}: apply {delay:.2f}s after {anchor}, applied seq "
                      f"{seqs[-1]}, {load.produced} produced")
            assert ship.alive(), ship.describe()
            progressed = sum(1 for a, b in zip([0, *seqs], seqs, strict=False) if b > a)
            assert progressed >= KILLS // 3, f"apply advanced in only {progressed} runs: {seqs}"
        finally:
            load._stop.set()
        finish_and_compare(primary, standby, topics, load, setup, watch, pool, ship)


def test_ship_and_apply_killed_independently_is_exactly_once(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, kafka_topic_name: str,
    tmp_path: Path, pool: ProcessPool,
) -> None:
    rng = seeded_rng()
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    topics, setup = setup_flow(primary, standby, kafka_topic_name, tmp_path, "crash-both")
    with checkpoint_watch(standby) as watch:
        load = LoadProducer(primary, topics, rate_per_s=RATE, seed=rng.randrange(2**31))
        load.start()
        try:
            load.wait_produced(100)
            killer = Killer(pool, setup, rng)
            killer.run(KILLS)
            seq = applied_seq(watch, setup)
            assert seq > 0, "nothing was applied between the kills"
            print(f"applied seq {seq} after {killer.kills} kills")
        finally:
            load._stop.set()
        finish_and_compare(primary, standby, topics, load, setup, watch, pool, None)


class Killer:
    """Keeps one ship and one apply running and kills each on its own random schedule:
    a delay drawn per run, counted from the spawn or from its 'started' log line."""

    def __init__(self, pool: ProcessPool, setup: DrSetup, rng: random.Random) -> None:
        self.pool, self.setup, self.rng = pool, setup, rng
        self.kills = {"ship": 0, "apply": 0}
        self.procs: dict[str, DrProcess] = {}
        self.plan: dict[str, tuple[str, float]] = {}
        self.due: dict[str, float | None] = {}
        for command in self.kills:
            self._spawn(command)

    def _spawn(self, command: str) -> None:
        proc = self.pool.start(command, self.setup, f"{command}-{self.kills[command]}")
        anchor = self.rng.choice(["spawn", "ready"])
        delay = self.rng.uniform(0.2, 2.5)
        self.procs[command], self.plan[command] = proc, (anchor, delay)
        self.due[command] = proc.started_at + delay if anchor == "spawn" else None

    def run(self, kills: int, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while min(self.kills.values()) < kills:
            assert time.monotonic() < deadline, f"only {self.kills} kills in {timeout:.0f}s"
            now = time.monotonic()
            for command, proc in self.procs.items():
                if self.kills[command] >= kills:
                    continue
                assert proc.alive(), f"{command} died before its kill\n{proc.describe()}"
                anchor, delay = self.plan[command]
                if self.due[command] is None and proc.ready():
                    self.due[command] = now + delay
                due = self.due[command]
                if due is not None and now >= due:
                    proc.kill()
                    self.kills[command] += 1
                    print(f"kill {command} #{self.kills[command]}: {delay:.2f}s after {anchor}")
                    self._spawn(command)
            time.sleep(0.02)
        for command, proc in self.procs.items():
            assert proc.alive(), f"{command} died\n{proc.describe()}"
            proc.kill()  # the last runs are interrupted too; finish starts fresh ones


def test_tip_channel_dying_mid_stream_falls_back_to_probing_exactly_once(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, kafka_topic_name: str,
    tmp_path: Path, pool: ProcessPool,
) -> None:
    """apply hears ship's durable tip through a proxy; the channel is black-holed (ship's
    keep-alives stop: silence), refused, and finally ship itself is killed, each while
    ship writes on. Each time apply says the channel is down, keeps applying by probing
    the store, and takes the channel back once it is there again."""
    rng = seeded_rng()
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    ship_port = free_port()
    proxy = TcpProxy(ship_port).start()
    try:
        topics, setup = setup_flow(primary, standby, kafka_topic_name, tmp_path, "tip",
                                   ship_port, tip_from=f"127.0.0.1:{proxy.port}")
        with checkpoint_watch(standby) as watch:
            load = LoadProducer(primary, topics, rate_per_s=RATE, seed=rng.randrange(2**31))
            load.start()
            try:
                ship, apply = pool.ship(setup, "ship"), pool.apply(setup, "apply")
                channel = ChannelLog(apply)
                channel.wait("up", 1)
                load.wait_produced(100)
                for n, (outage, heal) in enumerate([(proxy.blackhole, proxy.pass_through),
                                                    (proxy.refuse, proxy.pass_through)]):
                    outage()
                    channel.wait("down", n + 1)
                    applies_meanwhile(watch, setup, [ship, apply])
                    heal()
                    channel.wait("up", n + 2)
                ship.kill()  # the channel's ship side dies with it
                channel.wait("down", 3)
                ship = pool.ship(setup, "ship-after-kill")
                channel.wait("up", 4)
                applies_meanwhile(watch, setup, [ship, apply])
                assert apply.alive(), apply.describe()
            finally:
                load._stop.set()
            finish_and_compare(primary, standby, topics, load, setup, watch, pool, ship, apply)
    finally:
        proxy.stop()


class ChannelLog:
    """apply's tip_channel_up / tip_channel_down log lines."""

    def __init__(self, apply: DrProcess) -> None:
        self.apply = apply

    def count(self, state: str) -> int:
        return self.apply.output().count(f'"tip_channel_{state}"')

    def wait(self, state: str, n: int, timeout: float = 30) -> None:
        wait_for(lambda: self.count(state) >= n, timeout,
                 f"tip channel {state} #{n} in apply's log", [self.apply], interval=0.05)


def applies_meanwhile(watch: CheckpointWatch, setup: DrSetup, procs: list[DrProcess],
                      segments: int = 5) -> None:
    """apply keeps applying the segments ship writes (probing, if the channel is down)."""
    start = applied_seq(watch, setup)
    wait_for(lambda: applied_seq(watch, setup) >= start + segments, 60,
             f"{segments} more segments applied after seq {start}", procs)

