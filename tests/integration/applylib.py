"""Helpers for the `drstream apply` integration tests: configs for ship + apply, both
commands as real subprocesses, following the checkpoint topic, reading a cluster's topics
read_committed, and comparing a replica with its source record by record.

Nothing is mocked: real Kafka clusters (tests/infra), real stores, the real `drstream`
command. Each process runs in its own process group with its output in a log file; a
`ProcessPool` (one per test) kills what is left at teardown and prints every log, which
pytest shows only when the test failed.

Replicated records carry two headers that the sink adds: `drstream.origin` (the source
cluster's name) and `drstream.offset` (the record's offset on the source). `as_source()`
checks them and turns a replica back into what the source holds (headers stripped, the
offset replaced by the source offset), so replica and source compare field by field,
offset included: a duplicate, a gap or a reordering shows up as a source-offset mismatch.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from drstream.daemon.codec import KafkaRecord
from drstream.daemon.keyring import KeyRing, generate_key_file, load_key
from drstream.daemon.segment import parse_header
from tests.integration.shiplib import (
    log_head,
    positions_reached,
    read_primary,
    read_segments,
)
from tests.support.procs import DrstreamProcess, drstream, show, wait_for

ROOT = Path(__file__).resolve().parents[2]
KEY_ID = "k1"
CHECKPOINT_TOPIC = "drstream.checkpoints"
ORIGIN_HEADER = "drstream.origin"
OFFSET_HEADER = "drstream.offset"
DYNAMIC_TOPIC_CONFIG = 1  # ConfigSource of a config set on the topic itself

TP = tuple[str, int]
Records = dict[TP, list[KafkaRecord]]


def seeded_rng() -> random.Random:
    """Seeded randomness; the seed is printed (DRSTREAM_TEST_SEED=N replays a run)."""
    seed = int(os.environ.get("DRSTREAM_TEST_SEED") or time.time_ns() % 2**31)
    print(f"random seed {seed} (replay with DRSTREAM_TEST_SEED={seed})")
    return random.Random(seed)


def unique(label: str) -> str:
    """A name no other test of the session uses (log ids, groups, topics)."""
    return f"{label}-{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- configs


@dataclass
class DrSetup:
    """One replication flow: a config file that `ship` and `apply` both take."""

    path: Path
    raw: dict[str, Any]

    @property
    def log_id(self) -> str:
        return str(self.raw["log_id"])

    @property
    def source_name(self) -> str:
        return str(self.raw["sources"][0]["name"])

    @property
    def sink_name(self) -> str:
        return str(self.raw["sinks"][0]["name"])

    @property
    def stream(self) -> str:
        return f"kafka:{self.source_name}"

    @property
    def checkpoint_key(self) -> str:
        """Key of this flow's checkpoint records in drstream.checkpoints."""
        return f"{self.log_id}/{self.sink_name}"

    @property
    def keyring(self) -> KeyRing:
        return KeyRing({KEY_ID: load_key(self.raw["keyring"]["keys"][KEY_ID])}, KEY_ID)

    def rewrite(self, **changes: Any) -> None:
        self.raw.update(changes)
        self.path.write_text(yaml.safe_dump(self.raw, sort_keys=False))


