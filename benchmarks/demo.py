"""drstream end to end on one machine: primary Kafka -> ship -> encrypted log -> apply -> standby.

    python -m benchmarks.demo [--seconds 20] [--rate 2000] [--keep]      (or: make demo)

What it demonstrates, in about a minute:

1. Two local single-node Kafka clusters (primary, standby), a work directory with a fresh
   256-bit key and a config for a file store.
2. On the primary: `orders` (6 partitions, retention.ms) and `payments` (3 partitions,
   compacted). The standby starts empty: apply creates the topics itself.
3. `drstream ship` and `drstream apply` run as real subprocesses, logs in the work dir.
4. A paced producer writes keyed JSON values with headers, tombstones on `payments`, and
   every 2 s a transaction, committed and aborted in turn (aborted records are flushed
   into the primary's log first, so read_committed must really filter them out).
5. Once a second: records produced, records durable in the log (the manifests of the
   durable segments), records applied (the standby's checkpoint seq), end-to-end lag of
   the records a read_committed consumer saw on the standby in that second (arrival time -
   record timestamp, which apply preserves) and RPO (now - newest record timestamp
   durable in the log).
6. After the load: wait for the standby to catch up, SIGTERM ship and apply (both must
   exit 0), then compare standby and primary record by record per partition (key, value,
   headers other than drstream.*, timestamp, order). Exit 0 printing
   `standby == primary: OK`, or 1 printing the first differences.

Everything started here is stopped by pid on exit, Ctrl-C included; the work directory
is deleted unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from drstream.daemon.cli import keyring_from_config
from drstream.daemon.config import Config, load_config
from drstream.daemon.deltalog import DeltaLog
from drstream.daemon.keyring import KeyRing, generate_key_file
from drstream.daemon.segment import read_manifest
from drstream.daemon.store import Store
from tests.infra.kafka import KafkaCluster, start_clusters
from tests.infra.procs import Proc, free_port, start_process

ROOT = Path(__file__).resolve().parents[1]
LOG_ID = "demo"
TOPICS = {  # name -> (partitions, topic configs)
    "orders": (6, {"retention.ms": str(7 * 24 * 3600 * 1000)}),
    "payments": (3, {"cleanup.policy": "compact"}),
}
CHECKPOINT_TOPIC = "drstream.checkpoints"
CHECKPOINT_KEY = f"{LOG_ID}/standby".encode()
TXN_EVERY_S = 2.0
CATCH_UP_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 60.0
QUIET = {"log_level": 3}  # librdkafka: errors only (no retry chatter while a cluster warms up)

Row = tuple[bytes | None, bytes | None, tuple[tuple[str, bytes | None], ...], int]


class DemoError(Exception):
    """Something the demo could not do; the message says what and where to look."""


def say(line: str = "") -> None:
    print(line, flush=True)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a sorted, non-empty list."""
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q / 100))]


def now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------- setup


def write_config(work: Path, primary: str, standby: str) -> Path:
    """A key (mode 0600) and a config for ship and apply, both in the work dir."""
    key_path = work / "k1.key"
    generate_key_file(key_path)
    raw = {
        "log_id": LOG_ID,
        "store": {"type": "file", "path": str(work / "log")},
        "keyring": {"active": "k1", "keys": {"k1": f"file:{key_path}"}},
        "sources": [{"type": "kafka", "bootstrap_servers": primary,
                     "topics": {"include": list(TOPICS)}, "discovery_interval_s": 1}],
        "sinks": [{"type": "kafka", "bootstrap_servers": standby}],
        "ship": {"heartbeat_interval_s": 2},
        # free ports: demos and services of other users may run on this host; apply hears
        # ship's durable tip on ship's port (apply.tip_from: auto)
        "service": {"ship_metrics_listen": f"127.0.0.1:{free_port()}",
                    "apply_metrics_listen": f"127.0.0.1:{free_port()}"},
        "logging": {"level": "info", "format": "json"},
    }
    path = work / "drstream.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def create_topics(bootstrap: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, **QUIET})
    new = [NewTopic(name, parts, 1, config=configs) for name, (parts, configs) in TOPICS.items()]
    for future in admin.create_topics(new).values():
        future.result(30)


