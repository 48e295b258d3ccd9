"""Helpers for the `drstream ship` integration tests: configs, the shipper as a real
subprocess, reading the log back, reading the primary, and comparing the two.

Everything here talks to real services (Kafka clusters, the moto S3 server) and to the
real `drstream` command; nothing is mocked. The shipper runs in its own process group
with stdout+stderr in a log file; `ShipperPool` (one per test) kills whatever is left at
teardown and prints each shipper's log, which pytest shows only for failing tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewPartitions, NewTopic

from drstream.daemon.codec import Body, KafkaRecord, Manifest
from drstream.daemon.deltalog import DeltaLog, segments_prefix, seq_from_key
from drstream.daemon.keyring import KeyRing, generate_key_file, load_key
from drstream.daemon.plugins import installed
from drstream.daemon.segment import SegmentHeader, decode_segment, read_manifest, segment_digest
from drstream.daemon.store import Store
from tests.infra.procs import RUN_DIR
from tests.infra.stores import store_fields, store_server
from tests.support.procs import DrstreamProcess, drstream, wait_for

ROOT = Path(__file__).resolve().parents[2]
STREAM = "kafka:primary"  # the default source name is "primary"
KEY_ID = "k1"

Records = dict[tuple[str, int], list[KafkaRecord]]


# --------------------------------------------------------------------------- stores


def store_model(fields: dict[str, Any]) -> Any:
    """The typed store config for raw `store:` fields (validated by the connector)."""
    return installed().stores[fields["type"]].config_model.model_validate(fields)


@contextlib.asynccontextmanager
async def _opened(fields: dict[str, Any]) -> Any:
    async with installed().open_store(store_model(fields)) as store:
        yield store


# --------------------------------------------------------------------------- config


@dataclass
class ShipSetup:
    """One shipper identity: its config file, key ring, store and log id."""

    path: Path
    log_id: str
    store: dict[str, Any]
    key_path: Path
    raw: dict[str, Any]

    @property
    def keyring(self) -> KeyRing:
        return KeyRing({KEY_ID: load_key(f"file:{self.key_path}")}, KEY_ID)

    def rewrite(self, **changes: Any) -> None:
        self.raw.update(changes)
        self.path.write_text(yaml.safe_dump(self.raw, sort_keys=False))


def write_config(
    tmp_path: Path,
    *,
    store: dict[str, Any],
    bootstrap: str,
    include: list[str],
    exclude: list[str] | None = None,
    log_id: str = "itest",
    ship: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    name: str = "ship.yaml",
    key_path: Path | None = None,
) -> ShipSetup:
    """Write a ship config (and a new key file unless `key_path` is given)."""
    if key_path is None:
        key_path = tmp_path / f"{log_id}-{uuid.uuid4().hex[:6]}.key"
        generate_key_file(key_path)
    topics: dict[str, Any] = {"include": include}
    if exclude:
        topics["exclude"] = exclude
    raw: dict[str, Any] = {
        "log_id": log_id,
        "store": store,
        "keyring": {"active": KEY_ID, "keys": {KEY_ID: f"file:{key_path}"}},
        "sources": [{"type": "kafka", "bootstrap_servers": bootstrap, "topics": topics,
                     "connect_timeout_s": 20, **(source or {})}],
        "ship": {"heartbeat_interval_s": 2, "flush_interval_s": 0.25, **(ship or {})},
        "logging": {"level": "info", "format": "json"},
        # an ephemeral port: several shippers (and other tests) run on one host at once
        "service": {"ship_metrics_listen": "127.0.0.1:0"},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return ShipSetup(path, log_id, store, key_path, raw)


# --------------------------------------------------------------------------- processes


class ShipProcess(DrstreamProcess):
    """`drstream ship --config PATH` (tests/support/procs.py)."""

    def __init__(self, setup: ShipSetup, log_path: Path, label: str) -> None:
        super().__init__(["ship", "--config", str(setup.path)], log_path, label)
        self.setup = setup


class ShipperPool:
    """Shippers started by one test; at exit kills survivors and prints every log."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "shippers"
        self.started: list[ShipProcess] = []

    def start(self, setup: ShipSetup, label: str | None = None) -> ShipProcess:
        label = label or f"{len(self.started) + 1}"
        proc = ShipProcess(setup, self.dir / f"ship-{label}.log", label)
        self.started.append(proc)
        return proc

    def __enter__(self) -> ShipperPool:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.started:
            proc.reap()
        # Captured and shown by pytest only when the test fails.
        for proc in self.started[-6:]:
            print(proc.describe(60))