def write_dr_config(
    tmp_path: Path, *, store: dict[str, Any], source_bootstrap: str, sink_bootstrap: str,
    include: list[str], log_id: str | None = None, source_name: str = "primary",
    sink_name: str = "standby", source: dict[str, Any] | None = None,
    sink: dict[str, Any] | None = None, ship: dict[str, Any] | None = None,
    apply: dict[str, Any] | None = None,
) -> DrSetup:
    """Write a config for one flow source cluster -> log -> sink cluster (new key file)."""
    log_id = log_id or unique("apply")
    key_path = tmp_path / f"{log_id}.key"
    generate_key_file(key_path)
    raw: dict[str, Any] = {
        "log_id": log_id,
        "store": store,
        "keyring": {"active": KEY_ID, "keys": {KEY_ID: f"file:{key_path}"}},
        "sources": [{"type": "kafka", "name": source_name, "bootstrap_servers": source_bootstrap,
                     "topics": {"include": include}, "discovery_interval_s": 1,
                     "connect_timeout_s": 20, **(source or {})}],
        "ship": {"heartbeat_interval_s": 1, "flush_interval_s": 0.2, **(ship or {})},
        "sinks": [{"type": "kafka", "name": sink_name, "bootstrap_servers": sink_bootstrap,
                   "source": f"kafka:{source_name}", "connect_timeout_s": 20, **(sink or {})}],
        "apply": {"poll_max_s": 0.5, **(apply or {})},
        # several ships/applies (and other test sessions) share this host: no fixed ports
        "service": {"ship_metrics_listen": None, "apply_metrics_listen": None},
        "logging": {"level": "info", "format": "json"},
    }
    path = tmp_path / f"{log_id}.yaml"
    setup = DrSetup(path, raw)
    setup.rewrite()
    return setup


def file_store(tmp_path: Path, name: str = "store") -> dict[str, Any]:
    return {"type": "file", "path": str(tmp_path / name)}


# --------------------------------------------------------------------------- processes

class DrProcess(DrstreamProcess):
    """`drstream ship|apply --config PATH` (tests/support/procs.py)."""

    def __init__(self, command: str, setup: DrSetup, log_path: Path, label: str) -> None:
        super().__init__([command, "--config", str(setup.path)], log_path, label)
        self.setup = setup


class ProcessPool:
    """Every ship/apply process a test started; at exit kills survivors, prints logs."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "procs"
        self.started: list[DrProcess] = []

    def start(self, command: str, setup: DrSetup, label: str = "") -> DrProcess:
        label = label or f"{setup.log_id}-{len(self.started) + 1}"
        proc = DrProcess(command, setup, self.dir / f"{command}-{label}.log", label)
        self.started.append(proc)
        return proc

    def ship(self, setup: DrSetup, label: str = "") -> DrProcess:
        return self.start("ship", setup, label)

    def apply(self, setup: DrSetup, label: str = "") -> DrProcess:
        return self.start("apply", setup, label)

    def close(self) -> None:
        for proc in self.started:
            proc.reap()
        # Captured by pytest and shown only for a failing test.
        for proc in self.started[-8:]:
            print(proc.describe(60))


@contextlib.contextmanager
def process_pool(tmp_path: Path) -> Iterator[ProcessPool]:
    pool = ProcessPool(tmp_path)
    try:
        yield pool
    finally:
        pool.close()


class ReplayProcess(DrstreamProcess):
    """`drstream replay ...`: `args` are the command line after the program name."""

    def wait(self, timeout: float) -> int:
        rc = self.wait_exit(timeout)
        if rc is None:
            self.kill()
            raise AssertionError(f"replay still running after {timeout:.0f}s\n"
                                 f"{self.output()[-3000:]}")
        return rc


def drill(setup: DrSetup, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`drstream drill --config PATH <extra> --json`: the finished command and its report."""
    res = drstream("drill", "--config", str(setup.path), *extra, "--json")
    try:
        report = json.loads(res.stdout)
    except ValueError:
        raise AssertionError(f"drill --json printed no JSON report: {show(res)}") from None
    return res, report


# --------------------------------------------------------------------------- logs


def wait_log_has(setup: DrSetup, targets: dict[TP, int], procs: Iterable[DrProcess],
                 timeout: float = 120) -> int:
    """Wait until the durable head's positions cover `targets`; returns the head seq."""
    found = [0]

    def reached() -> bool:
        head, manifest = log_head(setup.raw["store"], setup.log_id, setup.keyring)
        found[0] = head or 0
        return head is not None and not positions_reached(manifest, targets)

    wait_for(reached, timeout, f"log {setup.log_id} to hold every produced record", procs,
             interval=0.3)
    return found[0]