def start_drstream(command: str, config: Path, work: Path) -> Proc:
    return start_process(
        f"drstream-{command}-demo",
        [sys.executable, "-m", "drstream.daemon.cli", command, "--config", str(config)],
        work / f"{command}.log", env={"PYTHONUNBUFFERED": "1"}, cwd=ROOT)


def wait_for_line(proc: Proc, needle: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in proc.log_tail(200):
            return
        check_alive(proc)
        time.sleep(0.1)
    raise DemoError(f"{proc.name} did not log {needle!r} in {timeout:.0f}s; "
                    f"log {proc.log_path}:\n{proc.log_tail(20)}")


def check_alive(proc: Proc) -> None:
    if not proc.alive():
        raise DemoError(f"{proc.name} exited with {proc.popen.returncode}; "
                        f"log {proc.log_path}:\n{proc.log_tail(20)}")


# --------------------------------------------------------------------------- the load


class LoadProducer(threading.Thread):
    """Produces `rate` records/s for `seconds` s: orders and payments, keyed JSON values,
    headers on most records, tombstones on payments, and every TXN_EVERY_S a transaction
    of 15 records over both topics, committed and aborted in turn."""

    def __init__(self, bootstrap: str, rate: int, seconds: float) -> None:
        super().__init__(name="demo-producer", daemon=True)
        self.rate, self.seconds = rate, seconds
        self.rng = random.Random(7)
        self.plain = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                               "linger.ms": 5, **QUIET})
        self.txn = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5,
                             "transactional.id": "drstream-demo-load", **QUIET})
        self.txn.init_transactions(60)
        self.acked = self.txn_committed = self.txn_aborted = 0
        self.errors: list[str] = []
        self.failure: BaseException | None = None
        self.finished = threading.Event()
        self._halt = threading.Event()

    @property
    def produced(self) -> int:
        """Records a read_committed consumer of the primary can see."""
        return self.acked + self.txn_committed

    def stop(self) -> None:
        """Stop producing and let go of the producers (before their cluster goes away)."""
        self._halt.set()
        if self.is_alive():
            self.join(35)
        self.plain = self.txn = None  # type: ignore[assignment]

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by the main thread
            self.failure = e
        finally:
            self.finished.set()

    def _run(self) -> None:
        started, sent, txns = time.monotonic(), 0, 0
        while not self._halt.is_set():
            elapsed = time.monotonic() - started
            if elapsed >= self.seconds:
                break
            while sent < int(elapsed * self.rate):
                self._produce(self.plain, self._record(sent), self._acked)
                sent += 1
            if elapsed >= (txns + 1) * TXN_EVERY_S:
                self._transaction(commit=txns % 2 == 0)
                txns += 1
            self.plain.poll(0)
            time.sleep(0.005)
        if self.plain.flush(30):
            self.errors.append("records still undelivered 30 s after the load")

    def _record(self, i: int, extra: list[tuple[str, bytes]] | None = None) -> dict[str, Any]:
        rng = self.rng
        headers = list(extra or [])
        if rng.random() < 0.7:
            topic = "orders"
            key = f"order-{rng.randrange(20_000)}"
            value: bytes | None = json.dumps({
                "id": key, "seq": i, "sku": f"sku-{rng.randrange(500)}",
                "qty": rng.randrange(1, 9), "price": round(rng.uniform(1, 300), 2),
                "status": rng.choice(["new", "paid", "shipped"])}).encode()
            headers.append(("event", b"order." + rng.choice([b"created", b"updated"])))
            if rng.random() < 0.2:
                headers.append(("trace-id", rng.randbytes(8).hex().encode()))
        else:
            topic = "payments"
            key = f"pay-{rng.randrange(1_000)}"
            value = None if rng.random() < 0.1 else json.dumps({  # 10% tombstones
                "id": key, "seq": i, "amount": round(rng.uniform(1, 900), 2),
                "currency": rng.choice(["EUR", "USD"])}).encode()
            if rng.random() < 0.5:
                headers.append(("source", b"billing"))
        return {"topic": topic, "key": key.encode(), "value": value,
                "headers": headers or None}

    def _produce(self, producer: Producer, record: dict[str, Any],
                 on_delivery: Callable[[Any, Any], None] | None = None) -> None:
        while True:
            try:  # CreateTime = produce time
                producer.produce(**record, timestamp=now_ms(), on_delivery=on_delivery)
                return
            except BufferError:
                producer.poll(0.05)

    def _acked(self, err: KafkaError | None, _msg: Any) -> None:
        if err is None:
            self.acked += 1
        else:
            self.errors.append(str(err))

    def _transaction(self, *, commit: bool) -> None:
        outcome = b"committed" if commit else b"aborted"
        self.txn.begin_transaction()
        for i in range(15):
            self._produce(self.txn, self._record(-1 - i, [("txn", outcome)]))
        if commit:
            self.txn.commit_transaction(30)
            self.txn_committed += 15
        else:
            self.txn.flush(30)  # the aborted records are in the primary's log, then aborted
            self.txn.abort_transaction(30)
            self.txn_aborted += 15


