"""Replication lag, RPO and cost: drstream ship+apply against Kafka MirrorMaker 2.

    python -m benchmarks.lag                                # every case in benchmarks/cases
    python -m benchmarks.lag --cases steady-5mbps --scale 0.3          # one case, shorter
    python -m benchmarks.lag --primary HOST:PORT --standby HOST:PORT   # given clusters
    python -m benchmarks.lag --case-file my-case.json --systems drstream --store s3

For each case (a JSON file in benchmarks/cases/) and each system (drstream, mm2), one after
the other on the same brokers with the same load, on fresh topics:

1. a topic on the primary (the case's partitions); for drstream a work dir with a key, a
   config and a file store (or a bucket on a local S3 API server), `drstream ship` and
   `drstream apply` as subprocesses; for MirrorMaker 2 one dedicated-mode JVM
   (benchmarks/mm2.py, IdentityReplicationPolicy so the standby topic has the same name);
2. a reader process on the standby (read_committed: apply writes one transaction per
   segment) that records, for every record, its arrival time (wall clock, ns) by the stamp
   the load generator put in its headers: `bench.id` (0..N-1) and `bench.ts` (produce
   time, ns); it counts duplicates and records it cannot match, and also notes freshness
   signals (drstream: apply's checkpoint records; MM2: its heartbeats topic);
3. a load generator process producing the case's phases (records/s or MB/s for some
   seconds, or a burst of N records as fast as it can; `preload` cases produce everything
   before the replicator starts: a backlog drain);
4. once every produced record has arrived (or the drain timeout passed): stop the reader,
   SIGTERM the replicator, delete the topics, and compute per record: end-to-end lag =
   arrival - produce time; for drstream RPO = time the segment holding it (and every earlier
   one) was stored - produce time (store operations are timed inside ship/apply by a thin
   wrapper, see `_daemon`; records are mapped to segments by the manifests' positions).

Reported per case and system: lag p50/p95/p99/max, RPO p50/p99 (drstream), sustained
records/s and MB/s (first to last arrival), CPU seconds per GiB of payload of the replicator
processes (utime+stime of their process trees from /proc over the load window; for preload
cases from the first arrival on, start-up reported apart), peak RSS, compression ratio and
bytes written to the store, store requests per minute (PUT/GET/HEAD/LIST), freshness
signals, broker and other CPU, the load average at start and end. Written to
benchmarks/results/lag.json, lag.md and lag.png (lag over time, needs matplotlib); a
progress line goes to stderr every 5 s. A benchmark, not a test: nothing asserts on time.

Payload bytes are keys + values + header keys and values (10^6 bytes = 1 MB), as in
benchmarks/ship.py. Internal entry points (subprocesses): `_produce`, `_read`, `_daemon`.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    FAST_PRODUCER_CONF,
    CpuWindow,
    GiB,
    MiB,
    ProcSampler,
    Progress,
    RecordFactory,
    machine_facts,
    md_table,
    percentile,
    text_table,
    write_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
CASES_DIR = Path(__file__).resolve().parent / "cases"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ID_HEADER = "bench.id"
TS_HEADER = "bench.ts"
SYSTEMS = ("drstream", "mm2")
SYSTEM_LABEL = {"drstream": "drstream", "mm2": "MirrorMaker 2"}
STATUS_EVERY_S = 0.25
QUIET = {"log_level": 3}
progress = Progress(5.0)


class BenchError(RuntimeError):
    """The benchmark could not run a case; the message says what and where to look."""


# --------------------------------------------------------------------------- cases

CASE_DEFAULTS: dict[str, Any] = {
    "description": "",
    "order": 100,
    "partitions": 12,
    "keys": 100_000,
    "preload": False,
    "store": "file",
    "settle_s": 3.0,
    "drain_timeout_s": 180.0,
    "systems": list(SYSTEMS),
    "mm2": {"tasks": 2, "properties": {}},
    # drstream config sections for the run: ship, apply, source_properties (librdkafka
    # properties of the Kafka source); empty = the defaults a user gets.
    "drstream": {"ship": {}, "apply": {}, "source_properties": {}},
}
PHASE_KINDS = ("records_per_s", "mb_per_s", "records")


def load_case(path: Path) -> dict[str, Any]:
    """A case file: name, phases and optional settings (CASE_DEFAULTS); checked here so a
    typo fails before any service starts."""
    raw = json.loads(path.read_text())
    unknown = set(raw) - set(CASE_DEFAULTS) - {"name", "phases"}
    if unknown:
        raise BenchError(f"{path}: unknown keys {sorted(unknown)}")
    case = {**CASE_DEFAULTS, **raw}
    if not isinstance(case.get("name"), str) or not re.fullmatch(r"[a-z0-9-]+", case["name"]):
        raise BenchError(f"{path}: name must be [a-z0-9-]+")
    phases = case.get("phases")
    if not isinstance(phases, list) or not phases:
        raise BenchError(f"{path}: phases must be a non-empty list")
    for i, ph in enumerate(phases):
        extra = set(ph) - {*PHASE_KINDS, "seconds", "warmup"}
        if extra:
            raise BenchError(f"{path}: phase {i}: unknown keys {sorted(extra)}")
        kinds = [k for k in PHASE_KINDS if k in ph]
        if len(kinds) != 1 or (kinds[0] != "records" and "seconds" not in ph):
            raise BenchError(f"{path}: phase {i}: one of records_per_s/mb_per_s with seconds, "
                             f"or records (a burst), got {ph}")
    if case["store"] not in ("file", "s3"):
        raise BenchError(f"{path}: store must be file or s3")
    bad = set(case["systems"]) - set(SYSTEMS)
    if bad:
        raise BenchError(f"{path}: unknown systems {sorted(bad)}")
    case["file"] = str(path)
    return case


def scaled(case: dict[str, Any], scale: float) -> dict[str, Any]:
    """The case with every duration and record count multiplied by `scale` (quick runs)."""
    if scale == 1:
        return case
    out = json.loads(json.dumps(case))
    for ph in out["phases"]:
        if "seconds" in ph:
            ph["seconds"] = max(1.0, ph["seconds"] * scale)
        if "records" in ph:
            ph["records"] = max(1, int(ph["records"] * scale))
    return out


def all_cases() -> list[dict[str, Any]]:
    cases = [load_case(p) for p in sorted(CASES_DIR.glob("*.json"))]
    return sorted(cases, key=lambda c: (c["order"], c["name"]))


# --------------------------------------------------------------------------- load generator


def _record_maker(keys: int, seed: int = 11) -> Any:
    factory = RecordFactory(pool_size=8192, seed=seed)
    pool, size = factory.pool, factory.pool_size
    mask = (1 << 64) - 1

    def make(i: int, ts: int) -> tuple[bytes, bytes, list[tuple[str, bytes]], int]:
        key = b"user-%d" % ((i * 7919) % keys)
        value = b'{"n":%d,' % i + pool[i % size]
        h = (i * 0x9E3779B97F4A7C15) & mask
        headers = [("content-type", b"application/json"), ("trace-id", b"%016x" % h),
                   (ID_HEADER, b"%d" % i), (TS_HEADER, b"%d" % ts)]
        nbytes = len(key) + len(value) + sum(len(k) + len(v) for k, v in headers)
        return key, value, headers, nbytes

    return make


class StatusFile:
    """A small JSON status a subprocess rewrites atomically; the orchestrator polls it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, doc: dict[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)

    def read(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(self.path.read_text()))
        return {}