def copy_log(raw: dict[str, Any], tmp_path: Path) -> tuple[DrSetup, Path]:
    """A config for a private copy of the file store of the log that config `raw` names
    (same log id, key and sinks), and the copy's path."""
    dst = tmp_path / f"store-{uuid.uuid4().hex[:6]}"
    shutil.copytree(Path(raw["store"]["path"]), dst)
    raw = json.loads(json.dumps(raw))
    raw["store"]["path"] = str(dst)
    setup = DrSetup(tmp_path / f"copy-{uuid.uuid4().hex[:6]}.yaml", raw)
    setup.rewrite()
    return setup, dst


def segment_path(store: Path, log_id: str, seq: int) -> Path:
    """Where a file store keeps segment `seq` of a log."""
    return store / "logs" / log_id / f"{seq:020d}.seg"


def flip_body_byte(store: Path, log_id: str, seq: int) -> None:
    """Tamper with a segment in a file store: flip one bit in the middle of its body
    (inside the ciphertext, not the tag)."""
    path = segment_path(store, log_id, seq)
    data = bytearray(path.read_bytes())
    header, header_len = parse_header(bytes(data))
    data[header_len + header.body_len // 2] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- Kafka


def create_topics(bootstrap: str, topics: dict[str, int],
                  configs: dict[str, dict[str, str]] | None = None) -> None:
    """Create topics (name -> partitions) and wait until each partition has a leader."""
    admin = AdminClient({"bootstrap.servers": bootstrap})  # must outlive its futures
    new = [NewTopic(t, n, 1, config=(configs or {}).get(t, {})) for t, n in topics.items()]
    for fut in admin.create_topics(new, operation_timeout=30).values():
        fut.result(timeout=60)
    for name, count in topics.items():
        wait_for(lambda n=name, c=count: partition_count(admin, n) == c, 30,
                 f"{name} to show {count} partitions")


def partition_count(admin: AdminClient, topic: str) -> int | None:
    md = admin.list_topics(topic=topic, timeout=10).topics.get(topic)
    if md is None or md.error is not None:
        return None
    if not all(p.leader >= 0 for p in md.partitions.values()):
        return None
    return len(md.partitions)


def topic_exists(bootstrap: str, topic: str) -> bool:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    return topic in admin.list_topics(timeout=10).topics


def topic_partitions(bootstrap: str, topic: str) -> int | None:
    return partition_count(AdminClient({"bootstrap.servers": bootstrap}), topic)


def own_topic_configs(bootstrap: str, topic: str) -> dict[str, str]:
    """The configs set on the topic itself (not broker or static defaults)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entries = admin.describe_configs([res])[res].result(timeout=30)
    return {k: e.value for k, e in entries.items()
            if e.source == DYNAMIC_TOPIC_CONFIG and e.value is not None}


def set_topic_config(bootstrap: str, topic: str, configs: dict[str, str]) -> None:
    """Set configs on a topic (incremental SET), waiting for the result."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry

    admin = AdminClient({"bootstrap.servers": bootstrap})
    entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
               for k, v in configs.items()]
    res = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=entries)
    for fut in admin.incremental_alter_configs([res]).values():
        fut.result(timeout=30)