@contextlib.contextmanager
def shipper_pool(tmp_path: Path) -> Iterator[ShipperPool]:
    with ShipperPool(tmp_path) as pool:
        yield pool


# --------------------------------------------------------------------------- the log


@dataclass
class Segment:
    seq: int
    header: SegmentHeader
    body: Body
    size: int

    @property
    def manifest(self) -> Manifest:
        return self.body.manifest


async def _read_segments(fields: dict[str, Any], log_id: str, keyring: KeyRing) -> list[Segment]:
    async with _opened(fields) as store:
        keys = [k async for k in store.list(segments_prefix(log_id))]
        seqs = [seq_from_key(k) for k in keys]
        assert None not in seqs, f"objects other than segments under logs/{log_id}/: {keys}"
        log = DeltaLog(store, log_id)
        out: list[Segment] = []
        prev = bytes(32)
        for i, seq in enumerate(seqs, start=1):
            assert seq == i, f"log {log_id}: segment seq {seq} found where {i} was expected " \
                             f"(gap or orphan); seqs {seqs[:5]}..{seqs[-5:]}"
            data = await log.fetch(seq)
            assert data is not None, f"segment {seq} vanished while reading"
            header, body = decode_segment(data, keyring, expect_log_id=log_id, expect_seq=seq)
            assert header.prev_digest == prev, f"log {log_id}: chain broken at seq {seq}: " \
                "its prev_digest is not the digest of the segment before it"
            prev = segment_digest(data)
            out.append(Segment(seq, header, body, len(data)))
        return out


def read_segments(fields: dict[str, Any], log_id: str, keyring: KeyRing) -> list[Segment]:
    """Every segment of the log in seq order, decoded; checks seqs 1..n and the chain."""
    return asyncio.run(_read_segments(fields, log_id, keyring))


def records_of(segments: Iterable[Segment], stream: str = STREAM) -> Records:
    """Records per (topic, partition) in log order; checks manifests against records."""
    out: Records = {}
    last_positions: dict[str, dict[str, int]] = {}
    for seg in segments:
        positions = seg.manifest.positions.get(stream, {})
        for b in seg.body.batches:
            if getattr(b, "stream", None) != stream or not hasattr(b, "records"):
                continue
            out.setdefault((b.topic, b.partition), []).extend(b.records)
            if b.records:
                pos = positions.get(b.topic, {}).get(str(b.partition))
                assert pos is not None and pos >= b.records[-1].offset + 1, (
                    f"seq {seg.seq}: manifest position {pos} of {b.topic}[{b.partition}] is "
                    f"not past its last record (offset {b.records[-1].offset})")
        for topic, parts in last_positions.items():
            for p, before in parts.items():
                now = positions.get(topic, {}).get(p)
                assert now is not None and now >= before, (
                    f"seq {seg.seq}: position of {topic}[{p}] went from {before} to {now}")
        last_positions = {t: dict(ps) for t, ps in positions.items()}
    return out


def read_log(fields: dict[str, Any], log_id: str, keyring: KeyRing) -> Records:
    """(topic, partition) -> records, decoding every segment in seq order (chain checked)."""
    return records_of(read_segments(fields, log_id, keyring))


async def _head(fields: dict[str, Any], log_id: str, keyring: KeyRing
                ) -> tuple[int | None, Manifest | None]:
    async with _opened(fields) as store:
        log = DeltaLog(store, log_id)
        head = await log.head_seq()
        if head is None:
            return None, None
        data = await log.fetch(head)
        if data is None:
            return head, None
        _, manifest = read_manifest(data, keyring, expect_log_id=log_id, expect_seq=head)
        return head, manifest


def log_head(fields: dict[str, Any], log_id: str, keyring: KeyRing
             ) -> tuple[int | None, Manifest | None]:
    """(head seq, its manifest); (None, None) for an empty log."""
    return asyncio.run(_head(fields, log_id, keyring))