# --------------------------------------------------------------------------- watching


class LogWatcher:
    """Reads the manifest of each segment once it is durable (in the contiguous run):
    records per segment and the newest record timestamp in the log."""

    def __init__(self, config: Config, keyring: KeyRing) -> None:
        self._loop = asyncio.new_event_loop()
        self._store: Store = config.connectors.open_store(config.store)
        self._run(self._store.__aenter__())
        self.log = DeltaLog(self._store, config.log_id)
        self.keyring = keyring
        self.head = 0
        self.records_through = [0]  # index seq: records in segments 1..seq
        self.newest_ms: int | None = None

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self._loop.run_until_complete(coro)

    @property
    def records(self) -> int:
        return self.records_through[self.head]

    def refresh(self) -> None:
        head = self._run(self.log.head_seq()) or 0
        for seq in range(self.head + 1, head + 1):
            data = self._run(self.log.fetch(seq))
            if data is None:
                raise DemoError(f"segment {seq} vanished from {self.log.key(seq)}")
            _, manifest = read_manifest(data, self.keyring, expect_log_id=self.log.log_id,
                                        expect_seq=seq)
            self.records_through.append(self.records + manifest.record_count)
            if manifest.max_timestamp_ms is not None:
                self.newest_ms = max(self.newest_ms or 0, manifest.max_timestamp_ms)
            self.head = seq

    def close(self) -> None:
        self._run(self._store.__aexit__(None, None, None))
        self._loop.close()


class StandbyProbe(threading.Thread):
    """A read_committed consumer of the standby: the lag of every record it sees, and the
    last applied seq from the checkpoint topic (committed in the same transaction as the
    segment's records). Partitions are assigned as apply creates them."""

    def __init__(self, bootstrap: str) -> None:
        super().__init__(name="demo-standby-probe", daemon=True)
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": "drstream-demo-probe",
            "isolation.level": "read_committed", "enable.auto.commit": False,
            "fetch.wait.max.ms": 50, **QUIET})
        self.seen = 0
        self.applied_seq = 0
        self.all_lags: list[float] = []
        self.failure: BaseException | None = None
        self._second: list[float] = []
        self._lock = threading.Lock()
        self._assigned: set[tuple[str, int]] = set()
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(10)

    def take_second(self) -> list[float]:
        """Lags (ms) of the records seen since the last call."""
        with self._lock:
            lags, self._second = self._second, []
        return lags

    def run(self) -> None:
        next_discovery = 0.0
        try:
            while not self._halt.is_set():
                if time.monotonic() >= next_discovery:
                    self._assign_new_partitions()
                    next_discovery = time.monotonic() + 0.5
                for m in self.consumer.consume(1000, 0.1):
                    if m.error() is None:
                        self._seen(m)
        except BaseException as e:
            self.failure = e
        finally:
            self.consumer.close()

    def _assign_new_partitions(self) -> None:
        md = self.consumer.list_topics(timeout=5)
        new = [TopicPartition(name, p, OFFSET_BEGINNING)
               for name in [*TOPICS, CHECKPOINT_TOPIC]
               if name in md.topics and md.topics[name].error is None
               for p in md.topics[name].partitions
               if (name, p) not in self._assigned]
        if new:
            self.consumer.incremental_assign(new)
            self._assigned.update((tp.topic, tp.partition) for tp in new)

    def _seen(self, m: Any) -> None:
        if m.topic() == CHECKPOINT_TOPIC:
            if m.key() == CHECKPOINT_KEY and m.value():
                self.applied_seq = max(self.applied_seq, int(json.loads(m.value())["seq"]))
            return
        lag = time.time() * 1000 - m.timestamp()[1]
        with self._lock:
            self._second.append(lag)
            self.all_lags.append(lag)
            self.seen += 1