def delete_topic_config(bootstrap: str, topic: str, name: str) -> None:
    """Remove a config override from a topic (incremental DELETE): back to the default."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry

    admin = AdminClient({"bootstrap.servers": bootstrap})
    entry = ConfigEntry(name, None, incremental_operation=AlterConfigOpType.DELETE)
    res = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[entry])
    for fut in admin.incremental_alter_configs([res]).values():
        fut.result(timeout=30)


def high_watermarks(bootstrap: str, topics: dict[str, int]) -> dict[TP, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("applylib-hw")})
    try:
        return {(t, p): int(consumer.get_watermark_offsets(TopicPartition(t, p), timeout=30)[1])
                for t, n in topics.items() for p in range(n)}
    finally:
        consumer.close()


def read_topics(bootstrap: str, topics: Iterable[str], timeout: float = 60) -> Records:
    """Every committed record of `topics` (read_committed, from the beginning to the
    current end), per partition in offset order."""
    return read_primary(bootstrap, topics, timeout)


def read_uncommitted_offsets(bootstrap: str, topic: str, partition: int) -> list[int]:
    """Offsets of every data record (aborted ones included, markers not) of a partition."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": unique("applylib-uncommitted"),
        "enable.auto.commit": False, "isolation.level": "read_uncommitted",
        "enable.partition.eof": True, "fetch.wait.max.ms": 100,
    })
    tp = TopicPartition(topic, partition)
    try:
        _, high = consumer.get_watermark_offsets(tp, timeout=30)
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
        offsets: list[int] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for m in consumer.consume(500, 0.3):
                err = m.error()
                if err is None:
                    offsets.append(m.offset())
                elif err.code() == KafkaError._PARTITION_EOF and m.offset() >= high:
                    return offsets
            [pos] = consumer.position([tp])
            if pos.offset >= high:
                return offsets
        raise AssertionError(f"could not read {topic}[{partition}] up to offset {high}")
    finally:
        consumer.close()


# --------------------------------------------------------------------------- replicas


def header_values(r: KafkaRecord, name: str) -> list[bytes | None]:
    return [v for k, v in (r.headers or []) if k == name]


def as_source(records: Records, *, origin: str, topic_map: dict[str, str] | None = None
              ) -> Records:
    """Replica records back in source form: checks that each carries exactly one
    drstream.origin == `origin` and one drstream.offset, strips every drstream.* header and
    puts the source offset in `offset`. `topic_map` renames replica topics to source ones."""
    out: Records = {}
    problems: list[str] = []
    for (topic, p), recs in records.items():
        src_topic = (topic_map or {}).get(topic, topic)
        rows = out.setdefault((src_topic, p), [])
        for r in recs:
            origins, offsets = header_values(r, ORIGIN_HEADER), header_values(r, OFFSET_HEADER)
            if origins != [origin.encode()] or len(offsets) != 1 or offsets[0] is None:
                problems.append(f"{topic}[{p}]@{r.offset}: origin headers {origins}, offset "
                                f"headers {offsets} (want one origin {origin!r}, one offset)")
                continue
            headers = [(k, v) for k, v in (r.headers or []) if not k.startswith("drstream.")]
            rows.append(KafkaRecord(int(offsets[0]), r.timestamp, r.timestamp_type, r.key,
                                    r.value, headers))
    if problems:
        raise AssertionError(f"{len(problems)} replica records lack proper provenance "
                             "headers:\n" + "\n".join(problems[:10]))
    return out


def _short(v: object, limit: int = 70) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


def _summary(name: str, recs: list[KafkaRecord]) -> str:
    offsets = [r.offset for r in recs]
    dups = len(offsets) - len(set(offsets))
    back = sum(1 for a, b in itertools.pairwise(offsets) if b <= a)
    span = f"{offsets[0]}..{offsets[-1]}" if offsets else "-"
    return f"{name}: {len(recs)} records, source offsets {span}, {dups} duplicates, " \
           f"{back} out-of-order steps"


FIELDS = ("offset", "key", "value", "headers", "timestamp", "timestamp_type")


def compare_replica(replica: Records, source: Records, *, what: str) -> None:
    """Assert per-partition equality, record by record, every field; replica records must
    already be in source form (as_source). Reports the first difference per partition."""
    problems: list[str] = []
    for tp in sorted(set(replica) | set(source)):
        got, want = replica.get(tp, []), source.get(tp, [])
        where = f"{tp[0]}[{tp[1]}]"
        for i, (g, w) in enumerate(zip(got, want, strict=False)):
            diff = next((f for f in FIELDS if _field(g, f) != _field(w, f)), None)
            if diff is not None:
                problems.append(
                    f"{where} record #{i}: {diff} differs: replica {_short(_field(g, diff))} "
                    f"!= source {_short(_field(w, diff))} (source offsets {g.offset} vs "
                    f"{w.offset})\n    {_summary('replica', got)}\n    "
                    f"{_summary('source', want)}")
                break
        else:
            if len(got) != len(want):
                n = min(len(got), len(want))
                side = "replica has extra" if len(got) > n else "replica is missing"
                first = (got if len(got) > n else want)[n]
                problems.append(
                    f"{where}: {side} records from #{n} (source offset {first.offset}); "
                    f"{len(got)} vs {len(want)}\n    {_summary('replica', got)}\n    "
                    f"{_summary('source', want)}")
    if problems:
        total_r = sum(len(v) for v in replica.values())
        total_s = sum(len(v) for v in source.values())
        raise AssertionError(f"{what}: {len(problems)} partitions differ ({total_r} records "
                             f"replicated, {total_s} on the source)\n" + "\n".join(problems[:10]))