def positions_reached(manifest: Manifest | None, targets: dict[tuple[str, int], int]
                      ) -> list[str]:
    """What is still behind: 'topic[p] at X < Y' for each target not reached."""
    positions = manifest.positions.get(STREAM, {}) if manifest else {}
    behind = []
    for (topic, p), want in sorted(targets.items()):
        have = positions.get(topic, {}).get(str(p))
        if have is None or have < want:
            behind.append(f"{topic}[{p}] at {have} < {want}")
    return behind


def wait_log_reaches(
    setup: ShipSetup, targets: dict[tuple[str, int], int], timeout: float = 60,
    shipper: ShipProcess | None = None,
) -> int:
    """Wait until the durable head's positions are >= targets; returns the head seq."""
    deadline = time.monotonic() + timeout
    keyring = setup.keyring
    behind: list[str] = ["(log empty)"]
    while time.monotonic() < deadline:
        head, manifest = log_head(setup.store, setup.log_id, keyring)
        behind = positions_reached(manifest, targets)
        if head is not None and not behind:
            return head
        if shipper is not None and not shipper.alive():
            raise AssertionError(f"shipper exited while the log was behind: {behind[:5]}\n"
                                 f"{shipper.describe()}")
        time.sleep(0.25)
    msg = f"log did not catch up in {timeout:.0f}s; behind: {behind[:8]}"
    if shipper is not None:
        msg += "\n" + shipper.describe()
    raise AssertionError(msg)


def next_offsets(records: Records) -> dict[tuple[str, int], int]:
    """The position a log must reach to hold all of `records`: last offset + 1."""
    return {tp: recs[-1].offset + 1 for tp, recs in records.items() if recs}


def verify_deep(setup: ShipSetup) -> None:
    res = drstream("verify", "--config", str(setup.path), "--deep")
    assert res.returncode == 0, f"drstream verify --deep exited {res.returncode}\n" \
                                f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"


# --------------------------------------------------------------------------- Kafka


def create_topic(bootstrap: str, name: str, partitions: int = 1,
                 config: dict[str, str] | None = None) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})  # must outlive its futures
    admin.create_topics([NewTopic(name, partitions, 1, config=config or {})],
                        operation_timeout=30)[name].result(timeout=60)
    wait_partitions(admin, name, partitions)


