"""`drstream replay` rebuilds topics from the log up to a point in time or a seq.

Real primary and standby Kafka clusters, a real file store, the real `drstream ship` and
`drstream replay` processes. The history is made with explicit CreateTime timestamps so
that a cut by time is deterministic; the log is decoded to know what each segment holds.
Every replay writes to the standby under its own `--rename '{topic}.r-<uuid>'`, so each
test starts from fresh target topics, and is compared record by record (source offset,
key, value, headers, timestamp) with what the log says it must hold: exactly those
records, each once, in partition order, nothing more.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from tests.infra.kafka import KafkaCluster
from tests.integration.applylib import (
    KEY_ID,
    CheckpointWatch,
    DrSetup,
    Records,
    ReplayProcess,
    as_source,
    checkpoint_watch,
    compare_replica,
    count,
    create_topics,
    file_store,
    high_watermarks,
    process_pool,
    read_topics,
    seeded_rng,
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
from tests.support.procs import drstream, wait_for

pytestmark = pytest.mark.integration

MAIN_RECORDS = 1000  # timestamps t0 .. t0+999 ms over 3 partitions
OTHER_RECORDS = 100  # timestamps t0, t0+10, .. t0+990 on the second topic
BIG_RECORDS = 200_000
HEADERS: list[tuple[str, bytes | None]] = [("h", b"1"), ("none", None), ("h", b"2")]


# --------------------------------------------------------------------------- helpers


def rfc3339(ms: int) -> str:
    """Milliseconds since the epoch as RFC 3339 with a Z zone."""
    text = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def ok(res: subprocess.CompletedProcess[str], what: str) -> str:
    assert res.returncode == 0, f"{what} exited {res.returncode}\nstdout:\n{res.stdout}\n" \
                                f"stderr:\n{res.stderr[-4000:]}"
    return res.stdout


def topics_with_suffix(bootstrap: str, suffix: str) -> list[str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    return sorted(t for t in admin.list_topics(timeout=10).topics if t.endswith(suffix))


def renamed(records: Records, suffix: str) -> dict[str, str]:
    """target topic -> source topic for a `{topic}<suffix>` rename."""
    return {f"{t}{suffix}": t for t, _ in records}


def read_target(standby: str, expected: Records, suffix: str,
                timeout: float = 90) -> Records:
    """The replayed topics on the standby, back in source form (as_source)."""
    topic_map = renamed(expected, suffix)
    replica = read_topics(standby, sorted(topic_map), timeout)
    return as_source(replica, origin="primary", topic_map=topic_map)


def non_empty(records: Records) -> Records:
    return {tp: recs for tp, recs in records.items() if recs}


def until_time(records: Records, cut_ms: int) -> Records:
    return {tp: [r for r in recs if r.timestamp <= cut_ms] for tp, recs in records.items()}


def only_topics(records: Records, topics: set[str]) -> Records:
    return {tp: recs for tp, recs in records.items() if tp[0] in topics}


# --------------------------------------------------------------------------- the history


@dataclass
class History:
    setup: DrSetup
    store_path: Path
    key_path: Path
    main: str
    other: str
    t0: int
    segments: list[Segment]
    records: Records  # every record of the log, per partition in log order

    @property
    def head(self) -> int:
        return self.segments[-1].seq


def ship_history(setup: DrSetup, tmp_path: Path, targets: dict[tuple[str, int], int]) -> None:
    with process_pool(tmp_path) as pool:
        ship = pool.ship(setup, "ship")
        wait_log_has(setup, targets, [ship])
        ship.stop_ok()


@pytest.fixture(scope="module")
def history(primary_kafka: KafkaCluster, standby_kafka: KafkaCluster,
            tmp_path_factory: pytest.TempPathFactory) -> History:
    """Two topics with CreateTime timestamps t0.. (t0 an hour ago, whole seconds), shipped
    by `drstream ship` into small segments, then decoded."""
    tmp = tmp_path_factory.mktemp("replay-history")
    primary = primary_kafka.bootstrap_servers
    main, other = unique("replay-main"), unique("replay-other")
    create_topics(primary, {main: 3, other: 1})
    t0 = (int(time.time()) - 3600) * 1000
    check = DeliveryCheck()
    p = producer(primary, **{"enable.idempotence": True})
    for i in range(MAIN_RECORDS):
        p.produce(main, f"value-{i}".encode() * (1 + i % 3), f"key-{i % 17}".encode(),
                  partition=i % 3, timestamp=t0 + i,
                  headers=HEADERS if i % 10 == 0 else None, on_delivery=check)
        p.poll(0)
    for i in range(OTHER_RECORDS):
        p.produce(other, f"other-{i}".encode(), None if i % 4 == 0 else f"o{i}".encode(),
                  partition=0, timestamp=t0 + 10 * i, on_delivery=check)
    flush(p)
    check.check()
    setup = write_dr_config(tmp, store=file_store(tmp), source_bootstrap=primary,
                            sink_bootstrap=standby_kafka.bootstrap_servers,
                            include=[re.escape(main), re.escape(other)],
                            log_id=unique("replay"), source={"consume_batch": 40},
                            ship={"max_bytes": 2048, "heartbeat_interval_s": 30})
    targets = high_watermarks(primary, {main: 3, other: 1})
    ship_history(setup, tmp, targets)
    segments = read_segments(setup.raw["store"], setup.log_id, setup.keyring)
    records = records_of(segments)
    assert count(records) == MAIN_RECORDS + OTHER_RECORDS, \
        f"the log holds {count(records)} records, {MAIN_RECORDS + OTHER_RECORDS} produced"
    with_records = [s.seq for s in segments if s.manifest.record_count]
    assert len(with_records) >= 6, f"want several segments with records, got {with_records}"
    print(f"history: log {setup.log_id}, {len(segments)} segments, t0 {rfc3339(t0)}")
    return History(setup, Path(setup.raw["store"]["path"]),
                   Path(setup.raw["keyring"]["keys"][KEY_ID].removeprefix("file:")),
                   main, other, t0, segments, records)


# --------------------------------------------------------------------------- tests


def test_replay_until_time_writes_exactly_the_records_up_to_it(
    history: History, standby_kafka: KafkaCluster,
) -> None:
    standby = standby_kafka.bootstrap_servers
    cut = history.t0 + 500
    suffix = f".r-{uuid.uuid4().hex[:10]}"
    out = ok(drstream("replay", "--config", str(history.setup.path), "--until", rfc3339(cut),
                      "--target-bootstrap", standby, "--rename", "{topic}" + suffix,
                      "--name", unique("until")), "replay --until")
    expected = until_time(history.records, cut)
    before, after = count(expected), count(history.records) - count(expected)
    # the cut falls inside every partition of the main topic and inside the other topic
    for tp, recs in history.records.items():
        kept = len(expected[tp])
        assert 0 < kept < len(recs), f"{tp}: the cut keeps {kept} of {len(recs)} records"
    assert before == 501 + 51, f"expected 501 + 51 records up to t0+500, got {before}"
    assert f"through seq {history.head}: wrote {before} records" in out, out
    replica = read_target(standby, history.records, suffix)
    compare_replica(replica, expected, what=f"replay --until {rfc3339(cut)}")
    newest = max(r.timestamp for recs in replica.values() for r in recs)
    assert newest <= cut, f"a record with timestamp {newest} > cut {cut} was replayed"
    print(f"replayed {before} records up to t0+500, {after} later ones left out")


def test_replay_until_seq_writes_exactly_the_segments_up_to_it(
    history: History, standby_kafka: KafkaCluster,
) -> None:
    standby = standby_kafka.bootstrap_servers
    with_records = [s.seq for s in history.segments if s.manifest.record_count]
    n = with_records[len(with_records) // 2]
    expected = records_of(history.segments[:n])
    later = count(history.records) - count(expected)
    assert count(expected) > 0 and later > 0, (n, count(expected), later)
    suffix = f".r-{uuid.uuid4().hex[:10]}"
    out = ok(drstream("replay", "--config", str(history.setup.path), "--until-seq", str(n),
                      "--target-bootstrap", standby, "--rename", "{topic}" + suffix,
                      "--name", unique("seq"), "--parallel", "3"), "replay --until-seq")
    assert f"through seq {n}: wrote {count(expected)} records" in out, out
    replica = read_target(standby, history.records, suffix)
    full = {tp: expected.get(tp, []) for tp in history.records}
    compare_replica(replica, full, what=f"replay --until-seq {n}")
    print(f"replayed segments 1..{n}: {count(expected)} records, {later} later ones left out")


def test_replay_topics_regex_from_store_url_without_config(
    history: History, standby_kafka: KafkaCluster,
) -> None:
    standby = standby_kafka.bootstrap_servers
    suffix = f".r-{uuid.uuid4().hex[:10]}"
    key = f"{KEY_ID}=file:{history.key_path}"
    out = ok(drstream("replay", "--store", f"file://{history.store_path}",
                      "--log-id", history.setup.log_id, "--key", key,
                      "--topics", re.escape(history.main), "--target-bootstrap", standby,
                      "--rename", "{topic}" + suffix, "--name", unique("topics")),
             "replay --store --log-id --key --topics")
    expected = only_topics(history.records, {history.main})
    assert f"wrote {count(expected)} records" in out, out
    replica = read_target(standby, expected, suffix)
    compare_replica(replica, expected, what="replay --topics main")
    assert topics_with_suffix(standby, suffix) == [history.main + suffix], \
        "only the selected topic may be created on the target"


def test_replay_dry_run_reports_counts_and_writes_nothing(
    history: History, standby_kafka: KafkaCluster,
) -> None:
    standby = standby_kafka.bootstrap_servers
    cut = history.t0 + 250
    suffix = f".r-{uuid.uuid4().hex[:10]}"
    name = unique("dry")
    with checkpoint_watch(standby) as watch:
        out = ok(drstream("replay", "--config", str(history.setup.path), "--until", rfc3339(cut),
                      "--target-bootstrap", standby, "--rename", "{topic}" + suffix,
                          "--name", name, "--dry-run"), "replay --dry-run")
        assert watch.get(f"{history.setup.log_id}/replay-{name}") is None, \
            "a dry run wrote a checkpoint"
    expected = non_empty(until_time(history.records, cut))
    assert f"would write {count(expected)} records" in out, out
    for (topic, p), recs in expected.items():
        line = f"  {topic}{suffix}[{p}]: {len(recs)} records"
        assert line in out.splitlines(), f"no {line!r} in the dry-run report:\n{out}"
    assert topics_with_suffix(standby, suffix) == [], "a dry run created target topics"


# --------------------------------------------------------------------------- kill -9


@pytest.fixture
def replays(tmp_path: Path) -> Iterator[list[ReplayProcess]]:
    started: list[ReplayProcess] = []
    yield started
    for r in started:
        if r.alive():
            r.kill()
        else:
            r.forget()
        print(f"--- {r.log_path}:\n{r.output()[-3000:]}")


def applied_seq(watch: CheckpointWatch, key: str) -> int:
    """The seq of the newest committed checkpoint under `key` (0 if none)."""
    cp = watch.get(key)
    return int(cp["seq"]) if cp else 0


def test_replay_killed_and_resumed_writes_each_record_exactly_once(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path,
    replays: list[ReplayProcess],
) -> None:
    rng = seeded_rng()
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    topic = unique("replay-big")
    create_topics(primary, {topic: 4})
    started = time.monotonic()
    check = DeliveryCheck()
    p = producer(primary, **{"enable.idempotence": True, "linger.ms": 20,
                             "queue.buffering.max.messages": 500_000})
    for i in range(BIG_RECORDS):
        p.produce(topic, b"v%d" % i, None, partition=i % 4, on_delivery=check)
        if i % 10_000 == 0:
            p.poll(0)
    flush(p)
    check.check()
    setup = write_dr_config(tmp_path, store=file_store(tmp_path), source_bootstrap=primary,
                            sink_bootstrap=standby, include=[re.escape(topic)],
                            log_id=unique("replay-big"),
                            ship={"max_bytes": 24 * 1024, "heartbeat_interval_s": 30},
                            source={"consume_batch": 200})
    ship_history(setup, tmp_path, high_watermarks(primary, {topic: 4}))
    segments = read_segments(setup.raw["store"], setup.log_id, setup.keyring)
    log_records = records_of(segments)
    head = segments[-1].seq
    assert count(log_records) == BIG_RECORDS, count(log_records)
    print(f"{BIG_RECORDS} records produced and shipped into {head} segments in "
          f"{time.monotonic() - started:.1f}s")

    name = unique("resume")
    suffix = f".r-{uuid.uuid4().hex[:10]}"
    args = ["replay", "--config", str(setup.path), "--target-bootstrap", standby,
            "--rename", "{topic}" + suffix, "--name", name, "--parallel", "2"]
    key = f"{setup.log_id}/replay-{name}"
    # kill at a random moment once segments are being applied (1000 one-transaction
    # segments take several seconds), so the kill lands anywhere in or between transactions
    kill_after = rng.uniform(0.3, 2.0)
    with checkpoint_watch(standby) as watch:
        first = ReplayProcess(args, tmp_path / "replay-1.log")
        replays.append(first)
        run_started = time.monotonic()
        wait_for(lambda: "topics_created" in first.output(), 120,
                 "the replay to start applying", interval=0.02)
        time.sleep(kill_after)
        assert first.alive(), f"replay finished before its kill (log too small?)\n" \
                              f"{first.output()[-3000:]}"
        first.kill()
        at_kill = applied_seq(watch, key)
    print(f"replay killed (-9) after {time.monotonic() - run_started:.1f}s at applied seq "
          f"{at_kill} of {head} ({kill_after:.2f}s after the first apply)")
    assert 0 < at_kill < head, (at_kill, head)

    second = ReplayProcess(args, tmp_path / "replay-2.log")
    replays.append(second)
    rc = second.wait(180)
    out = second.output()
    assert rc == 0, f"resumed replay exited {rc}\n{out[-3000:]}"
    assert f"through seq {head}:" in out, out[-3000:]
    resumed = int(re.search(r"wrote (\d+) records", out).group(1))  # type: ignore[union-attr]
    assert resumed < BIG_RECORDS, f"the resumed replay rewrote everything ({resumed})"
    replica = read_target(standby, log_records, suffix, timeout=120)
    compare_replica(replica, log_records, what="replay killed with -9 and resumed")
    print(f"resumed replay wrote {resumed} records; {count(replica)} on the target, each once")