def _field(r: KafkaRecord, name: str) -> Any:
    value = getattr(r, name)
    if name == "headers":
        return [(k, v) for k, v in (value or [])]
    return value


def count(records: Records) -> int:
    return sum(len(v) for v in records.values())


def next_offsets(records: Records) -> dict[TP, int]:
    """Per partition, one past the last record: what a checkpoint must cover."""
    return {tp: recs[-1].offset + 1 for tp, recs in records.items() if recs}


# --------------------------------------------------------------------------- checkpoints


class CheckpointWatch:
    """Follows the checkpoint topic of a cluster (read_committed) and keeps the newest
    checkpoint per key. Starts at the topic's current end (or its beginning if it does
    not exist yet), so create it before the apply whose checkpoints it should see."""

    def __init__(self, bootstrap: str, topic: str = CHECKPOINT_TOPIC,
                 from_beginning: bool = False) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.latest: dict[bytes, dict[str, Any]] = {}
        self._consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": unique("applylib-ckpt"),
            "enable.auto.commit": False, "isolation.level": "read_committed",
            "enable.partition.eof": True, "fetch.wait.max.ms": 50,
        })
        self._assigned = False
        self._start: int | None = None
        if not from_beginning and self._exists():
            _, high = self._consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=30)
            self._start = int(high)

    def _exists(self) -> bool:
        md = self._consumer.list_topics(topic=self.topic, timeout=10).topics.get(self.topic)
        return md is not None and md.error is None and len(md.partitions) > 0

    def poll(self) -> None:
        if not self._assigned:
            if not self._exists():
                return
            start = OFFSET_BEGINNING if self._start is None else self._start
            self._consumer.assign([TopicPartition(self.topic, 0, start)])
            self._assigned = True
        while True:
            msgs = self._consumer.consume(2000, 0.3)
            if not msgs:
                return
            eof = False
            for m in msgs:
                err = m.error()
                if err is not None:
                    eof = eof or err.code() == KafkaError._PARTITION_EOF
                    continue
                key, value = m.key(), m.value()
                if key is not None and value is not None:
                    self.latest[key] = json.loads(value)
            if eof:
                return

    def get(self, key: str) -> dict[str, Any] | None:
        self.poll()
        return self.latest.get(key.encode())

    def positions(self, setup: DrSetup) -> dict[str, dict[str, int]]:
        cp = self.get(setup.checkpoint_key)
        return (cp or {}).get("positions", {}).get(setup.stream, {})

    def behind(self, setup: DrSetup, targets: dict[TP, int]) -> list[str]:
        positions = self.positions(setup)
        out = []
        for (topic, p), want in sorted(targets.items()):
            have = positions.get(topic, {}).get(str(p))
            if have is None or have < want:
                out.append(f"{topic}[{p}] at {have} < {want}")
        return out

    def wait_applied(self, setup: DrSetup, targets: dict[TP, int], timeout: float = 90,
                     procs: Iterable[DrProcess] = ()) -> dict[str, Any]:
        """Wait until the flow's checkpoint covers `targets` (source next offsets)."""
        behind: list[str] = []

        def done() -> bool:
            nonlocal behind
            behind = self.behind(setup, targets)
            return not behind

        try:
            wait_for(done, timeout, f"apply of {setup.log_id} to cover the source", procs,
                     interval=0.3)
        except AssertionError as e:
            raise AssertionError(f"{e}\nstill behind: {behind[:8]}") from None
        cp = self.get(setup.checkpoint_key)
        assert cp is not None
        return cp

    def close(self) -> None:
        self._consumer.close()