def add_partitions(bootstrap: str, name: str, total: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_partitions([NewPartitions(name, total)], operation_timeout=30)[name].result(
        timeout=60)
    wait_partitions(admin, name, total)


def wait_partitions(admin: AdminClient, name: str, count: int, timeout: float = 30) -> None:
    """Wait until metadata shows `count` partitions, each with a leader."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        md = admin.list_topics(topic=name, timeout=10).topics.get(name)
        if md is not None and md.error is None and len(md.partitions) == count and all(
                p.leader >= 0 for p in md.partitions.values()):
            return
        time.sleep(0.1)
    raise AssertionError(f"topic {name} did not show {count} partitions in {timeout}s")


def topic_configs(bootstrap: str, name: str) -> dict[str, str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    res = ConfigResource(ConfigResource.Type.TOPIC, name)
    entries = admin.describe_configs([res])[res].result(timeout=30)
    return {k: e.value for k, e in entries.items()}


def producer(bootstrap: str, **conf: Any) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5, **conf})


def flush(p: Producer, timeout: float = 60) -> None:
    left = p.flush(timeout)
    assert left == 0, f"{left} records still unsent after {timeout}s"


class DeliveryCheck:
    """on_delivery callback that remembers the first error (a lost produce fails the test)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.delivered = 0

    def __call__(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self.errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")
        else:
            self.delivered += 1

    def check(self) -> None:
        assert not self.errors, f"{len(self.errors)} produce errors, first: {self.errors[0]}"


def produce_numbered(bootstrap: str, topic: str, n: int, tag: str) -> None:
    """n records "tag-0", "tag-1", ... into partition 0 of `topic`, each delivery checked."""
    check, p = DeliveryCheck(), producer(bootstrap)
    for i in range(n):
        p.produce(topic, f"{tag}-{i}".encode(), partition=0, on_delivery=check)
    flush(p)
    check.check()


def read_primary(bootstrap: str, topics: Iterable[str], timeout: float = 60) -> Records:
    """Every committed record of `topics`, from the beginning to the current end.

    read_committed, manual assignment of every partition. The end of a partition is its
    high watermark at the start; a transactional partition usually ends with a commit or
    abort marker that is never delivered, so a partition is done when the consumer's
    position reaches the watermark, at partition EOF, or after a quiet period.
    """
    topics = list(topics)
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"shiplib-check-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "isolation.level": "read_committed",
        "fetch.wait.max.ms": 100,
    })
    out: Records = {}
    try:
        md = consumer.list_topics(timeout=30)
        tps: list[TopicPartition] = []
        for topic in topics:
            t = md.topics.get(topic)
            assert t is not None and t.error is None, f"topic {topic} not on the primary"
            tps += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(t.partitions)]
        ends: dict[tuple[str, int], int] = {}
        for tp in tps:
            low, high = consumer.get_watermark_offsets(tp, timeout=30)
            out[(tp.topic, tp.partition)] = []
            if high > low:
                ends[(tp.topic, tp.partition)] = high
        if not ends:
            return out
        consumer.assign([tp for tp in tps if (tp.topic, tp.partition) in ends])
        deadline = time.monotonic() + timeout
        last_progress = time.monotonic()
        pending = set(ends)
        while pending and time.monotonic() < deadline:
            msgs = consumer.consume(1000, 0.2)
            for m in msgs:
                tp = (m.topic(), m.partition())
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        if m.offset() >= ends.get(tp, 0):
                            pending.discard(tp)
                        continue
                    raise AssertionError(f"consume error on {tp}: {err}")
                ts_type, ts = m.timestamp()
                out[tp].append(KafkaRecord(m.offset(), ts, ts_type, m.key(), m.value(),
                                           m.headers() or []))
                last_progress = time.monotonic()
            if msgs:
                positions = consumer.position(
                    [TopicPartition(t, p) for t, p in pending])
                for tp in positions:
                    if tp.offset >= ends[(tp.topic, tp.partition)]:
                        pending.discard((tp.topic, tp.partition))
            if pending and time.monotonic() - last_progress > 5:
                break  # only markers left: nothing more is readable
        return out
    finally:
        consumer.close()


# --------------------------------------------------------------------------- comparing