def produce_main(argv: list[str]) -> int:
    """`_produce --spec JSON --status PATH --out PATH`: the case's phases into one topic,
    each record stamped (bench.id, bench.ts); produce times to --out (int64 per id)."""
    from confluent_kafka import Producer

    ap = argparse.ArgumentParser(prog="benchmarks.lag _produce")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--status", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    spec = json.loads(args.spec)
    halt = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: halt.set())
    status = StatusFile(args.status)
    topic, parts = spec["topic"], spec["partitions"]
    make = _record_maker(spec["keys"])
    acked, errors = [0], []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is None:
            acked[0] += 1
        elif len(errors) < 100:
            errors.append(str(err))
        else:
            errors[-1] = str(err)

    # Idempotent: per partition, records land in produce order without duplicates, so
    # record i is at offset i // partitions of partition i % partitions on a fresh topic.
    conf: dict[str, Any] = {"bootstrap.servers": spec["bootstrap"], "linger.ms": 5,
                            "acks": "all", "compression.type": "none",
                            "enable.idempotence": True, **QUIET}
    if spec.get("fast"):
        conf.update({k: v for k, v in FAST_PRODUCER_CONF.items()
                     if k not in ("acks", "enable.idempotence")})
    p = Producer(conf)
    md = p.list_topics(topic, timeout=30).topics[topic]
    if md.error is not None or len(md.partitions) != parts:
        raise SystemExit(f"topic {topic}: {md.error or len(md.partitions)} partitions")
    produce_ns = array.array("q")
    produce, poll = p.produce, p.poll
    i = sent_bytes = 0
    max_behind = 0.0
    t_start = time.monotonic()
    next_status = 0.0
    phase_marks: list[dict[str, Any]] = []

    def send(ts: int) -> int:
        nonlocal i
        key, value, headers, nbytes = make(i, ts)
        while True:
            try:
                produce(topic, value, key, partition=i % parts, headers=headers,
                        on_delivery=on_delivery)
                break
            except BufferError:
                poll(0.02)
        produce_ns.append(ts)
        i += 1
        return nbytes

    def report(done: bool = False, **extra: Any) -> None:
        status.write({"sent": i, "acked": acked[0], "bytes": sent_bytes,
                      "errors": len(errors), "elapsed_s": time.monotonic() - t_start,
                      "done": done, **extra})

    for k, ph in enumerate(spec["phases"]):
        t0 = time.monotonic()
        first = i
        if "records" in ph:  # a burst: as fast as the producer goes
            for _ in range(int(ph["records"])):
                if halt.is_set():
                    break
                sent_bytes += send(time.time_ns())
                if i % 1000 == 0:
                    poll(0)
                    now = time.monotonic()
                    if now >= next_status:
                        report()
                        next_status = now + STATUS_EVERY_S
        else:
            seconds = float(ph["seconds"])
            by_bytes = "mb_per_s" in ph
            rate = float(ph["mb_per_s"]) * 1e6 if by_bytes else float(ph["records_per_s"])
            sent_in_phase = 0.0
            while not halt.is_set():
                now = time.monotonic()
                elapsed = now - t0
                if elapsed >= seconds:
                    break
                due = elapsed * rate if by_bytes else int(elapsed * rate) + 1
                # How late the next unsent record is (record k of a phase is due at k/rate).
                behind = (due - sent_in_phase) / rate if by_bytes else \
                    elapsed - sent_in_phase / rate
                max_behind = max(max_behind, behind)
                while sent_in_phase < due and not halt.is_set():
                    n = send(time.time_ns())
                    sent_bytes += n
                    sent_in_phase += n if by_bytes else 1
                poll(0)
                if now >= next_status:
                    report()
                    next_status = now + STATUS_EVERY_S
                # Sleep to the next record at low rates, 1 ms at high ones.
                time.sleep(min(0.05, max(0.001, 1 / rate)) if not by_bytes else 0.001)
        phase_marks.append({"phase": k, "first_id": first, "records": i - first,
                            "seconds": time.monotonic() - t0,
                            "warmup": bool(ph.get("warmup"))})
    elapsed = time.monotonic() - t_start
    left = p.flush(120)
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    args.out.write_bytes(produce_ns.tobytes())
    report(done=True, seconds=elapsed, undelivered=left, first_errors=errors[:5],
           cpu_s=ru.ru_utime + ru.ru_stime,
           max_behind_s=max_behind, phases=phase_marks)
    return 0


# --------------------------------------------------------------------------- standby reader