# --------------------------------------------------------------------------- compare


def read_committed(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], list[Row]]:
    """Every committed record of `topics`, per partition in offset order (drstream.* headers
    dropped: apply adds them)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "drstream-demo-compare",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "enable.partition.eof": True, **QUIET})
    try:
        md = consumer.list_topics(timeout=10)
        parts = [(t, p) for t in topics if t in md.topics for p in md.topics[t].partitions]
        rows: dict[tuple[str, int], list[Row]] = {tp: [] for tp in parts}
        consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in parts])
        open_parts, deadline = set(parts), time.monotonic() + 60
        while open_parts:
            if time.monotonic() > deadline:
                raise DemoError(f"{bootstrap}: no end of partition after 60 s: {open_parts}")
            for m in consumer.consume(1000, 0.5):
                tp = (m.topic(), m.partition())
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        open_parts.discard(tp)
                    continue
                headers = tuple((k, v) for k, v in m.headers() or []
                                if not k.startswith("drstream."))
                rows[tp].append((m.key(), m.value(), headers, m.timestamp()[1]))
        return rows
    finally:
        consumer.close()


def topic_shapes(bootstrap: str) -> dict[str, tuple[int, dict[str, str]]]:
    """Partition count and the demo's topic configs of each topic, as the cluster has them."""
    admin = AdminClient({"bootstrap.servers": bootstrap, **QUIET})
    md = admin.list_topics(timeout=10)
    shapes = {}
    for name, (_, configs) in TOPICS.items():
        if name not in md.topics:
            continue
        res = ConfigResource(ConfigResource.Type.TOPIC, name)
        described = admin.describe_configs([res])[res].result(30)
        shapes[name] = (len(md.topics[name].partitions),
                        {k: described[k].value for k in configs if k in described})
    return shapes


def differences(primary: dict[Any, list[Row]], standby: dict[Any, list[Row]],
                limit: int = 10) -> list[str]:
    out: list[str] = []
    for tp in sorted(set(primary) | set(standby)):
        name = f"{tp[0]}[{tp[1]}]"
        if tp not in standby or tp not in primary:
            side = "standby" if tp in primary else "primary"
            out.append(f"{name}: partition missing on the {side}")
            continue
        a, b = primary[tp], standby[tp]
        if len(a) != len(b):
            out.append(f"{name}: {len(a)} records on the primary, {len(b)} on the standby")
        for i, (ra, rb) in enumerate(zip(a, b, strict=False)):
            if ra != rb:
                out.append(f"{name} record #{i}:\n    primary {ra}\n    standby {rb}")
                break
    return out[:limit]