@contextlib.contextmanager
def checkpoint_watch(bootstrap: str) -> Iterator[CheckpointWatch]:
    watch = CheckpointWatch(bootstrap)
    try:
        yield watch
    finally:
        watch.close()


# --------------------------------------------------------------------------- groups


COORDINATOR_ERRORS = (KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                      KafkaError.COORDINATOR_NOT_AVAILABLE)


def group_offsets(bootstrap: str, group: str, partitions: Iterable[TP]) -> dict[TP, int]:
    """Committed offsets of a consumer group on `partitions` (those with an offset).

    Through a consumer of the group (committed(), which neither joins nor changes it),
    not AdminClient.list_consumer_group_offsets: librdkafka 2.x crashes the process in
    that call when the broker answers NOT_COORDINATOR (confluentinc/librdkafka#5040),
    which a freshly started cluster does."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    tps = [TopicPartition(t, p) for t, p in partitions]
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                got = consumer.committed(tps, timeout=30)
                return {(tp.topic, tp.partition): tp.offset for tp in got if tp.offset >= 0}
            except KafkaException as e:  # coordinator moving or loading: ask again
                if time.monotonic() > deadline or e.args[0].code() not in COORDINATOR_ERRORS:
                    raise
                time.sleep(0.2)
    finally:
        consumer.close()


def commit_group(bootstrap: str, group: str, offsets: dict[TP, int]) -> None:
    """Commit `offsets` for `group` synchronously, as a consumer of that group would."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        result = consumer.commit(offsets=tps, asynchronous=False)
        assert result is not None and all(tp.error is None for tp in result), result
    finally:
        consumer.close()


def first_records_of_group(bootstrap: str, group: str, topics: list[str], want: set[TP],
                           timeout: float = 60) -> dict[TP, KafkaRecord]:
    """Join `group` (subscribe, no auto commit, reset=error) and return the first record
    it receives on each partition of `want`."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
        "auto.offset.reset": "error", "isolation.level": "read_committed",
        "fetch.wait.max.ms": 100,
    })
    first: dict[TP, KafkaRecord] = {}
    errors: list[str] = []
    try:
        consumer.subscribe(topics)
        deadline = time.monotonic() + timeout
        while not want <= set(first) and time.monotonic() < deadline:
            for m in consumer.consume(100, 0.3):
                err = m.error()
                if err is not None:
                    errors.append(f"{m.topic()}[{m.partition()}]: {err}")
                    continue
                tp = (m.topic(), m.partition())
                if tp not in first:
                    ts_type, ts = m.timestamp()
                    first[tp] = KafkaRecord(m.offset(), ts, ts_type, m.key(), m.value(),
                                            m.headers() or [])
        missing = want - set(first)
        assert not missing, f"group {group}: no record on {sorted(missing)} within " \
                            f"{timeout:.0f}s; consumer errors: {errors[:5]}"
        return first
    finally:
        consumer.close()


def log_group_offsets(setup: DrSetup) -> dict[str, dict[str, dict[str, int]]]:
    """Group offsets the log carries so far (every segment decoded, chain checked),
    merged partition by partition in seq order: group -> topic -> partition -> offset."""
    merged: dict[str, dict[str, dict[str, int]]] = {}
    for seg in read_segments(setup.raw["store"], setup.log_id, setup.keyring):
        extra = seg.manifest.extra.get(setup.stream, {})
        for group, topics in extra.get("groups", {}).items():
            for topic, parts in topics.items():
                merged.setdefault(group, {}).setdefault(topic, {}).update(parts)
    return merged


def log_head_seq(setup: DrSetup) -> int:
    """The durable head seq of the flow's log (0 when empty)."""
    return log_head(setup.raw["store"], setup.log_id, setup.keyring)[0] or 0