def read_main(argv: list[str]) -> int:
    """`_read --spec JSON --status PATH --out PATH`: reads the standby topic (and the
    freshness topic) until SIGTERM; per stamped record the first arrival time (ns) and the
    stamp's produce time, to --out; duplicates, unmatched records and freshness signals
    counted in the final status."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    ap = argparse.ArgumentParser(prog="benchmarks.lag _read")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--status", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    spec = json.loads(args.spec)
    halt = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: halt.set())
    status = StatusFile(args.status)
    topic, parts = spec["topic"], spec["partitions"]
    fresh_spec = spec.get("freshness") or {}
    fresh_topic = fresh_spec.get("topic")
    fresh_key = str(fresh_spec.get("key", "")).encode()
    not_before_ms = int(spec.get("not_before_ms", 0))
    c = Consumer({"bootstrap.servers": spec["bootstrap"],
                  "group.id": f"bench-lag-reader-{uuid.uuid4().hex[:8]}",
                  "isolation.level": "read_committed", "enable.auto.commit": False,
                  "fetch.wait.max.ms": 20, "enable.partition.eof": False, **QUIET})
    arrival = array.array("q")
    stamp = array.array("q")
    seen = dups = unmatched = bad_origin = 0
    fresh: list[list[Any]] = []  # [arrival ns, source ms, seq or None]
    window: list[float] = []
    assigned: set[tuple[str, int]] = set()
    wanted = {topic: parts}
    if fresh_topic:
        wanted[fresh_topic] = 0  # every partition it has
    next_discovery = next_status = 0.0
    check_origin = bool(spec.get("check_drstream_offsets"))

    def discover() -> None:
        md = c.list_topics(timeout=5)
        new = []
        for name in wanted:
            t = md.topics.get(name)
            if t is None or t.error is not None:
                continue
            for p in t.partitions:
                if (name, p) not in assigned:
                    new.append(TopicPartition(name, p, OFFSET_BEGINNING))
        if new:
            c.incremental_assign(new)
            assigned.update((tp.topic, tp.partition) for tp in new)

    def report(done: bool = False) -> None:
        w = sorted(window)
        window.clear()
        status.write({"seen": seen, "dups": dups, "unmatched": unmatched,
                      "bad_origin": bad_origin, "fresh": len(fresh),
                      "partitions_assigned": sum(1 for t, _ in assigned if t == topic),
                      "window": {"n": len(w), "p50": percentile(w, 50),
                                 "p99": percentile(w, 99), "max": w[-1] if w else None},
                      "done": done})

    try:
        while not halt.is_set():
            now_m = time.monotonic()
            if now_m >= next_discovery:
                with contextlib.suppress(Exception):
                    discover()
                # Fast until the topic is assigned: records that arrive before are read
                # late and would count as lag.
                complete = sum(1 for t, _ in assigned if t == topic) >= parts
                next_discovery = now_m + (2.0 if complete else 0.1)
            msgs = c.consume(2000, 0.05)
            now = time.time_ns()
            for m in msgs:
                if m.error() is not None:
                    continue
                if m.topic() != topic:
                    if fresh_spec.get("kind") == "drstream":
                        if m.key() == fresh_key and m.value():
                            doc = json.loads(m.value())
                            fresh.append([now, doc.get("created_at_ms"), doc.get("seq")])
                    elif m.timestamp()[1] >= not_before_ms:
                        fresh.append([now, m.timestamp()[1], None])
                    continue
                i = ts = -1
                src_offset = None
                for k, v in m.headers() or ():
                    if k == ID_HEADER:
                        i = int(v)
                    elif k == TS_HEADER:
                        ts = int(v)
                    elif k == "drstream.offset":
                        src_offset = int(v)
                if i < 0 or ts < 0:
                    unmatched += 1
                    continue
                if check_origin and (m.partition() != i % parts
                                     or src_offset != i // parts):
                    bad_origin += 1
                if i >= len(arrival):
                    zeros = array.array("q", [0]) * (i + 1 - len(arrival) + 65536)
                    arrival.extend(zeros)
                    stamp.extend(zeros)
                if arrival[i]:
                    dups += 1
                    continue
                arrival[i] = now
                stamp[i] = ts
                seen += 1
                window.append((now - ts) / 1e6)
            if time.monotonic() >= next_status:
                report()
                next_status = time.monotonic() + STATUS_EVERY_S
    finally:
        c.close()
        n = len(arrival)
        while n and not arrival[n - 1]:
            n -= 1
        with open(args.out, "wb") as f:
            f.write(n.to_bytes(8, "little"))
            f.write(arrival[:n].tobytes())
            f.write(stamp[:n].tobytes())
        (args.out.with_suffix(".fresh.json")).write_text(json.dumps(fresh))
        report(done=True)
    return 0


def load_arrivals(path: Path) -> tuple[array.array[int], array.array[int]]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    arrival, stamp = array.array("q"), array.array("q")
    arrival.frombytes(data[8:8 + 8 * n])
    stamp.frombytes(data[8 + 8 * n:8 + 16 * n])
    return arrival, stamp


# --------------------------------------------------------------------------- ship/apply wrapper


def daemon_main(argv: list[str]) -> int:
    """`_daemon --ops-out PATH -- ship|apply --config F`: runs `drstream` (daemon.cli.main)
    with every store operation recorded as it completes: one JSON line
    [wall ns, op, key, bytes] per PUT/GET/HEAD/LIST/DELETE, appended to --ops-out every
    0.5 s. A PUT's completion is when the segment is durable (the file store links a
    fsynced file; S3 answered the PUT). Costs a list append per store call."""
    ap = argparse.ArgumentParser(prog="benchmarks.lag _daemon")
    ap.add_argument("--ops-out", type=Path, required=True)
    ap.add_argument("--profile-out", type=Path, default=None,
                    help="wall-clock stack samples of every thread + CPU per thread, as JSON")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    from drstream.connectors.file.store import FileStore
    from drstream.connectors.s3.store import S3Store

    events: list[tuple[int, str, str, int]] = []
    record = events.append

    def timed(cls: Any, method: str, op: str) -> None:
        orig = getattr(cls, method)

        async def wrapper(self: Any, key: str, *a: Any, **kw: Any) -> Any:
            result = await orig(self, key, *a, **kw)
            if op == "PUT":
                nbytes = len(a[0]) if a else len(kw.get("data", b""))
            else:
                nbytes = len(result) if isinstance(result, bytes) else 0
            record((time.time_ns(), op, key, nbytes))
            return result

        setattr(cls, method, wrapper)

    def listed(cls: Any) -> None:
        orig = cls.list

        def wrapper(self: Any, prefix: str, *a: Any, **kw: Any) -> Any:
            record((time.time_ns(), "LIST", prefix, 0))
            return orig(self, prefix, *a, **kw)

        cls.list = wrapper

    for cls in (FileStore, S3Store):
        timed(cls, "put_if_absent", "PUT")
        timed(cls, "get", "GET")
        timed(cls, "delete", "DELETE")
        listed(cls)
    timed(FileStore, "exists", "HEAD")
    timed(S3Store, "version_id", "HEAD")  # S3Store.exists calls it: one HEAD request

    halt = threading.Event()

    def flush() -> None:
        n = len(events)
        if not n:
            return
        batch = events[:n]
        del events[:n]
        with open(args.ops_out, "a") as f:
            f.write("".join(json.dumps(e) + "\n" for e in batch))

    def flusher() -> None:
        while not halt.wait(0.5):
            flush()

    thread = threading.Thread(target=flusher, name="bench-ops-flusher", daemon=True)
    thread.start()
    from drstream.daemon.cli import main as cli_main

    sampler = None
    if args.profile_out is not None:
        from benchmarks.common import StackSampler

        sampler = StackSampler(0.01).start()
    try:
        return cli_main(rest)
    finally:
        halt.set()
        thread.join()
        flush()
        if sampler is not None and args.profile_out is not None:
            sampler.stop()
            report = sampler.report(top=25)
            report["thread_groups_cpu_s"] = thread_groups(os.getpid(), top=20)
            args.profile_out.write_text(json.dumps(report, indent=1))


def read_ops(path: Path) -> list[tuple[int, str, str, int]]:
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                t, op, key, n = json.loads(line)
                out.append((int(t), str(op), str(key), int(n)))
    return out


# --------------------------------------------------------------------------- processes


def start_child(name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                ) -> Any:
    from tests.infra.procs import start_process

    return start_process(name, argv, log_path, env={"PYTHONUNBUFFERED": "1", **(env or {})},
                         cwd=ROOT)


def wait_for_line(proc: Any, needle: str, timeout: float = 90) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if needle in proc.log_tail(400):
            return time.monotonic() - t0
        if not proc.alive():
            raise BenchError(f"{proc.name} exited ({proc.popen.returncode}); log "
                             f"{proc.log_path}:\n{proc.log_tail(20)}")
        time.sleep(0.05)
    raise BenchError(f"{proc.name} did not log {needle!r} in {timeout:.0f}s; log "
                     f"{proc.log_path}:\n{proc.log_tail(20)}")


@dataclass
class Env:
    """What every case run shares: the clusters, an S3 server once needed, the work root."""

    primary: str
    standby: str
    work: Path
    primary_pid: int | None = None
    standby_pid: int | None = None
    s3: Any = None
    keep: bool = False
    profile_dir: Path | None = None

    def s3_server(self) -> Any:
        if self.s3 is None:
            from tests.infra.s3 import S3Server

            self.s3 = S3Server.start_new("moto-s3-bench-lag")
        return self.s3

    def admin(self, bootstrap: str) -> Any:
        from confluent_kafka.admin import AdminClient

        return AdminClient({"bootstrap.servers": bootstrap, **QUIET})

    def delete_topics(self, bootstrap: str, topics: list[str]) -> None:
        if not topics:
            return
        admin = self.admin(bootstrap)
        with contextlib.suppress(Exception):
            existing = set(admin.list_topics(timeout=10).topics)
            names = [t for t in topics if t in existing]
            if names:
                for fut in admin.delete_topics(names, operation_timeout=30).values():
                    with contextlib.suppress(Exception):
                        fut.result(60)


class Replicator:
    """A replicator under test: start, processes to measure, stop, facts."""

    system = ""

    def pids(self) -> dict[str, int]:
        raise NotImplementedError

    def launch(self) -> None:
        raise NotImplementedError

    def wait_ready(self) -> float:
        """Seconds from launch until it replicates."""
        raise NotImplementedError

    def log_problems(self) -> list[str]:
        return []

    def cleanup(self) -> None:
        pass

    def alive(self) -> bool:
        raise NotImplementedError

    def stop(self) -> dict[str, Any]:
        raise NotImplementedError

    def freshness(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def health(self) -> str | None:
        return None

    def cleanup_topics(self) -> tuple[list[str], list[str]]:
        return [], []


class Drstream(Replicator):
    system = "drstream"

    def __init__(self, env: Env, case: dict[str, Any], topic: str, workdir: Path) -> None:
        from drstream.daemon.keyring import generate_key_file
        from tests.infra.procs import free_port

        self.env, self.case, self.topic, self.workdir = env, case, topic, workdir
        self.log_id = f"lag-{uuid.uuid4().hex[:8]}"
        key = workdir / "k1.key"
        generate_key_file(key)
        self.bucket = None
        self.proc_env: dict[str, str] = {}
        if case["store"] == "s3":
            from tests.infra.s3 import KEY_ENV, SECRET_ENV

            s3 = env.s3_server()
            self.bucket = s3.create_bucket()
            store: dict[str, Any] = s3.store_fields(self.bucket, prefix="dr")
            self.proc_env = {KEY_ENV: s3.access_key, SECRET_ENV: s3.secret_key}
            os.environ.update(self.proc_env)  # this process reads the log afterwards
        else:
            store = {"type": "file", "path": str(workdir / "store")}
        tuning = case.get("drstream") or {}
        self.raw_config = {
            "log_id": self.log_id,
            "store": store,
            "keyring": {"active": "k1", "keys": {"k1": f"file:{key}"}},
            "sources": [{"type": "kafka", "name": "primary", "bootstrap_servers": env.primary,
                         "topics": {"include": [re.escape(topic)]},
                         "properties": dict(tuning.get("source_properties") or {})}],
            "sinks": [{"type": "kafka", "name": "standby", "bootstrap_servers": env.standby}],
            "ship": dict(tuning.get("ship") or {}),
            "apply": dict(tuning.get("apply") or {}),
            "service": {"ship_metrics_listen": f"127.0.0.1:{free_port()}",
                        "apply_metrics_listen": f"127.0.0.1:{free_port()}"},
            "logging": {"level": "info", "format": "json"},
        }
        import yaml

        self.config_path = workdir / "drstream.yaml"
        self.config_path.write_text(yaml.safe_dump(self.raw_config, sort_keys=False))
        from drstream.daemon.config import load_config

        self.config = load_config(self.config_path)  # a bad config fails here
        self.procs: dict[str, Any] = {}

    def ops_path(self, command: str) -> Path:
        return self.workdir / f"{command}.ops.jsonl"

    def launch(self) -> None:
        self.launched = time.monotonic()
        for command in ("ship", "apply"):
            profile = []
            if self.env.profile_dir is not None:
                self.env.profile_dir.mkdir(parents=True, exist_ok=True)
                profile = ["--profile-out",
                           str(self.env.profile_dir / f"{self.case['name']}-{command}.json")]
            argv = [sys.executable, "-m", "benchmarks.lag", "_daemon", "--ops-out",
                    str(self.ops_path(command)), *profile, "--", command, "--config",
                    str(self.config_path)]
            self.procs[command] = start_child(f"drstream-{command}-lag", argv,
                                              self.workdir / f"{command}.log", self.proc_env)

    def wait_ready(self) -> float:
        for command in ("ship", "apply"):
            wait_for_line(self.procs[command], f"{command}_started")
        return time.monotonic() - self.launched

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def alive(self) -> bool:
        return all(p.alive() for p in self.procs.values())

    def health(self) -> str | None:
        for name, p in self.procs.items():
            if not p.alive():
                return (f"drstream {name} exited ({p.popen.returncode}); log {p.log_path}:\n"
                        f"{p.log_tail(15)}")
        return None

    def stop(self) -> dict[str, Any]:
        out = {}
        for name, p in self.procs.items():  # ship first: it drains, then apply
            t0 = time.monotonic()
            p.stop(timeout=60)
            out[name] = {"exit_code": p.popen.returncode, "stop_s": time.monotonic() - t0}
        return out

    def freshness(self) -> dict[str, Any]:
        return {"kind": "drstream", "topic": "drstream.checkpoints",
                "key": f"{self.log_id}/standby"}

    def describe(self) -> dict[str, Any]:
        return {"config": {k: v for k, v in self.raw_config.items() if k != "keyring"}}

    def log_problems(self) -> list[str]:
        out = []
        for name, p in self.procs.items():
            with contextlib.suppress(OSError):
                for line in p.log_path.read_text(errors="replace").splitlines():
                    if '"level": "warning"' in line or '"level": "error"' in line \
                            or "Traceback" in line:
                        out.append(f"{name}: {line[:300]}")
        return out[:10]

    def cleanup_topics(self) -> tuple[list[str], list[str]]:
        return [self.topic], [self.topic]

    def cleanup(self) -> None:
        if self.bucket and self.env.s3 is not None and self.env.s3.alive():
            self.env.s3.delete_bucket(self.bucket)

    # -- the log, after the run ---------------------------------------------------------

    def segments(self) -> list[dict[str, Any]]:
        """Every stored segment: seq, bytes, when its PUT completed, record count and the
        source positions of its manifest (read from the store after the run)."""
        import asyncio

        from drstream.daemon.cli import keyring_from_config
        from drstream.daemon.deltalog import DeltaLog
        from drstream.daemon.segment import read_manifest

        puts: dict[int, tuple[int, int]] = {}
        for t, op, key, n in read_ops(self.ops_path("ship")):
            m = re.search(r"/(\d{20})\.seg$", key)
            if op == "PUT" and m:
                puts.setdefault(int(m[1]), (t, n))
        fetched: dict[int, int] = {}  # seq -> when apply's GET returned it
        for t, op, key, n in read_ops(self.ops_path("apply")):
            m = re.search(r"/(\d{20})\.seg$", key)
            if op == "GET" and n and m:
                fetched.setdefault(int(m[1]), t)
        keyring = keyring_from_config(self.config)

        async def fetch_all() -> list[dict[str, Any]]:
            out = []
            async with self.config.connectors.open_store(self.config.store) as store:
                log = DeltaLog(store, self.log_id)
                for seq in sorted(puts):
                    data = await log.fetch(seq)
                    if data is None:
                        continue
                    header, manifest = read_manifest(data, keyring,
                                                     expect_log_id=self.log_id, expect_seq=seq)
                    pos = manifest.positions.get("kafka:primary", {}).get(self.topic, {})
                    out.append({"seq": seq, "put_done_ns": puts[seq][0], "bytes": len(data),
                                "created_ns": header.created_at_ms * 1_000_000,
                                "fetched_ns": fetched.get(seq),
                                "records": manifest.record_count, "kind": manifest.kind,
                                "positions": {int(p): int(o) for p, o in pos.items()}})
            return out

        return asyncio.run(fetch_all())


class MM2(Replicator):
    system = "mm2"

    def __init__(self, env: Env, case: dict[str, Any], topic: str, workdir: Path) -> None:
        from benchmarks.mm2 import MirrorMaker2

        opts = case.get("mm2") or {}
        self.env, self.topic, self.workdir = env, topic, workdir
        self.mm2 = MirrorMaker2(workdir, env.primary, env.standby, f"^{re.escape(topic)}$",
                                tasks=int(opts.get("tasks", 1)),
                                extra={str(k): str(v) for k, v in
                                       (opts.get("properties") or {}).items()})

    def launch(self) -> None:
        self.mm2.start()

    def wait_ready(self) -> float:
        return self.mm2.wait_replicating()

    def pids(self) -> dict[str, int]:
        return {"mm2": self.mm2.pid} if self.mm2.pid else {}

    def alive(self) -> bool:
        return self.mm2.alive()

    def health(self) -> str | None:
        if not self.mm2.alive():
            return f"MirrorMaker 2 exited; log {self.mm2.log_path}:\n{self.mm2.log_tail(15)}"
        return None

    def stop(self) -> dict[str, Any]:
        t0 = time.monotonic()
        code = self.mm2.stop(timeout=30)
        # The JVM exits 143 on SIGTERM after its shutdown hook ran: a clean stop.
        return {"mm2": {"exit_code": code, "stop_s": time.monotonic() - t0}}

    def freshness(self) -> dict[str, Any]:
        return {"kind": "mm2", "topic": "heartbeats"}

    def describe(self) -> dict[str, Any]:
        return {"properties": {k: v for k, v in self.mm2.properties.items()
                               if "bootstrap" not in k}}

    def log_problems(self) -> list[str]:
        return self.mm2.log_problems()

    def cleanup_topics(self) -> tuple[list[str], list[str]]:
        s = self.mm2.suffix
        internal = [f"mm2-offsets.{s}.internal", f"mm2-status.{s}.internal",
                    f"mm2-configs.{s}.internal"]
        return [self.topic], [self.topic, *internal]



# --------------------------------------------------------------------------- one run


class CpuTrack:
    """CPU seconds of named process trees over time (ProcSampler per tree), so the CPU in
    any window can be read afterwards; peak RSS per tree."""

    def __init__(self, pids: dict[str, int], interval: float = 0.25) -> None:
        self.samplers = {name: ProcSampler(pid, interval).start() for name, pid in pids.items()}

    def stop(self) -> None:
        for s in self.samplers.values():
            s.stop()

    def cpu_at(self, name: str, t: float) -> float:
        """CPU seconds of `name` at monotonic time t (the last sample at or before t; the
        first sample before that)."""
        samples = self.samplers[name].samples
        best = samples[0][1] if samples else 0.0
        for ts, cpu, _ in samples:
            if ts > t:
                break
            best = cpu
        return best

    def window(self, t0: float, t1: float) -> dict[str, float]:
        return {n: self.cpu_at(n, t1) - self.cpu_at(n, t0) for n in self.samplers}

    def peak_rss(self) -> dict[str, int]:
        return {n: s.peak_rss for n, s in self.samplers.items()}


def run_one(env: Env, case: dict[str, Any], system: str) -> dict[str, Any]:
    """One case with one system on fresh topics; the result dict (see analyse)."""
    from benchmarks.common import create_topic

    tag = f"{case['name']}/{system}"
    topic = f"lag-{case['name']}-{system}-{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix=f"lag-{case['name']}-{system}-", dir=env.work))
    parts = int(case["partitions"])
    create_topic(env.primary, topic, parts)
    rep: Replicator = (Drstream if system == "drstream" else MM2)(env, case, topic, workdir)
    producer = reader = None
    track: CpuTrack | None = None
    marks: dict[str, float] = {}
    stop_info: dict[str, Any] = {}
    try:
        produce_spec = {"bootstrap": env.primary, "topic": topic, "partitions": parts,
                        "keys": int(case["keys"]), "phases": case["phases"],
                        "fast": bool(case["preload"])}
        pstatus = StatusFile(workdir / "producer.status.json")
        produce_argv = [sys.executable, "-m", "benchmarks.lag", "_produce", "--spec",
                        json.dumps(produce_spec), "--status", str(pstatus.path), "--out",
                        str(workdir / "produced.bin")]
        if case["preload"]:
            progress(f"[{tag}] preloading the backlog into {topic}", force=True)
            marks["load_start"] = time.monotonic()
            producer = start_child("bench-lag-producer", produce_argv, workdir / "producer.log")
            wait_producer(producer, pstatus, tag, lambda: None)
            marks["load_end"] = time.monotonic()
        # The reader first: it must see each record as soon as the replicator writes it.
        rstatus = StatusFile(workdir / "reader.status.json")
        read_spec = {"bootstrap": env.standby, "topic": topic, "partitions": parts,
                     "freshness": rep.freshness(), "not_before_ms": int(time.time() * 1000),
                     "check_drstream_offsets": system == "drstream"}
        reader = start_child("bench-lag-reader", [
            sys.executable, "-m", "benchmarks.lag", "_read", "--spec", json.dumps(read_spec),
            "--status", str(rstatus.path), "--out", str(workdir / "arrivals.bin")],
            workdir / "reader.log")
        wait_status(reader, rstatus)
        progress(f"[{tag}] starting {SYSTEM_LABEL[system]}", force=True)
        marks["launch"] = time.monotonic()
        rep.launch()
        track = CpuTrack(rep.pids())
        startup_s = rep.wait_ready()
        marks["ready"] = time.monotonic()
        pids = {**rep.pids(), "reader": reader.pid}
        if env.primary_pid:
            pids["primary broker"] = env.primary_pid
        if env.standby_pid:
            pids["standby broker"] = env.standby_pid
        if case["store"] == "s3" and system == "drstream" and env.s3 is not None:
            pids["s3 server"] = env.s3.proc.pid
        if not case["preload"]:
            time.sleep(float(case["settle_s"]))

        def health() -> None:
            problem = rep.health()
            if problem:
                raise BenchError(problem)
            if reader is not None and not reader.alive():
                raise BenchError(f"reader exited; log {reader.log_path}:\n{reader.log_tail()}")

        def line(extra: str = "") -> None:
            r = rstatus.read()
            p = pstatus.read()
            w = r.get("window") or {}
            cores = track.window(time.monotonic() - 5, time.monotonic()) if track else {}
            cpu = ", ".join(f"{n} {v / 5:.2f}" for n, v in cores.items())
            lag = (f"lag p50 {w['p50']:.0f} p99 {w['p99']:.0f} ms" if w.get("n") else "lag -")
            progress(f"[{tag}] {time.monotonic() - marks['load_start']:4.0f}s produced "
                     f"{p.get('acked', 0):,} arrived {r.get('seen', 0):,} {lag}; cores: {cpu}"
                     f"{extra}")

        if not case["preload"]:
            producer = start_child("bench-lag-producer", produce_argv, workdir / "producer.log")
            wait_status(producer, pstatus)  # connected, first record sent
            marks["load_start"] = time.monotonic()
        window = CpuWindow(pids)
        if not case["preload"]:
            wait_producer(producer, pstatus, tag, lambda: (health(), line()))
            marks["load_end"] = time.monotonic()
        produced = pstatus.read()
        target = int(produced["acked"])
        deadline = time.monotonic() + float(case["drain_timeout_s"])
        caught_up = False
        while time.monotonic() < deadline:
            health()
            r = rstatus.read()
            if r.get("seen", 0) >= target:
                caught_up = True
                break
            line(f" (draining: {target - r.get('seen', 0):,} to go)")
            time.sleep(0.05)
        marks["caught_up"] = time.monotonic()
        # The producer has exited by now: its own CPU count (rusage) stands in.
        window_cpu = window.close(None if case["preload"] else
                                  {"producer": float(produced.get("cpu_s") or 0.0)})
        threads = {name: thread_groups(pid) for name, pid in rep.pids().items()}
        time.sleep(1.0)  # late duplicates
        reader.stop(timeout=30)
        marks["reader_stopped"] = time.monotonic()
        stop_info = rep.stop()
        track.stop()
        progress(f"[{tag}] {'caught up' if caught_up else 'NOT caught up'} "
                 f"{marks['caught_up'] - marks['load_start']:.1f}s after the load started; "
                 f"analysing", force=True)
        result = analyse(case, system, workdir, rep, marks, track, window_cpu)
        result.update({"topic": topic, "caught_up": caught_up, "startup_s": startup_s,
                       "stop": stop_info, "replicator": rep.describe(),
                       "log_problems": rep.log_problems(), "threads_cpu_s": threads,
                       "phases": produced.get("phases"),
                       "producer_max_behind_s": produced.get("max_behind_s"),
                       "producer_errors": produced.get("first_errors")})
        return result
    finally:
        for proc in (producer, reader):
            if proc is not None and proc.alive():
                proc.stop(timeout=30)
        if rep.alive():
            rep.stop()
        if track is not None:
            track.stop()
        primary_topics, standby_topics = rep.cleanup_topics()
        env.delete_topics(env.primary, primary_topics)
        env.delete_topics(env.standby, standby_topics)
        rep.cleanup()
        if env.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def thread_groups(pid: int, top: int = 8) -> dict[str, float]:
    """CPU seconds per thread group of a process since it started (/proc/<pid>/task):
    Python's main thread (the event loop), librdkafka threads by role, JVM threads by
    name with numbers dropped."""
    from benchmarks.common import thread_cpu

    out: dict[str, float] = {}
    for t in thread_cpu(pid):
        comm = t["comm"]
        if t["tid"] == pid:
            name = "main thread"
        elif comm.startswith("rdk:broker"):
            name = "rdk:broker*"
        else:
            name = re.sub(r"[-_]?\d+", "#", comm) or "?"
        out[name] = round(out.get(name, 0.0) + t["cpu_s"], 2)
    ranked = sorted(out.items(), key=lambda kv: -kv[1])
    rest = round(sum(v for _, v in ranked[top:]), 2)
    return dict(ranked[:top] + ([("(other threads)", rest)] if rest else []))


def wait_status(proc: Any, status: StatusFile, timeout: float = 60) -> None:
    """Until a subprocess wrote its first status (it is connected and running)."""
    deadline = time.monotonic() + timeout
    while not status.read():
        if not proc.alive() or time.monotonic() > deadline:
            raise BenchError(f"{proc.name} did not start; log {proc.log_path}:\n"
                             f"{proc.log_tail(20)}")
        time.sleep(0.05)


def wait_producer(proc: Any, status: StatusFile, tag: str, tick: Any) -> None:
    while True:
        s = status.read()
        if s.get("done"):
            proc.stop(timeout=30)
            if s.get("errors") or s.get("undelivered"):
                raise BenchError(f"[{tag}] producer: {s.get('errors')} delivery errors, "
                                 f"{s.get('undelivered')} undelivered: {s.get('first_errors')}")
            return
        if not proc.alive():
            raise BenchError(f"[{tag}] producer exited ({proc.popen.returncode}); log "
                             f"{proc.log_path}:\n{proc.log_tail(20)}")
        tick()
        time.sleep(0.1)


# --------------------------------------------------------------------------- analysis


def summarize_ms(values: list[float]) -> dict[str, float | int | None]:
    v = sorted(values)

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 1)

    return {"count": len(v), "p50": r(percentile(v, 50)), "p95": r(percentile(v, 95)),
            "p99": r(percentile(v, 99)), "max": r(v[-1] if v else None),
            "mean": r(sum(v) / len(v) if v else None)}


def match_records(produce_ns: array.array[int], arrival: array.array[int],
                  stamp: array.array[int]) -> dict[str, Any]:
    """Every produced record matched by its stamp: arrived, with the produce time the
    producer recorded for that id. Returns counts and per-record lag (ms, None if missing)."""
    n = len(produce_ns)
    missing = mismatched = 0
    lags: list[float | None] = [None] * n
    for i in range(n):
        a = arrival[i] if i < len(arrival) else 0
        if not a:
            missing += 1
            continue
        if stamp[i] != produce_ns[i]:
            mismatched += 1
            continue
        lags[i] = (a - produce_ns[i]) / 1e6
    beyond = sum(1 for i in range(n, len(arrival)) if arrival[i])
    return {"produced": n, "arrived": n - missing - mismatched + beyond, "missing": missing,
            "stamp_mismatch": mismatched, "unknown_ids": beyond, "lags": lags}


def analyse(case: dict[str, Any], system: str, workdir: Path, rep: Replicator,
            marks: dict[str, float], track: CpuTrack,
            window_cpu: dict[str, float]) -> dict[str, Any]:
    produce_ns = array.array("q")
    produce_ns.frombytes((workdir / "produced.bin").read_bytes())
    arrival, stamp = load_arrivals(workdir / "arrivals.bin")
    rfinal = StatusFile(workdir / "reader.status.json").read()
    pfinal = StatusFile(workdir / "producer.status.json").read()
    m = match_records(produce_ns, arrival, stamp)
    lags = m.pop("lags")
    n = len(produce_ns)
    # Records of warmup phases are checked like the others but left out of the numbers.
    first = next((ph["first_id"] for ph in pfinal.get("phases") or []
                  if not ph.get("warmup")), 0)
    measured = [x for x in lags[first:] if x is not None]
    payload = int(pfinal.get("bytes", 0))
    per_record = payload / n if n else 0
    arrived_ns = sorted(arrival[i] for i in range(first, min(n, len(arrival))) if arrival[i])
    first_a, last_a = (arrived_ns[0], arrived_ns[-1]) if arrived_ns else (0, 0)
    span = (last_a - first_a) / 1e9 if arrived_ns else 0.0
    # Mono <-> wall: marks are monotonic; the record stamps are wall clock.
    wall_minus_mono = time.time_ns() / 1e9 - time.monotonic()
    # The CPU window: from the first measured record's produce time (a backlog: from its
    # first arrival, start-up excluded) until every record had arrived.
    if case["preload"]:
        c0 = (first_a / 1e9 - wall_minus_mono) if arrived_ns else marks["ready"]
        window_records = max(len(arrived_ns) - 1, 0)
        t0_ns = int((marks["launch"] + wall_minus_mono) * 1e9)
    else:
        c0 = produce_ns[first] / 1e9 - wall_minus_mono if first < n else marks["load_start"]
        window_records = n - first
        t0_ns = produce_ns[first] if first < n else 0
    c1 = marks["caught_up"]
    cpu = track.window(c0, c1)
    startup_cpu = track.window(marks["launch"] - 1, marks["ready"])
    window_bytes = window_records * per_record
    cpu_total = sum(cpu.values())
    minutes = max(c1 - c0, 1e-9) / 60
    # Steady-state cost: the second half of the load only (JIT compilation, caches and
    # start-up transients are over by then); records produced in it vs CPU spent in it.
    half = None
    if not case["preload"] and first < n:
        h0 = (c0 + marks["load_end"]) / 2
        h0_ns = (h0 + wall_minus_mono) * 1e9
        recs = sum(1 for i in range(first, n) if produce_ns[i] >= h0_ns)
        h_cpu = sum(track.window(h0, marks["load_end"]).values())
        if recs and h_cpu:
            half = {"cpu_s": round(h_cpu, 2), "payload_bytes": recs * per_record,
                    "cpu_s_per_gib": h_cpu / (recs * per_record / GiB),
                    "mb_per_cpu_s": recs * per_record / 1e6 / h_cpu}
    result: dict[str, Any] = {
        "case": case["name"], "system": system,
        "records": m, "measured_records": n - first, "warmup_records": first,
        "duplicates": rfinal.get("dups", 0),
        "unmatched_on_standby": rfinal.get("unmatched", 0),
        "drstream_offset_mismatch": rfinal.get("bad_origin", 0),
        "payload_bytes": payload, "mean_record_bytes": round(per_record, 1),
        "lag_ms": summarize_ms(measured),
        "lag_ms_with_warmup": summarize_ms([x for x in lags if x is not None]),
        "sustained": {"records_per_s": len(arrived_ns) / span if span else None,
                      "mb_per_s": len(arrived_ns) * per_record / 1e6 / span if span else None,
                      "first_to_last_arrival_s": span},
        "load_s": marks["load_end"] - marks["load_start"],
        "caught_up_after_load_s": marks["caught_up"] - marks["load_end"],
        "launch_to_caught_up_s": marks["caught_up"] - marks["launch"],
        "cpu_window": {"from": "first arrival" if case["preload"] else
                       "first measured record produced", "to": "every record arrived",
                       "seconds": c1 - c0, "payload_bytes": window_bytes},
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "cpu_s_total": round(cpu_total, 2),
        "cpu_s_per_gib": cpu_total / (window_bytes / GiB) if window_bytes else None,
        "mb_per_cpu_s": window_bytes / 1e6 / cpu_total if cpu_total else None,
        "cpu_s_per_min": cpu_total / minutes,
        "second_half": half,
        "startup_cpu_s": {k: round(v, 2) for k, v in startup_cpu.items()},
        "peak_rss_bytes": track.peak_rss(),
        "peak_rss_total_bytes": sum(track.peak_rss().values()),
        "cores": window_cpu,
        # A backlog's records were all produced before the launch: bucket by arrival.
        "timeline": timeline(arrival if case["preload"] else produce_ns, lags, t0_ns),
        "timeline_by": "arrival" if case["preload"] else "produce",
        "freshness": freshness(workdir / "arrivals.fresh.json", c0 + wall_minus_mono,
                               c1 + wall_minus_mono),
    }
    if isinstance(rep, Drstream):
        result["store"] = store_facts(rep, case, produce_ns, arrival, first, payload, c0, c1,
                                      wall_minus_mono)
    return result


def timeline(when_ns: array.array[int], lags: list[float | None], t0_ns: int,
             bucket_s: float = 1.0) -> list[list[float]]:
    """[second since t0 (by `when_ns` of each record: produce or arrival time), records,
    p50, p99, max of the lag] per bucket."""
    buckets: dict[int, list[float]] = {}
    for i, lag in enumerate(lags):
        if lag is not None:
            buckets.setdefault(int((when_ns[i] - t0_ns) / 1e9 // bucket_s), []).append(lag)
    out = []
    for k in sorted(buckets):
        v = sorted(buckets[k])
        out.append([k * bucket_s, len(v), round(percentile(v, 50) or 0, 1),
                    round(percentile(v, 99) or 0, 1), round(v[-1], 1)])
    return out


def freshness(path: Path, t0: float, t1: float) -> dict[str, Any]:
    """Freshness signals that reached the standby between wall times t0 and t1 (s): how
    often, the longest gap without one, and their age on arrival."""
    with contextlib.suppress(OSError, ValueError):
        signals = [s for s in json.loads(path.read_text()) if t0 * 1e9 <= s[0] <= t1 * 1e9]
        signals.sort(key=lambda s: s[0])
        arrivals = [s[0] / 1e9 for s in signals]
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        ages = [(s[0] / 1e6 - s[1]) for s in signals if s[1]]
        return {"signals": len(signals),
                "per_min": len(signals) / max(t1 - t0, 1e-9) * 60,
                "max_gap_s": round(max(gaps), 2) if gaps else None,
                "age_on_arrival_ms": summarize_ms(ages)}
    return {"signals": 0}


def store_facts(rep: Drstream, case: dict[str, Any], produce_ns: array.array[int],
                arrival: array.array[int], first: int, payload: int, c0: float, c1: float,
                wall_minus_mono: float) -> dict[str, Any]:
    """drstream's log: RPO per record, bytes, compression, store requests per minute, and
    where each record's lag went: produce -> its segment cut (created_at, the shipper's
    batching) -> stored (encode, encrypt, PUT) -> durable (every earlier seq stored too)
    -> fetched by apply (its poll) -> arrived at the standby reader (decode, the
    transaction, the reader's fetch)."""
    segs = rep.segments()
    parts = int(case["partitions"])
    # Durable = this segment and every earlier one stored (as the shipper's durable_seq).
    durable: dict[int, int] = {}
    latest = 0
    expected = 1
    for s in segs:
        if s["seq"] != expected:
            break
        latest = max(latest, s["put_done_ns"])
        durable[s["seq"]] = latest
        expected += 1
    # Record i is offset i // parts of partition i % parts (fresh topic, idempotent
    # producer); it is in the first segment whose manifest position passed that offset.
    rpo: list[float] = []
    stages: dict[str, list[float]] = {"produce_to_cut": [], "cut_to_stored": [],
                                      "stored_to_durable": [], "durable_to_fetched": [],
                                      "fetched_to_arrived": []}
    ends: dict[int, list[tuple[int, dict[str, Any]]]] = {p: [] for p in range(parts)}
    for s in segs:
        if s["seq"] in durable:
            s["durable_ns"] = durable[s["seq"]]
            for p, nxt in s["positions"].items():
                if p in ends and (not ends[p] or nxt > ends[p][-1][0]):
                    ends[p].append((nxt, s))
    unmapped = 0
    for p in range(parts):
        k = 0
        lst = ends[p]
        for i in range(p, len(produce_ns), parts):
            o = i // parts
            while k < len(lst) and lst[k][0] <= o:
                k += 1
            if k == len(lst):
                unmapped += 1
                continue
            if i < first:
                continue
            seg, t = lst[k][1], produce_ns[i]
            rpo.append((seg["durable_ns"] - t) / 1e6)
            stages["produce_to_cut"].append((seg["created_ns"] - t) / 1e6)
            stages["cut_to_stored"].append((seg["put_done_ns"] - seg["created_ns"]) / 1e6)
            stages["stored_to_durable"].append((seg["durable_ns"] - seg["put_done_ns"]) / 1e6)
            if seg["fetched_ns"]:
                stages["durable_to_fetched"].append((seg["fetched_ns"] - seg["durable_ns"])
                                                    / 1e6)
                if i < len(arrival) and arrival[i]:
                    stages["fetched_to_arrived"].append((arrival[i] - seg["fetched_ns"]) / 1e6)
    data = [s for s in segs if s["records"]]
    seg_bytes = sum(s["bytes"] for s in segs)
    data_bytes = sum(s["bytes"] for s in data)
    w0, w1 = (c0 + wall_minus_mono) * 1e9, (c1 + wall_minus_mono) * 1e9
    minutes = max(c1 - c0, 1e-9) / 60
    per_min: dict[str, dict[str, float]] = {}
    totals: dict[str, dict[str, int]] = {}
    for command in ("ship", "apply"):
        counts: dict[str, int] = {}
        in_window: dict[str, int] = {}
        for t, op, _key, _n in read_ops(rep.ops_path(command)):
            counts[op] = counts.get(op, 0) + 1
            if w0 <= t <= w1:
                in_window[op] = in_window.get(op, 0) + 1
        totals[command] = counts
        per_min[command] = {op: round(c / minutes, 1) for op, c in sorted(in_window.items())}
    all_per_min: dict[str, float] = {}
    for d in per_min.values():
        for op, v in d.items():
            all_per_min[op] = round(all_per_min.get(op, 0) + v, 1)
    return {
        "type": case["store"],
        "rpo_ms": summarize_ms(rpo), "rpo_unmapped_records": unmapped,
        "lag_breakdown_ms": {k: summarize_ms(v) for k, v in stages.items()},
        "segments": len(segs), "data_segments": len(data),
        "heartbeat_segments": len(segs) - len(data),
        "bytes_written": seg_bytes, "data_segment_bytes": data_bytes,
        "compression_ratio": payload / data_bytes if data_bytes else None,
        "avg_data_segment_bytes": data_bytes / len(data) if data else None,
        "requests_per_min": all_per_min, "requests_per_min_by_process": per_min,
        "requests_total_by_process": totals,
    }


# --------------------------------------------------------------------------- output


def _f(v: Any, fmt: str = ".0f") -> str:
    return "" if v is None else format(v, fmt)


def main_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["case", "system", "records", "MB/s", "records/s", "lag p50 ms", "p95 ms",
               "p99 ms", "max ms", "RPO p50 ms", "RPO p99 ms", "CPU s/GiB", "MB per CPU-s",
               "CPU s/GiB 2nd half",
               "peak RSS MiB", "compression", "store MiB", "store req/min PUT/GET/HEAD/LIST",
               "missing/dup"]
    rows = []
    for r in results:
        lag, st = r["lag_ms"], r.get("store")
        rec = r["records"]
        req = ""
        if st:
            q = st["requests_per_min"]
            req = "/".join(_f(q.get(op, 0)) for op in ("PUT", "GET", "HEAD", "LIST"))
        rows.append([
            r["case"], SYSTEM_LABEL[r["system"]], f"{rec['produced']:,}",
            _f(r["sustained"]["mb_per_s"], ".1f"), _f(r["sustained"]["records_per_s"]),
            _f(lag["p50"]), _f(lag["p95"]), _f(lag["p99"]), _f(lag["max"]),
            _f(st["rpo_ms"]["p50"]) if st else "n/a", _f(st["rpo_ms"]["p99"]) if st else "n/a",
            *([_f(r["cpu_s_per_gib"], ".1f"), _f(r["mb_per_cpu_s"], ".1f"),
               _f((r.get("second_half") or {}).get("cpu_s_per_gib"), ".1f")]
              if r["cpu_window"]["payload_bytes"] >= 10e6 else ["(idle)"] * 3),
            _f(r["peak_rss_total_bytes"] / MiB),
            _f(st["compression_ratio"], ".2f") if st else "n/a (none)",
            _f(st["bytes_written"] / MiB, ".1f") if st else "n/a",
            req or "n/a", f"{rec['missing']}/{r['duplicates']}",
        ])
    return headers, rows


def breakdown_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    stages = [("produce_to_cut", "produce -> segment cut"), ("cut_to_stored", "cut -> stored"),
              ("stored_to_durable", "stored -> durable"),
              ("durable_to_fetched", "durable -> apply fetched"),
              ("fetched_to_arrived", "fetched -> on the standby")]
    headers = ["case", *[f"{label} p50/p99 ms" for _, label in stages], "e2e p50/p99 ms"]
    rows = []
    for r in results:
        b = (r.get("store") or {}).get("lag_breakdown_ms")
        if not b:
            continue
        rows.append([r["case"], *[f"{_f(b[k]['p50'])}/{_f(b[k]['p99'])}" for k, _ in stages],
                     f"{_f(r['lag_ms']['p50'])}/{_f(r['lag_ms']['p99'])}"])
    return headers, rows


def freshness_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["case", "system", "freshness signal", "signals/min", "max gap s",
               "signal age p50 ms", "records", "record lag max ms", "CPU s/min",
               "store req/min"]
    rows = []
    for r in results:
        fr = r["freshness"]
        st = r.get("store")
        rows.append([
            r["case"], SYSTEM_LABEL[r["system"]],
            "apply checkpoint (per segment, heartbeats included)" if r["system"] == "drstream"
            else "MM2 heartbeats topic", _f(fr.get("per_min"), ".1f"),
            _f(fr.get("max_gap_s"), ".1f"),
            _f((fr.get("age_on_arrival_ms") or {}).get("p50")),
            r["records"]["produced"], _f(r["lag_ms"]["max"]), _f(r["cpu_s_per_min"], ".2f"),
            "/".join(_f(st["requests_per_min"].get(op, 0)) for op in ("PUT", "GET", "HEAD"))
            if st else "n/a"])
    return headers, rows


def render(report: dict[str, Any]) -> tuple[str, str]:
    m = report["machine"]
    facts = (f"{m['nproc']} CPUs ({m.get('cpu_model')}), "
             f"{(m.get('mem_total_bytes') or 0) / GiB:.0f} GiB RAM, Python {m['python']}, "
             f"Kafka {m.get('kafka')} (brokers and MirrorMaker 2), {m.get('java')}, "
             f"confluent-kafka {m.get('confluent_kafka')} / librdkafka {m.get('librdkafka')}; "
             f"load average {m['loadavg_at_start'][0]:.2f} at start, "
             f"{report['loadavg_at_end'][0]:.2f} at end")
    results = report["results"]
    h, rows = main_table(results)
    md = ["# drstream vs MirrorMaker 2: replication lag", "",
          f"`{report['command']}` ({report['total_s'] / 60:.1f} min, {m['timestamp']})", "",
          facts, "", md_table(h, rows), ""]
    txt = [facts, "", text_table(h, rows), ""]
    bh, brows = breakdown_table(results)
    if brows:
        md += ["Where drstream's lag goes (per record, from the store operations timed inside "
               "ship and apply and the segments' created_at):", "", md_table(bh, brows), ""]
        txt += ["drstream lag breakdown:", text_table(bh, brows), ""]
    idle = [r for r in results if r["case"].startswith("idle")]
    if idle:
        fh, frows = freshness_table(idle)
        md += ["Freshness while idle:", "", md_table(fh, frows), ""]
        txt += ["freshness while idle:", text_table(fh, frows), ""]
    md += ["![lag over time](lag.png)", "", "Columns: lag = standby arrival - produce time "
           "(every record, matched by its stamp); RPO = produce -> its segment durable in the "
           "store (drstream only; MM2 has no intermediate store, RPO is its e2e lag); MB/s "
           "and records/s from the first to the last arrival; CPU s/GiB = utime+stime of the "
           "replicator processes (drstream: ship + apply; MM2: its JVM) per GiB of payload "
           "over the load (backlog: from the first arrival); peak RSS = sum over those "
           "processes; compression = payload / stored segment bytes; store requests per "
           "minute of ship + apply over the load.", ""]
    notes = report.get("notes") or []
    if notes:
        md += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
        txt += ["notes:"] + [f"  - {n}" for n in notes]
    return "\n".join(md), "\n".join(txt)


def observations(results: list[dict[str, Any]],
                 failures: list[dict[str, Any]] | None = None) -> list[str]:
    notes = [f"{f['case']}/{SYSTEM_LABEL[f['system']]}: FAILED: {f['error'][:300]}"
             for f in failures or []]
    for r in results:
        tag = f"{r['case']}/{SYSTEM_LABEL[r['system']]}"
        rec = r["records"]
        if rec["missing"] or r["duplicates"] or rec["stamp_mismatch"] or rec["unknown_ids"]:
            notes.append(f"{tag}: {rec['missing']} missing, {r['duplicates']} duplicates, "
                         f"{rec['stamp_mismatch']} stamp mismatches, {rec['unknown_ids']} "
                         f"unknown ids on the standby")
        if not r["caught_up"]:
            notes.append(f"{tag}: NOT caught up within the drain timeout")
        if r.get("drstream_offset_mismatch"):
            notes.append(f"{tag}: {r['drstream_offset_mismatch']} records with a "
                         f"drstream.offset/partition that does not match their id")
        if (r.get("producer_max_behind_s") or 0) > 0.5:
            notes.append(f"{tag}: the load generator fell up to "
                         f"{r['producer_max_behind_s']:.1f}s behind its schedule (CPU bound)")
        bad_stop = {k: v for k, v in r["stop"].items()
                    if v.get("exit_code") not in (0, 143)}
        if bad_stop:
            notes.append(f"{tag}: unclean stop {bad_stop}")
        if r["log_problems"]:
            notes.append(f"{tag}: {len(r['log_problems'])}+ warning/error log lines, first: "
                         f"{r['log_problems'][0][:200]}")
        cores = r["cores"]
        threads = "; ".join(f"{proc}: " + ", ".join(f"{k} {v:.1f}" for k, v in groups.items()
                                                     if v >= 0.1)
                            for proc, groups in (r.get("threads_cpu_s") or {}).items())
        if threads:
            notes.append(f"{tag}: CPU seconds by thread over the whole run: {threads}")
        notes.append(f"{tag}: start-up {r['startup_s']:.1f}s (CPU "
                     f"{sum(r['startup_cpu_s'].values()):.1f}s); during the load cores: "
                     + ", ".join(f"{k.removesuffix('_cores')} {v:.2f}" for k, v in cores.items()
                                 if k.endswith("_cores")))
    return notes


def plot(report: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    results = report["results"]
    cases = list(dict.fromkeys(r["case"] for r in results))
    fig, axes = plt.subplots(len(cases), 1, figsize=(10, 2.8 * len(cases)), squeeze=False)
    colors = {"drstream": "tab:blue", "mm2": "tab:orange"}
    for ax, case in zip(axes[:, 0], cases, strict=True):
        for r in (r for r in results if r["case"] == case):
            tl = r["timeline"]
            if not tl:
                continue
            x = [row[0] for row in tl]
            style = {"marker": "o", "linestyle": "none"} if len(tl) < 10 else {}
            ax.plot(x, [row[3] for row in tl], color=colors[r["system"]],
                    label=f"{SYSTEM_LABEL[r['system']]} p99", **style)
            ax.plot(x, [row[2] for row in tl], color=colors[r["system"]], alpha=0.5,
                    linestyle="--" if not style else "none",
                    marker=style.get("marker"), label=f"{SYSTEM_LABEL[r['system']]} p50")
        ax.set_yscale("log")
        ax.set_title(case, fontsize=10)
        ax.set_ylabel("e2e lag ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("seconds since the load started, records by produce time "
                           "(backlog: since the replicator launched, records by arrival time)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def run_cases(cases: list[dict[str, Any]], systems: list[str], *, primary: str | None = None,
              standby: str | None = None, keep: bool = False,
              profile_dir: Path | None = None) -> dict[str, Any]:
    """Run every case with every system (in that order), on given clusters or on two
    started here; returns the report (without writing it)."""
    from tests.infra.procs import RUN_DIR

    RUN_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-lag-", dir=RUN_DIR))
    clusters: list[Any] = []
    env: Env | None = None
    started = time.monotonic()
    report: dict[str, Any] = {"machine": machine_facts(), "results": [], "failures": []}
    try:
        if primary is None or standby is None:
            from tests.infra.kafka import start_clusters

            progress("starting primary and standby Kafka clusters", force=True)
            clusters = start_clusters(("primary", "standby"), base_dir=work / "kafka")
            primary, standby = (c.bootstrap_servers for c in clusters)
        env = Env(primary, standby, work, keep=keep, profile_dir=profile_dir,
                  primary_pid=clusters[0].pid if clusters else None,
                  standby_pid=clusters[1].pid if clusters else None)
        if "mm2" in systems:
            from benchmarks.mm2 import ensure_jars

            ensure_jars()
        report["clusters"] = {"primary": primary, "standby": standby,
                              "started_here": bool(clusters)}
        for case in cases:
            for system in systems:
                if system not in case["systems"]:
                    continue
                t0 = time.monotonic()
                try:
                    r = run_one(env, case, system)
                except Exception as e:
                    # One broken case does not cost the others; the report says what failed.
                    progress(f"[{case['name']}/{system}] FAILED: {e}", force=True)
                    report["failures"].append({"case": case["name"], "system": system,
                                               "error": str(e)[:3000]})
                    continue
                r["case_wall_s"] = time.monotonic() - t0
                report["results"].append(r)
                lag = r["lag_ms"]
                progress(f"[{case['name']}/{system}] done in {r['case_wall_s']:.0f}s: "
                         f"{r['records']['arrived']:,}/{r['records']['produced']:,} arrived, "
                         f"lag p50 {lag['p50']} p99 {lag['p99']} ms, "
                         f"{_f(r['cpu_s_per_gib'], '.1f')} CPU s/GiB", force=True)
        return report
    finally:
        report["total_s"] = time.monotonic() - started
        report["loadavg_at_end"] = os.getloadavg()
        if env is not None and env.s3 is not None:
            env.s3.stop()
        for c in clusters:
            c.stop() if keep else c.remove()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def write_report(report: dict[str, Any], out_dir: Path, *, plot_png: bool = True,
                 ) -> list[Path]:
    report["notes"] = observations(report["results"], report.get("failures"))
    md, txt = render(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "lag.json", out_dir / "lag.md"]
    write_atomic(paths[0], json.dumps(report, indent=1, default=str) + "\n")
    write_atomic(paths[1], md + "\n")
    png = plot(report, out_dir / "lag.png") if plot_png else None
    if png is not None:
        paths.append(png)
    print(txt)
    return paths


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lag", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="all", help="comma-separated case names from "
                    "benchmarks/cases (default: all, in their order)")
    ap.add_argument("--case-file", type=Path, action="append", default=[],
                    help="a case file (repeatable; replaces --cases)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="drstream,mm2 (default both)")
    ap.add_argument("--store", choices=["file", "s3"], default=None,
                    help="drstream's store for every case (default: each case's own)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every phase's seconds and records (e.g. 0.2 for a quick run)")
    ap.add_argument("--primary", help="primary bootstrap servers (default: start clusters)")
    ap.add_argument("--standby", help="standby bootstrap servers")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--keep", action="store_true", help="keep work dirs and cluster data")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="sample drstream ship/apply stacks (every thread, 10 ms) and CPU per "
                         "thread into DIR/<case>-<command>.json; results then go to DIR too "
                         "(profiled numbers are not the benchmark's)")
    args = ap.parse_args(argv)
    if bool(args.primary) != bool(args.standby):
        ap.error("--primary and --standby go together")
    return args


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    entry = {"_produce": produce_main, "_read": read_main, "_daemon": daemon_main}
    if raw[:1] and raw[0] in entry:
        return entry[raw[0]](raw[1:])
    args = parse_args(raw)
    if args.case_file:
        cases = [load_case(p) for p in args.case_file]
    else:
        cases = all_cases()
        if args.cases != "all":
            wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
            known = {c["name"]: c for c in cases}
            missing = [w for w in wanted if w not in known]
            if missing:
                print(f"unknown cases {missing}; known: {sorted(known)}", file=sys.stderr)
                return 2
            cases = [known[w] for w in wanted]
    cases = [scaled(c, args.scale) for c in cases]
    if args.store:
        for c in cases:
            c["store"] = args.store
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if set(systems) - set(SYSTEMS):
        print(f"unknown systems {systems}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run_cases(cases, systems, primary=args.primary, standby=args.standby,
                       keep=args.keep, profile_dir=args.profile)
    report["command"] = " ".join(["python -m benchmarks.lag", *raw])
    report["params"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report["cases"] = cases
    paths = write_report(report, args.profile or args.out_dir)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