# --------------------------------------------------------------------------- the run


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="drstream-demo-"))
        self.clusters: list[KafkaCluster] = []
        self.procs: dict[str, Proc] = {}
        self.producer: LoadProducer | None = None
        self.probe: StandbyProbe | None = None
        self.watcher: LogWatcher | None = None

    def run(self) -> int:
        started = time.monotonic()
        config_path = self.setup()
        self.start_daemons(config_path)
        self.load()
        self.catch_up()
        daemons_ok = self.stop_daemons()
        same = self.compare()
        say(f"total run time {time.monotonic() - started:.0f} s")
        return 0 if same and daemons_ok else 1

    def setup(self) -> Path:
        say(f"work dir {self.work}")
        say("starting primary and standby Kafka clusters (the first run downloads the "
            "Kafka jars) ...")
        t0 = time.monotonic()
        self.clusters = start_clusters(("primary", "standby"), base_dir=self.work / "kafka")
        primary, standby = (c.bootstrap_servers for c in self.clusters)
        say(f"  primary {primary}, standby {standby} (up in {time.monotonic() - t0:.0f} s)")
        create_topics(primary)
        say("  primary topics: orders (6 partitions, retention.ms), "
            "payments (3 partitions, compacted)")
        config_path = write_config(self.work, primary, standby)
        config = load_config(config_path)
        self.watcher = LogWatcher(config, keyring_from_config(config))
        say(f"  config {config_path}, key {self.work / 'k1.key'}, log {self.work / 'log'}")
        return config_path

    def start_daemons(self, config_path: Path) -> None:
        ready = {"ship": "ship_started", "apply": "apply_started"}
        for command in ready:
            self.procs[command] = start_drstream(command, config_path, self.work)
        for command, line in ready.items():
            wait_for_line(self.procs[command], line)
        say(f"  drstream ship (pid {self.procs['ship'].pid}) and apply "
            f"(pid {self.procs['apply'].pid}) running; logs {self.work}/{{ship,apply}}.log")

    def check_health(self) -> None:
        for proc in self.procs.values():
            check_alive(proc)
        for thread in (self.producer, self.probe):
            if thread is not None and thread.failure is not None:
                raise DemoError(f"{thread.name} failed: {thread.failure!r}")

    def load(self) -> None:
        primary, standby = (c.bootstrap_servers for c in self.clusters)
        self.probe = StandbyProbe(standby)
        self.probe.start()
        self.producer = LoadProducer(primary, self.args.rate, self.args.seconds)
        say(f"\nproducing ~{self.args.rate} records/s for {self.args.seconds:g} s "
            f"(records; lag = standby arrival - record timestamp)")
        say(f"{'time':>5} {'produced':>9} {'durable':>9} {'applied':>9} {'seq':>5}   "
            f"{'lag p50':>8} {'lag p99':>8} {'RPO':>7}")
        self.producer.start()
        t0 = time.monotonic()
        while not self.producer.finished.wait(max(0.0, 1 - (time.monotonic() - t0) % 1)):
            self.check_health()
            self.status_line(time.monotonic() - t0)
        self.check_health()
        p = self.producer
        p.stop()
        say(f"load done: {p.produced} records committed on the primary "
            f"({p.txn_committed} in committed transactions; {p.txn_aborted} more were "
            f"written and aborted)")
        if p.errors:
            say(f"  WARNING: {len(p.errors)} delivery errors, first: {p.errors[0]}")

    def status_line(self, elapsed: float) -> None:
        assert self.producer and self.probe and self.watcher
        lags = sorted(self.probe.take_second())
        applied_seq = self.probe.applied_seq  # read before the head: applied <= durable
        self.watcher.refresh()
        applied = self.watcher.records_through[min(applied_seq, self.watcher.head)]
        p50, p99 = (f"{percentile(lags, 50):.0f}ms", f"{percentile(lags, 99):.0f}ms") \
            if lags else ("-", "-")
        newest = self.watcher.newest_ms
        rpo = f"{(now_ms() - newest) / 1000:.2f}s" if newest else "-"
        say(f"{elapsed:4.0f}s {self.producer.produced:9d} {self.watcher.records:9d} "
            f"{applied:9d} {applied_seq:5d}   {p50:>8} {p99:>8} {rpo:>7}")

    def catch_up(self) -> None:
        assert self.producer and self.probe and self.watcher
        target, deadline = self.producer.produced, time.monotonic() + CATCH_UP_TIMEOUT_S
        say(f"waiting for the standby to catch up ({target} records, at most "
            f"{CATCH_UP_TIMEOUT_S:.0f} s) ...")
        while time.monotonic() < deadline:
            self.check_health()
            self.watcher.refresh()
            applied = self.watcher.records_through[min(self.probe.applied_seq,
                                                       self.watcher.head)]
            if applied >= target and self.probe.seen >= target:
                say(f"  caught up: {applied} records applied (seq {self.probe.applied_seq}), "
                    f"{self.probe.seen} read on the standby")
                return
            say(f"  durable {self.watcher.records}, applied {applied}, "
                f"read on the standby {self.probe.seen} / {target}")
            time.sleep(1)
        say(f"  NOT caught up after {CATCH_UP_TIMEOUT_S:.0f} s; comparing anyway")

    def stop_daemons(self) -> bool:
        """SIGTERM ship, then apply; True when both drained and exited 0."""
        ok = True
        for command, proc in self.procs.items():
            t0 = time.monotonic()
            proc.stop(timeout=STOP_TIMEOUT_S)
            rc = proc.popen.returncode
            say(f"drstream {command}: SIGTERM -> exit {rc} in {time.monotonic() - t0:.1f} s")
            if rc != 0:
                say(f"  log {proc.log_path}:\n{proc.log_tail(20)}")
                ok = False
        return ok

    def compare(self) -> bool:
        assert self.probe
        self.probe.stop()
        primary, standby = (c.bootstrap_servers for c in self.clusters)
        say("comparing standby with primary, record by record (read_committed) ...")
        shapes = topic_shapes(primary), topic_shapes(standby)
        say("  standby topics: " + ", ".join(
            f"{name} {parts} partitions {configs}" for name, (parts, configs)
            in shapes[1].items()) + (" (as on the primary)" if shapes[0] == shapes[1] else ""))
        a, b = read_committed(primary, list(TOPICS)), read_committed(standby, list(TOPICS))
        lags = sorted(self.probe.all_lags)
        say(f"  records compared {sum(map(len, a.values()))} over {len(a)} partitions")
        if lags:
            say(f"  end-to-end lag over the run: p50 {percentile(lags, 50):.0f} ms, "
                f"p99 {percentile(lags, 99):.0f} ms, max {lags[-1]:.0f} ms "
                f"({len(lags)} records)")
        diffs = differences(a, b)
        if shapes[0] != shapes[1]:
            diffs.insert(0, f"topics: primary {shapes[0]}, standby {shapes[1]}")
        if not diffs:
            say("standby == primary: OK")
            return True
        say("standby != primary: FAILED, first differences:")
        for d in diffs:
            say(f"  {d}")
        return False

    def cleanup(self) -> None:
        """Stop everything this run started, by pid; each step runs whatever failed before.
        Ctrl-C and SIGTERM are ignored meanwhile, so a second one cannot cut it short."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        steps: list[Callable[[], None]] = []
        for thread in (self.producer, self.probe):
            if thread is not None:
                steps.append(thread.stop)
        steps += [lambda p=p: p.stop(timeout=STOP_TIMEOUT_S) for p in self.procs.values()]
        steps += [c.stop for c in self.clusters]
        if self.watcher is not None:
            steps.append(self.watcher.close)
        for step in steps:
            try:
                step()
            except Exception as e:
                print(f"cleanup: {e!r}", file=sys.stderr)
        if self.args.keep:
            say(f"kept {self.work} (config, key, log, ship.log, apply.log, kafka/)")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--seconds", type=float, default=20, help="load duration (default 20)")
    parser.add_argument("--rate", type=int, default=2000, help="records/s (default 2000)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (config, key, log, daemon logs, Kafka data)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_sigterm(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    demo = Demo(args)
    try:
        return demo.run()
    except KeyboardInterrupt:
        say("\ninterrupted: cleaning up")
        return 130
    except Exception as e:
        say(f"demo failed: {e}")
        return 1
    finally:
        demo.cleanup()


if __name__ == "__main__":
    sys.exit(main())