def _short(v: object, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


_FIELDS = ("offset", "key", "value", "headers", "timestamp", "timestamp_type")


def _norm_headers(h: Any) -> list[tuple[str, bytes | None]]:
    return [(k, v) for k, v in (h or [])]


def _offset_summary(name: str, recs: list[KafkaRecord]) -> str:
    offsets = [r.offset for r in recs]
    dups = len(offsets) - len(set(offsets))
    unordered = sum(1 for a, b in itertools.pairwise(offsets) if b <= a)
    span = f"{offsets[0]}..{offsets[-1]}" if offsets else "-"
    return f"{name}: {len(recs)} records, offsets {span}, {dups} duplicate offsets, " \
           f"{unordered} out-of-order steps"


def compare_records(log: Records, primary: Records, *, what: str = "log vs primary") -> None:
    """Assert record-by-record equality per partition; report the first difference only."""
    problems: list[str] = []
    for tp in sorted(set(log) | set(primary)):
        got, want = log.get(tp, []), primary.get(tp, [])
        if not got and not want:
            continue
        where = f"{tp[0]}[{tp[1]}]"
        for i, (g, w) in enumerate(zip(got, want, strict=False)):
            for f in _FIELDS:
                gv, wv = getattr(g, f), getattr(w, f)
                if f == "headers":
                    gv, wv = _norm_headers(gv), _norm_headers(wv)
                if gv != wv:
                    problems.append(
                        f"{where} record #{i}: {f} differs: log {_short(gv)} != primary "
                        f"{_short(wv)} (log offset {g.offset}, primary offset {w.offset})\n"
                        f"    {_offset_summary('log', got)}\n"
                        f"    {_offset_summary('primary', want)}")
                    break
            else:
                continue
            break
        else:
            if len(got) != len(want):
                n = min(len(got), len(want))
                extra = got[n] if len(got) > n else want[n]
                side = "log has extra" if len(got) > n else "log is missing"
                problems.append(
                    f"{where}: {side} records from #{n} (offset {extra.offset}); "
                    f"log {len(got)} vs primary {len(want)} records\n"
                    f"    {_offset_summary('log', got)}\n"
                    f"    {_offset_summary('primary', want)}")
    if problems:
        total_log = sum(len(v) for v in log.values())
        total_primary = sum(len(v) for v in primary.values())
        head = f"{what}: {len(problems)} partitions differ ({total_log} records in the log, " \
               f"{total_primary} on the primary)"
        raise AssertionError("\n".join([head, *problems[:10]]))


# --------------------------------------------------------------------------- load


@dataclass
class LoadProducer:
    """A background thread producing to every partition of `topics` until stopped.

    Idempotent producer for plain records; every `txn_every` records a small transaction
    through a transactional producer, one in `abort_every` of them aborted (after a flush,
    so the aborted records really are in the partition log).
    """

    bootstrap: str
    topics: dict[str, int]  # topic -> partitions
    rate_per_s: float = 800
    txn_every: int = 200
    abort_every: int = 3
    seed: int = 0
    produced: int = 0
    transactions: int = 0
    aborted: int = 0
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    check: DeliveryCheck = field(default_factory=DeliveryCheck)

    def start(self) -> LoadProducer:
        self._thread = threading.Thread(target=self._run, name="load-producer", daemon=True)
        self._thread.start()
        return self

    def halt(self) -> None:
        """Stop producing (without waiting); `stop()` then joins and checks."""
        self._stop.set()

    def stop(self, timeout: float = 60) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "load producer did not stop"
        if self.error is not None:
            raise AssertionError(f"load producer failed: {self.error!r}") from self.error
        self.check.check()

    def wait_produced(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.produced < count and time.monotonic() < deadline:
            if self.error is not None:
                raise AssertionError(f"load producer failed: {self.error!r}")
            time.sleep(0.05)
        assert self.produced >= count, f"only {self.produced} records produced in {timeout}s"

    def _run(self) -> None:
        import random

        rng = random.Random(self.seed)
        targets = [(t, p) for t, n in self.topics.items() for p in range(n)]
        plain = producer(self.bootstrap, **{"enable.idempotence": True})
        txp = producer(self.bootstrap, **{"transactional.id": f"load-{uuid.uuid4().hex[:8]}"})
        try:
            txp.init_transactions(60)
            started = time.monotonic()
            n = 0
            while not self._stop.is_set():
                topic, p = targets[n % len(targets)]
                key = None if n % 7 == 0 else f"k{rng.randrange(50)}".encode()
                value = None if n % 31 == 0 else f"v{n}-".encode() * rng.randrange(1, 6)
                headers = [("seq", str(n).encode()), ("dup", b"a"), ("dup", None)] \
                    if n % 5 == 0 else None
                plain.produce(topic, value, key, partition=p, headers=headers,
                              on_delivery=self.check)
                plain.poll(0)
                n += 1
                self.produced = n
                if n % self.txn_every == 0:
                    self._transaction(txp, targets, n)
                # pace: n records should take n / rate seconds
                ahead = n / self.rate_per_s - (time.monotonic() - started)
                if ahead > 0:
                    self._stop.wait(ahead)
            flush(plain)
        except BaseException as e:
            self.error = e
        finally:
            with contextlib.suppress(Exception):
                plain.flush(30)

    def _transaction(self, txp: Producer, targets: list[tuple[str, int]], n: int) -> None:
        self.transactions += 1
        abort = self.transactions % self.abort_every == 0
        txp.begin_transaction()
        for i, (topic, p) in enumerate(targets):
            value = f"{'aborted' if abort else 'txn'}-{n}-{i}".encode()
            txp.produce(topic, value, f"t{i}".encode(), partition=p, on_delivery=self.check)
        if abort:
            flush(txp)
            txp.abort_transaction(60)
            self.aborted += 1
        else:
            txp.commit_transaction(60)


__all__ = [
    "RUN_DIR", "STREAM", "DeliveryCheck", "LoadProducer", "Records", "Segment", "ShipProcess",
    "ShipSetup", "ShipperPool", "Store", "add_partitions", "compare_records", "create_topic",
    "drstream", "flush", "log_head", "next_offsets", "producer", "read_log", "read_primary",
    "read_segments", "records_of", "shipper_pool", "store_fields", "store_server", "topic_configs",
    "verify_deep", "wait_for", "wait_log_reaches", "wait_partitions", "write_config",
]
