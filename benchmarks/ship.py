"""`drstream ship` end to end against a real Kafka cluster: backlog drain and RPO.

    python -m benchmarks.ship [--cases backlog,rpo] [--backlog-mib 1024] [--partitions 12]
                              [--variant NAME=JSON ...] [--rate-mbps 10[,1]] [--seconds 30]
                              [--min-intervals 0.1,0.02] [--buffer-max-mib 64]
                              [--profile none|cprofile|cpu|stacks] [--render JSON]
    python -m benchmarks.ship --backlog-mib 64 --seconds 5 --min-intervals 0.1   # small

Starts its own single-node Kafka cluster (tests/infra, deleted afterwards), then:

backlog  Preloads --backlog-mib of ~1 KiB JSON-like records (keys, 2-3 headers) over
         --partitions partitions of one topic with a fast producer, then, for each variant
         (extra librdkafka properties given to both consumers; default: none, and
         fetch.queue.backoff.ms=10), drains it twice:
         (a) bare: a confluent-kafka consume loop in its own process (Consumer.consume(2000),
             read_committed, touching key/value/headers/timestamp/offset of each message);
         (b) ship: `drstream ship` as a subprocess to a file store in a temp dir, until the
             durable head's manifest positions reach the end offsets of every partition;
             then SIGTERM.
         MB/s are payload MB (10**6 bytes of keys, values, header keys and values) over the
         wall time from process launch to done; CPU is utime+stime of the process tree from
         /proc; RSS is VmRSS sampled every 100 ms. Target: ship/bare >= 0.5 and peak RSS <=
         buffer_max_bytes + 200 MiB. The drained log is then decoded whole and checked: every
         produced record exactly once, per-partition offsets contiguous.
rpo      For each ship.min_interval_s: a paced producer (its own process) sends --rate-mbps of
         ~1 KiB records for --seconds, each stamped with its produce time (header
         bench.produce_ns); the shipper ships to a fresh file store; a watcher thread polls
         the log every 10 ms and records when each segment file first appears (the file
         store links a complete, fsynced file into place, so appearance ~ durable; a segment
         counts as durable once it and every earlier seq exist, as the shipper's own
         durable_seq does). RPO of a record = durable time of its segment - produce time;
         also reported against the producer's ack time and split at the segment's
         created_at_ms (encode time). Target: p99 <= min_interval_s + 50 ms (150 ms at the
         default 0.1 s, the lag issue's RPO target at 10 MB/s). Cost side:
         segments (PUTs) per minute and average segment size.

Writes benchmarks/results/ship.json and ship.md and prints the same tables. A progress line
goes to stderr every 5 s. A benchmark, not a test: nothing here asserts on time.

Internal entry points (run as subprocesses): `_bare`, `_produce`, `_stacks`, `_cpu`.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import (
    CpuWindow,
    GiB,
    MiB,
    ProcSampler,
    Progress,
    RecordFactory,
    cpu_seconds,
    create_topic,
    end_offsets,
    exit_on_sigterm,
    kafka_cluster,
    machine_facts,
    md_table,
    preload,
    summarize,
    text_table,
    thread_cpu,
    write_results,
)

LOG_ID = "bench"
RPO_SLACK_MS = 50  # RPO target: p99 <= min_interval_s + this
STREAM = "kafka:primary"
BACKLOG_TOPIC = "backlog"
PRODUCE_HEADER = "bench.produce_ns"
CONSUME_BATCH = 2000  # connectors.kafka.config.DEFAULT_CONSUME_BATCH
RSS_SLACK = 200 * MiB
DEFAULT_BUFFER_MAX = 64 * MiB  # daemon.config.DEFAULT_BUFFER_MAX_BYTES
WATCH_POLL_S = 0.01
WARMUP_S = 3.0  # RPO is also summarized without records produced in the first seconds
# librdkafka property sets for the backlog case. "as-configured" is what `drstream ship`
# runs today; librdkafka >= 2.2 waits fetch.queue.backoff.ms (default 1000) before fetching
# a partition again once its prefetch queue was over queued.max.messages.kbytes, which
# throttles any consumer that drains the queue faster than that.
DEFAULT_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("as-configured", {}),
    ("fetch.queue.backoff.ms=10", {"fetch.queue.backoff.ms": 10}),
]

progress = Progress(5.0)


# --------------------------------------------------------------------------- shipper


def write_config(workdir: Path, bootstrap: str, topic_regex: str, ship: dict[str, Any],
                 properties: dict[str, Any] | None = None) -> Path:
    from drstream.daemon.config import load_config
    from drstream.daemon.keyring import generate_key_file

    key = workdir / "k1.key"
    generate_key_file(key)
    config = {
        "log_id": LOG_ID,
        "store": {"type": "file", "path": str(workdir / "store")},
        "keyring": {"active": "k1", "keys": {"k1": f"file:{key}"}},
        "sources": [{"type": "kafka", "name": "primary", "bootstrap_servers": bootstrap,
                     "topics": {"include": [topic_regex]},
                     "properties": properties or {}}],
        "ship": ship,
        "logging": {"level": "info", "format": "json"},
    }
    from drstream.daemon.config import Config

    if "service" in Config.model_fields:
        # Metrics/health stay on, as in production, but on a free port: the default port
        # may be taken by another shipper on this machine.
        from tests.infra.procs import free_port

        config["service"] = {"ship_metrics_listen": f"127.0.0.1:{free_port()}"}
    path = workdir / "drstream.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    load_config(path)  # fail here, not in the subprocess, on a bad config
    return path


class ShipperProc:
    """`drstream ship --config F` in its own process group, stderr to a log file."""

    def __init__(self, config: Path, log_path: Path, profile: str = "none",
                 profile_out: Path | None = None) -> None:
        cli = ["-m", "drstream.daemon.cli", "ship", "--config", str(config)]
        if profile == "cprofile":
            argv = [sys.executable, "-m", "cProfile", "-o", str(profile_out), *cli]
        elif profile in ("stacks", "cpu"):
            argv = [sys.executable, "-m", "benchmarks.ship", f"_{profile}", "--out",
                    str(profile_out), "--", "ship", "--config", str(config)]
        else:
            argv = [sys.executable, *cli]
        self.log_path = log_path
        self.launched = time.monotonic()
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          cwd=Path(__file__).resolve().parent.parent)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def events(self) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    out.append({"event": "non_json_line", "level": "?", "line": line[:300]})
                    continue
                if isinstance(ev, dict):
                    out.append(ev)
        return out

    def wait_started(self, timeout: float = 90) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"shipper exited ({self.popen.returncode}) before starting:"
                                   f"\n{self.tail()}")
            if any(e.get("event") == "ship_started" for e in self.events()):
                return time.monotonic() - self.launched
            time.sleep(0.05)
        raise RuntimeError(f"shipper did not start in {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return "(no log)"

    def stop(self, timeout: float = 90) -> dict[str, Any]:
        """SIGTERM (drain), wait; SIGKILL after `timeout`."""
        t0 = time.monotonic()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
        killed = False
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            killed = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(30)
        return {"exit_code": self.popen.returncode, "stop_s": time.monotonic() - t0,
                "killed": killed}

    def log_summary(self) -> dict[str, Any]:
        events = self.events()
        counts = Counter(f"{e.get('level', '?')}:{e.get('event', '?')}" for e in events)
        problems = [e for e in events if e.get("level") not in ("info", "debug")]
        return {"event_counts": dict(counts), "problems": problems[:20],
                "problem_count": len(problems)}


class LogReader:
    """Reads the shipper's log in the file store: durable head, manifests, segments."""

    def __init__(self, workdir: Path) -> None:
        from drstream.connectors.file.store import FileStore, FileStoreConfig
        from drstream.daemon.config import load_config
        from drstream.daemon.deltalog import DeltaLog
        from drstream.daemon.keyring import KeyRing, load_key

        config = load_config(workdir / "drstream.yaml")
        self.keyring = KeyRing({k: load_key(ref) for k, ref in config.keyring.keys.items()},
                               config.keyring.active)
        self.root = workdir / "store"
        self.dir = self.root / "logs" / LOG_ID
        self.store = FileStore(FileStoreConfig(type="file", path=str(self.root)))
        self.log = DeltaLog(self.store, LOG_ID)
        self._loop = asyncio.new_event_loop()

    def close(self) -> None:
        self._loop.close()

    def path(self, seq: int) -> Path:
        return self.dir / f"{seq:020d}.seg"

    def head_seq(self) -> int | None:
        if not self.dir.is_dir():
            return None
        return self._loop.run_until_complete(self.log.head_seq())

    def shipped(self, seq: int, topic: str) -> dict[int, int]:
        from drstream.daemon.segment import read_manifest

        _, manifest = read_manifest(self.path(seq).read_bytes(), self.keyring,
                                    expect_log_id=LOG_ID, expect_seq=seq)
        parts = manifest.positions.get(STREAM, {}).get(topic, {})
        return {int(p): int(o) for p, o in parts.items()}

    def decode(self, seq: int) -> tuple[Any, Any, int]:
        from drstream.daemon.segment import decode_segment

        data = self.path(seq).read_bytes()
        header, body = decode_segment(data, self.keyring, expect_log_id=LOG_ID, expect_seq=seq)
        return header, body, len(data)


def wait_shipped(reader: LogReader, proc: ShipperProc, topic: str, ends: dict[int, int],
                 timeout: float, bytes_per_record: float, label: str,
                 poll_s: float = 0.1) -> dict[str, Any]:
    """Poll the durable head until its positions reach `ends`; return timing facts."""
    t0 = proc.launched
    target = sum(ends.values())
    head: int | None = None
    first_seg_t = first_seg_records = None
    shipped_records = 0
    while True:
        now = time.monotonic()
        if not proc.alive():
            raise RuntimeError(f"shipper exited ({proc.popen.returncode}) while {label}:\n"
                               f"{proc.tail()}")
        h = reader.head_seq()
        if h is not None and h != head:
            head = h
            shipped = reader.shipped(h, topic)
            shipped_records = sum(min(shipped.get(p, 0), e) for p, e in ends.items())
            if first_seg_t is None:
                first_seg_t, first_seg_records = now, shipped_records
            if all(shipped.get(p, 0) >= e for p, e in ends.items()):
                cpu = cpu_seconds(proc.pid)
                threads = thread_cpu(proc.pid)
                progress(f"{label}: done, {shipped_records * bytes_per_record / 1e6:,.0f} MB "
                         f"in {now - t0:.1f}s, head seq {head}", force=True)
                return {"done_t": now, "wall_s": now - t0, "head_seq": head,
                        "first_segment_s": first_seg_t - t0,
                        "first_segment_records": first_seg_records,
                        "cpu_s": cpu, "threads": threads, "timed_out": False}
        if now - t0 > timeout:
            return {"done_t": now, "wall_s": now - t0, "head_seq": head, "timed_out": True,
                    "shipped_records": shipped_records, "target_records": target,
                    "cpu_s": cpu_seconds(proc.pid), "threads": thread_cpu(proc.pid)}
        mb = shipped_records * bytes_per_record / 1e6
        progress(f"{label}: {mb:,.0f} MB durable ({100 * shipped_records / max(target, 1):.0f}%)"
                 f", {mb / max(now - t0, 1e-9):.1f} MB/s since launch, head seq {head}")
        time.sleep(poll_s)


def group_threads(threads: list[dict[str, Any]], pid: int) -> dict[str, float]:
    """Per-thread CPU grouped: the main (event loop) thread, librdkafka threads by role,
    other Python threads (the consumer thread and asyncio.to_thread workers)."""
    out: dict[str, float] = {}
    for t in threads:
        if t["tid"] == pid:
            name = "main (event loop)"
        elif t["comm"].startswith("rdk:broker"):
            name = "rdk:broker*"
        elif t["comm"].startswith("rdk:"):
            name = t["comm"]
        else:
            name = f"other python threads ({t['comm']})"
        out[name] = round(out.get(name, 0.0) + t["cpu_s"], 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------- backlog case


def run_bare(bootstrap: str, topic: str, ends: dict[int, int], queued_kbytes: int,
             payload_bytes: int, props: dict[str, Any]) -> dict[str, Any]:
    argv = [sys.executable, "-m", "benchmarks.ship", "_bare", "--bootstrap", bootstrap,
            "--topic", topic, "--ends", json.dumps(ends), "--queued-kbytes", str(queued_kbytes),
            "--properties", json.dumps(props)]
    t0 = time.monotonic()
    popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             cwd=Path(__file__).resolve().parent.parent)
    sampler = ProcSampler(popen.pid).start()
    out, _ = popen.communicate(timeout=3600)
    wall = time.monotonic() - t0
    sampler.stop()
    if popen.returncode != 0:
        raise RuntimeError(f"bare consumer failed with exit {popen.returncode}")
    child = json.loads(out.decode().strip().splitlines()[-1])
    cpu = child["rusage_cpu_s"]
    return {
        "wall_s": wall,
        "consume_wall_s": child["consume_wall_s"],
        "records": child["records"],
        "errors": child["errors"],
        "cpu_s": cpu,
        "consume_cpu_s": child["consume_cpu_s"],
        "mb_per_s": payload_bytes / 1e6 / wall,
        "mb_per_s_consume": payload_bytes / 1e6 / child["consume_wall_s"],
        "cpu_s_per_gib": cpu / (payload_bytes / GiB),
        "peak_rss_bytes": max(sampler.peak_rss, child["maxrss_bytes"]),
        "threads": child.get("threads"),
    }


def bare_main(argv: list[str]) -> int:
    import resource

    from confluent_kafka import Consumer, TopicPartition

    ap = argparse.ArgumentParser(prog="benchmarks.ship _bare")
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--ends", required=True)
    ap.add_argument("--queued-kbytes", type=int, required=True)
    ap.add_argument("--batch", type=int, default=CONSUME_BATCH)
    ap.add_argument("--properties", default="{}", help="extra librdkafka properties (JSON)")
    args = ap.parse_args(argv)
    ends = {int(p): int(o) for p, o in json.loads(args.ends).items()}
    t0, c0 = time.monotonic(), time.process_time()
    c = Consumer({
        "bootstrap.servers": args.bootstrap, "group.id": "bench-bare",
        "enable.auto.commit": False, "enable.auto.offset.store": False,
        "isolation.level": "read_committed", "auto.offset.reset": "earliest",
        "enable.partition.eof": False, "queued.max.messages.kbytes": args.queued_kbytes,
        **json.loads(args.properties),
    })
    # Concrete start offsets, as the shipper assigns (low watermark = 0 here).
    c.incremental_assign([TopicPartition(args.topic, p, 0) for p in ends])
    remaining = {p for p, e in ends.items() if e > 0}
    records = nbytes = errors = 0
    consume = c.consume
    while remaining:
        for m in consume(args.batch, 0.1):
            if m.error() is not None:
                errors += 1
                continue
            _ts_type, _ts = m.timestamp()
            key, value, headers = m.key(), m.value(), m.headers() or []
            offset, partition, _topic = m.offset(), m.partition(), m.topic()
            nbytes += 64 + len(key or b"") + len(value or b"") + len(headers)
            records += 1
            if offset + 1 >= ends[partition]:
                remaining.discard(partition)
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    threads = thread_cpu(os.getpid())
    c.close()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "consume_wall_s": wall, "consume_cpu_s": cpu, "records": records, "errors": errors,
        "rusage_cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_bytes": ru.ru_maxrss * 1024,
        "threads": group_threads(threads, os.getpid()),
    }))
    return 0


def verify_log(reader: LogReader, head: int, topic: str, ends: dict[int, int]
               ) -> dict[str, Any]:
    """Decode every segment: each produced record exactly once, offsets contiguous."""
    next_off = dict.fromkeys(ends, 0)
    problems: list[str] = []
    sizes: list[int] = []
    recs_per_seg: list[int] = []
    heartbeats = records = 0
    for seq in range(1, head + 1):
        _, body, size = reader.decode(seq)
        n = 0
        for b in body.batches:
            if getattr(b, "topic", None) != topic:
                continue
            offs = [r.offset for r in b.records]
            if offs and offs[0] != next_off.get(b.partition):
                problems.append(f"seq {seq} p{b.partition}: starts at {offs[0]}, expected "
                                f"{next_off.get(b.partition)}")
            if offs and offs != list(range(offs[0], offs[0] + len(offs))):
                problems.append(f"seq {seq} p{b.partition}: offsets not contiguous")
            if offs:
                next_off[b.partition] = offs[-1] + 1
            n += len(offs)
        if body.manifest.kind == "heartbeat":
            heartbeats += 1
        else:
            sizes.append(size)
            recs_per_seg.append(n)
        records += n
    missing = {p: (next_off[p], e) for p, e in ends.items() if next_off[p] != e}
    if missing:
        problems.append(f"partitions not complete (got, want): {missing}")
    return {"segments": head, "data_segments": len(sizes), "heartbeat_segments": heartbeats,
            "records": records, "exactly_once": not problems, "problems": problems[:10],
            "avg_segment_bytes": sum(sizes) / len(sizes) if sizes else None,
            "max_segment_bytes": max(sizes) if sizes else None,
            "avg_records_per_segment": sum(recs_per_seg) / len(recs_per_seg) if sizes else None,
            "log_bytes": sum(sizes)}


def run_backlog(args: argparse.Namespace, cluster: Any, factory: RecordFactory,
                report: dict[str, Any]) -> None:
    bs, parts = cluster.bootstrap_servers, args.partitions
    create_topic(bs, BACKLOG_TOPIC, parts)
    target = args.backlog_mib * MiB
    stats = preload(bs, BACKLOG_TOPIC, parts, target, factory, progress)
    ends = end_offsets(bs, BACKLOG_TOPIC, parts)
    if sum(ends.values()) != stats.records:
        raise RuntimeError(f"end offsets {sum(ends.values())} != produced {stats.records}")
    progress(f"preload: {stats.records:,} records, {stats.payload_bytes / 1e6:,.0f} MB in "
             f"{stats.seconds:.1f}s ({stats.payload_bytes / 1e6 / stats.seconds:.0f} MB/s)",
             force=True)
    out: dict[str, Any] = {"preload": stats.as_dict(), "end_offsets": ends,
                           "mean_record_payload_bytes": stats.payload_bytes / stats.records,
                           "variants": {}}
    report["backlog"] = out
    for name, props in args.variants:
        out["variants"][name] = v = {"properties": props}
        v["bare"] = run_bare_case(args, cluster, stats, ends, props, name)
        v["ship"] = run_ship_case(args, cluster, stats, ends, props, name)
        v["ship_over_bare"] = v["ship"]["mb_per_s"] / v["bare"]["mb_per_s"]
        v["ship_over_bare_cpu"] = v["ship"]["cpu_s_per_gib"] / v["bare"]["cpu_s_per_gib"]


def run_bare_case(args: argparse.Namespace, cluster: Any, stats: Any, ends: dict[int, int],
                  props: dict[str, Any], name: str) -> dict[str, Any]:
    queued_kbytes = max(1024, args.buffer_max_mib * MiB // 4096)  # as the Kafka source sets
    progress(f"[{name}] bare consume loop: running", force=True)
    window = CpuWindow({"broker": cluster.pid})
    bare = run_bare(cluster.bootstrap_servers, BACKLOG_TOPIC, ends, queued_kbytes,
                    stats.payload_bytes, props)
    bare["cpu_window"] = window.close({"bare": bare["cpu_s"]})
    bare["queued_max_messages_kbytes"] = queued_kbytes
    progress(f"[{name}] bare: {bare['mb_per_s']:.1f} MB/s ({bare['wall_s']:.1f}s), "
             f"{bare['cpu_s_per_gib']:.2f} CPU s/GiB", force=True)
    return bare


def run_ship_case(args: argparse.Namespace, cluster: Any, stats: Any, ends: dict[int, int],
                  props: dict[str, Any], name: str) -> dict[str, Any]:
    per_record = stats.payload_bytes / stats.records
    buffer_max = args.buffer_max_mib * MiB
    workdir = Path(tempfile.mkdtemp(prefix="drstream-bench-ship-"))
    try:
        ship_cfg: dict[str, Any] = {"buffer_max_bytes": buffer_max}
        config = write_config(workdir, cluster.bootstrap_servers, f"^{BACKLOG_TOPIC}$",
                              ship_cfg, props)
        profile_out = None
        if args.profile != "none":
            suffix = {"cprofile": "prof", "stacks": "json", "cpu": "txt"}[args.profile]
            profile_out = args.profile_dir / f"ship-backlog-{name}.{suffix}"
            profile_out.parent.mkdir(parents=True, exist_ok=True)
        proc = ShipperProc(config, workdir / "ship.log", args.profile, profile_out)
        window = CpuWindow({"ship": proc.pid, "broker": cluster.pid})
        sampler = ProcSampler(proc.pid).start()
        reader = LogReader(workdir)
        try:
            done = wait_shipped(reader, proc, BACKLOG_TOPIC, ends, args.timeout, per_record,
                                f"[{name}] ship backlog")
            cpu_window = window.close()
            stopped = proc.stop()
        finally:
            sampler.stop()
            if proc.alive():
                proc.stop()
        cpu = done["cpu_s"] or sampler.last_cpu
        wall = done["wall_s"]
        steady_records = stats.records - (done.get("first_segment_records") or 0)
        steady_s = wall - (done.get("first_segment_s") or 0)
        ship: dict[str, Any] = {
            "config": {"buffer_max_bytes": buffer_max, "source_properties": props},
            "timed_out": done["timed_out"],
            "wall_s": wall,
            "startup_to_first_segment_s": done.get("first_segment_s"),
            "mb_per_s": stats.payload_bytes / 1e6 / wall,
            "mb_per_s_after_first_segment": steady_records * per_record / 1e6 / steady_s
            if steady_s > 0 else None,
            "cpu_s": cpu,
            "cpu_s_per_gib": cpu / (stats.payload_bytes / GiB),
            "peak_rss_bytes": sampler.peak_rss,
            "rss_at_end_bytes": sampler.samples[-1][2] if sampler.samples else None,
            "rss_bound_bytes": buffer_max + RSS_SLACK,
            "rss_within_bound": sampler.peak_rss <= buffer_max + RSS_SLACK,
            "rss_timeline_mib": rss_timeline(sampler),
            "threads_cpu_s": group_threads(done["threads"], proc.pid),
            "cpu_window": cpu_window,
            "stop": stopped,
            "log": proc.log_summary(),
        }
        progress(f"[{name}] ship: {ship['mb_per_s']:.1f} MB/s ({wall:.1f}s), "
                 f"{ship['cpu_s_per_gib']:.2f} CPU s/GiB, peak RSS "
                 f"{ship['peak_rss_bytes'] / MiB:.0f} MiB", force=True)
        if done["head_seq"]:
            progress(f"[{name}] verifying the log (decode every segment)", force=True)
            head = reader.head_seq() or done["head_seq"]
            ship["log_check"] = verify_log(reader, head, BACKLOG_TOPIC, ends)
        if profile_out is not None:
            ship["profile_file"] = str(profile_out)
        reader.close()
        return ship
    finally:
        if args.keep_tmp:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def rss_timeline(sampler: ProcSampler, points: int = 10) -> list[float]:
    if not sampler.samples:
        return []
    n = len(sampler.samples)
    idx = sorted({min(n - 1, round(i * (n - 1) / (points - 1))) for i in range(points)})
    return [round(sampler.samples[i][2] / MiB, 1) for i in idx]


# --------------------------------------------------------------------------- RPO case


class SegmentWatcher:
    """Polls the log directory every WATCH_POLL_S and records (wall ns) when each segment
    file first appears. Uploads can finish out of order, so it probes a window of seqs."""

    def __init__(self, log_dir: Path, window: int = 16) -> None:
        self.log_dir = log_dir
        self.window = window
        self.appeared: dict[int, int] = {}
        self.polls = 0
        self.max_gap_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="segment-watcher", daemon=True)

    def start(self) -> SegmentWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        nxt, last = 1, time.monotonic()
        exists = os.path.exists
        while True:
            stopping = self._stop.is_set()
            now = time.monotonic()
            self.max_gap_s = max(self.max_gap_s, now - last)
            last = now
            self.polls += 1
            for seq in range(nxt, nxt + self.window):
                if seq not in self.appeared and exists(self.log_dir / f"{seq:020d}.seg"):
                    self.appeared[seq] = time.time_ns()
            while nxt in self.appeared:
                nxt += 1
            if stopping:
                return
            self._stop.wait(WATCH_POLL_S)

    def durable_ns(self) -> dict[int, int]:
        """seq -> when it and every earlier seq had appeared."""
        out, latest, seq = {}, 0, 1
        while seq in self.appeared:
            latest = max(latest, self.appeared[seq])
            out[seq] = latest
            seq += 1
        return out


def run_producer(bootstrap: str, topic: str, partitions: int, rate_mbps: float,
                 seconds: float, acks_path: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "benchmarks.ship", "_produce", "--bootstrap", bootstrap,
            "--topic", topic, "--partitions", str(partitions), "--rate-mbps", str(rate_mbps),
            "--seconds", str(seconds), "--acks-out", str(acks_path)]
    popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             cwd=Path(__file__).resolve().parent.parent)
    out, _ = popen.communicate(timeout=seconds + 300)
    if popen.returncode != 0:
        raise RuntimeError(f"producer failed with exit {popen.returncode}")
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


def produce_main(argv: list[str]) -> int:
    import resource

    from confluent_kafka import Producer

    ap = argparse.ArgumentParser(prog="benchmarks.ship _produce")
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--partitions", type=int, required=True)
    ap.add_argument("--rate-mbps", type=float, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--acks-out", type=Path, required=True)
    args = ap.parse_args(argv)
    factory = RecordFactory(pool_size=8192, seed=11)
    acks = array.array("q")  # partition, offset, ack ns
    errors: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            acks.extend((msg.partition(), msg.offset(), time.time_ns()))

    p = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 5, "acks": "all",
                  "compression.type": "none", "enable.idempotence": False})
    # Connected with metadata before the first stamp, so no record waits for the producer's
    # own start-up (that would be counted as RPO).
    md = p.list_topics(args.topic, timeout=30).topics[args.topic]
    if md.error is not None or len(md.partitions) != args.partitions:
        raise SystemExit(f"topic {args.topic}: {md.error or len(md.partitions)}")
    rate = args.rate_mbps * 1e6
    sent_bytes = i = 0
    max_behind = 0.0
    t0 = time.monotonic()
    end = t0 + args.seconds
    record, size, produce, poll = factory.record, factory.payload_bytes, p.produce, p.poll
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = (now - t0) * rate
        if due - sent_bytes > rate * 0.01:
            max_behind = max(max_behind, (due - sent_bytes) / rate)
        while sent_bytes < due:
            key, value, headers = record(i)
            headers.append((PRODUCE_HEADER, b"%d" % time.time_ns()))
            produce(args.topic, value, key, partition=i % args.partitions, headers=headers,
                    on_delivery=on_delivery)
            sent_bytes += size(key, value, headers)
            i += 1
        poll(0)
        time.sleep(0.001)
    elapsed = time.monotonic() - t0
    left = p.flush(60)
    args.acks_out.write_bytes(acks.tobytes())
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"cpu_s": ru.ru_utime + ru.ru_stime, "records": i,
                      "payload_bytes": sent_bytes, "seconds": elapsed,
                      "mb_per_s": sent_bytes / 1e6 / elapsed, "max_behind_s": max_behind,
                      "errors": errors[:10], "error_count": len(errors),
                      "undelivered": left}))
    return 0


def analyse_rpo(reader: LogReader, watcher: SegmentWatcher, topic: str, acks_path: Path,
                produced: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    durable = watcher.durable_ns()
    raw = array.array("q")
    raw.frombytes(acks_path.read_bytes())
    ack_ns = {(raw[k], raw[k + 1]): raw[k + 2] for k in range(0, len(raw), 3)}
    rpo_ms: list[float] = []
    rpo_ack_ms: list[float] = []
    to_encode_ms: list[float] = []
    encode_to_durable_ms: list[float] = []
    seg_bytes: list[int] = []
    seg_records: list[int] = []
    seg_payload: list[int] = []
    heartbeats = 0
    seen: set[tuple[int, int]] = set()
    dup = 0
    durable_window: list[int] = []
    timeline: list[tuple[int, float]] = []  # (produce ns, rpo ms)
    first_ns = None
    for seq, d_ns in durable.items():
        header, body, size = reader.decode(seq)
        created_ns = header.created_at_ms * 1_000_000
        n = payload = 0
        for b in body.batches:
            if getattr(b, "topic", None) != topic:
                continue
            for r in b.records:
                stamp = next((v for k, v in r.headers if k == PRODUCE_HEADER), None)
                if stamp is None:
                    continue
                produced_ns = int(stamp)
                rpo_ms.append((d_ns - produced_ns) / 1e6)
                timeline.append((produced_ns, rpo_ms[-1]))
                to_encode_ms.append((created_ns - produced_ns) / 1e6)
                a = ack_ns.get((b.partition, r.offset))
                if a is not None:
                    rpo_ack_ms.append((d_ns - a) / 1e6)
                if (b.partition, r.offset) in seen:
                    dup += 1
                seen.add((b.partition, r.offset))
                n += 1
                payload += 64 + len(r.key or b"") + len(r.value or b"")
        if body.manifest.kind == "heartbeat" or n == 0:
            heartbeats += 1
            continue
        encode_to_durable_ms.append((d_ns - created_ns) / 1e6)
        seg_bytes.append(size)
        seg_records.append(n)
        seg_payload.append(payload)
        durable_window.append(d_ns)
    span_s = produced["seconds"]
    by_second: list[dict[str, Any]] = []
    after_warmup: list[float] = []
    if timeline:
        t0 = first_ns = min(t for t, _ in timeline)
        after_warmup = [v for t, v in timeline if t - t0 >= WARMUP_S * 1e9]
        buckets: dict[int, list[float]] = {}
        for t, v in timeline:
            buckets.setdefault(int((t - t0) // 1_000_000_000), []).append(v)
        for sec in sorted(buckets):
            q = summarize(buckets[sec])
            by_second.append({"second": sec, "records": q["count"], "p50": round(q["p50"], 1),
                              "p99": round(q["p99"], 1), "max": round(q["max"], 1)})
    return {
        "rpo_ms_by_produce_second": by_second,
        "records_in_log": len(seen),
        "records_produced": produced["records"],
        "duplicates": dup,
        "rpo_ms": summarize(rpo_ms),
        "rpo_ms_after_warmup": summarize(after_warmup),
        "warmup_s": WARMUP_S,
        "first_produce_ns": first_ns,
        "rpo_from_ack_ms": summarize(rpo_ack_ms),
        "produce_to_encode_ms": summarize(to_encode_ms),
        "encode_to_durable_ms": summarize(encode_to_durable_ms),
        "data_segments": len(seg_bytes),
        "heartbeat_segments": heartbeats,
        "segments_per_min": len(seg_bytes) / (span_s / 60) if span_s else None,
        "avg_segment_bytes": sum(seg_bytes) / len(seg_bytes) if seg_bytes else None,
        "avg_records_per_segment": sum(seg_records) / len(seg_records) if seg_records else None,
        "segments_cut_full_fraction": sum(1 for p in seg_payload if p >= max_bytes)
        / len(seg_payload) if seg_payload else None,
        "watcher": {"poll_s": WATCH_POLL_S, "polls": watcher.polls,
                    "max_poll_gap_ms": watcher.max_gap_s * 1e3},
    }


def run_rpo_one(args: argparse.Namespace, cluster: Any, min_s: float,
                rate_mbps: float) -> dict[str, Any]:
    bs, parts = cluster.bootstrap_servers, args.partitions
    topic = f"rpo-{rate_mbps:g}mbps-{round(min_s * 1000)}ms"
    create_topic(bs, topic, parts)
    workdir = Path(tempfile.mkdtemp(prefix="drstream-bench-rpo-"))
    try:
        buffer_max = args.buffer_max_mib * MiB
        config = write_config(workdir, bs, f"^{topic}$",
                              {"min_interval_s": min_s, "buffer_max_bytes": buffer_max})
        proc = ShipperProc(config, workdir / "ship.log")
        sampler = ProcSampler(proc.pid).start()
        reader = LogReader(workdir)
        watcher = SegmentWatcher(reader.dir)
        try:
            startup_s = proc.wait_started()
            watcher.start()
            time.sleep(1.0)  # partitions assigned, first fetches issued
            cpu0 = cpu_seconds(proc.pid) or 0.0
            broker0 = cpu_seconds(cluster.pid) or 0.0
            window = CpuWindow({"ship": proc.pid, "broker": cluster.pid})
            progress(f"rpo min_interval={min_s}s: producing {rate_mbps} MB/s for "
                     f"{args.seconds}s", force=True)
            stop_ticker = threading.Event()

            def ticker() -> None:
                t0 = time.monotonic()
                while not stop_ticker.wait(5.0):
                    n = len(watcher.appeared)
                    progress(f"rpo min_interval={min_s}s: {time.monotonic() - t0:.0f}s, "
                             f"{n} segments durable", force=True)

            tick = threading.Thread(target=ticker, daemon=True)
            tick.start()
            try:
                produced = run_producer(bs, topic, parts, rate_mbps, args.seconds,
                                        workdir / "acks.bin")
            finally:
                stop_ticker.set()
            cpu_window = window.close({"producer": produced["cpu_s"]})
            cpu1 = cpu_seconds(proc.pid) or 0.0
            broker1 = cpu_seconds(cluster.pid) or 0.0
            ends = end_offsets(bs, topic, parts)
            per_record = produced["payload_bytes"] / max(produced["records"], 1)
            done = wait_shipped(reader, proc, topic, ends, 120, per_record,
                                f"rpo min_interval={min_s}s catch-up", poll_s=0.05)
            time.sleep(max(0.2, 3 * WATCH_POLL_S))
            stopped = proc.stop()
        finally:
            watcher.stop()
            sampler.stop()
            if proc.alive():
                proc.stop()
        result = analyse_rpo(reader, watcher, topic, workdir / "acks.bin", produced,
                             1 << 20)
        reader.close()
        result.update({
            "rate_mbps": rate_mbps,
            "min_interval_s": min_s,
            "target_p99_ms": min_s * 1000 + RPO_SLACK_MS,
            "p99_within_target": (result["rpo_ms"]["p99"] or 1e18) <= min_s * 1000 + RPO_SLACK_MS,
            "producer": produced,
            "shipper_startup_s": startup_s,
            "shipper_cpu_s_while_producing": cpu1 - cpu0,
            "shipper_cores_while_producing": (cpu1 - cpu0) / produced["seconds"],
            "broker_cores_while_producing": (broker1 - broker0) / produced["seconds"],
            "cpu_window": cpu_window,
            "peak_rss_bytes": sampler.peak_rss,
            "catch_up_timed_out": done["timed_out"],
            "threads_cpu_s": group_threads(done["threads"], proc.pid),
            "stop": stopped,
            "log": proc.log_summary(),
        })
        return result
    finally:
        if args.keep_tmp:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- output


def _f(v: float | None, fmt: str = ".1f") -> str | None:
    return None if v is None else format(v, fmt)


def tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    out = []
    b = report.get("backlog")
    if b and b.get("variants"):
        gib = b["preload"]["payload_bytes"] / GiB
        rows = []
        bound = None
        for name, v in b["variants"].items():
            bare, ship = v["bare"], v.get("ship")
            rows.append([name, "bare consume loop", _f(bare["mb_per_s"]),
                         _f(bare["mb_per_s_consume"]), _f(bare["wall_s"]), _f(bare["cpu_s"]),
                         _f(bare["cpu_s_per_gib"], ".2f"),
                         _f(bare["cpu_window"].get("bare_cores"), ".2f"),
                         _f(bare["peak_rss_bytes"] / MiB, ".0f"),
                         _f(bare["cpu_window"].get("broker_cores"), ".2f"),
                         _f(bare["cpu_window"].get("others_cores"), ".2f")])
            if not ship:
                continue
            bound = ship["rss_bound_bytes"]
            rows.append([name, "drstream ship", _f(ship["mb_per_s"]),
                         _f(ship["mb_per_s_after_first_segment"]), _f(ship["wall_s"]),
                         _f(ship["cpu_s"]), _f(ship["cpu_s_per_gib"], ".2f"),
                         _f(ship["cpu_window"].get("ship_cores"), ".2f"),
                         _f(ship["peak_rss_bytes"] / MiB, ".0f"),
                         _f(ship["cpu_window"].get("broker_cores"), ".2f"),
                         _f(ship["cpu_window"].get("others_cores"), ".2f")])
            rows.append([name, "ship / bare", _f(v["ship_over_bare"], ".2f"), None, None,
                         None, _f(v["ship_over_bare_cpu"], ".2f"), None, None, None, None])
        out.append((
            f"Backlog drain: {gib:.2f} GiB, {b['preload']['records']:,} records over "
            f"{len(b['end_offsets'])} partitions (target ship/bare >= 0.50; peak RSS bound "
            f"{(bound or 0) / MiB:.0f} MiB = buffer_max_bytes + 200 MiB)",
            ["librdkafka variant", "path", "MB/s (launch->done)", "MB/s (steady)", "wall s",
             "CPU s", "CPU s/GiB", "cores used", "peak RSS MiB", "broker cores",
             "other procs cores"], rows))
    rpo = report.get("rpo") or []
    if rpo:
        rows = []
        for r in rpo:
            q, qa = r["rpo_ms"], r["rpo_from_ack_ms"]
            rows.append([
                _f(r["producer"]["mb_per_s"]), r["min_interval_s"], _f(q["p50"]),
                _f(q["p99"]), _f(q["max"]), _f(r["rpo_ms_after_warmup"]["p99"]),
                _f(qa["p99"]), _f(q["p99"] - r["min_interval_s"] * 1000),
                _f(r["target_p99_ms"], ".0f"),
                "yes" if r["p99_within_target"] else "NO",
                _f(r["produce_to_encode_ms"]["p99"]), _f(r["encode_to_durable_ms"]["p99"]),
                _f(r["segments_per_min"], ".0f"), _f((r["avg_segment_bytes"] or 0) / 1024, ".0f"),
                _f(r["avg_records_per_segment"], ".0f"),
                _f(r["shipper_cores_while_producing"], ".2f"),
                _f(r["cpu_window"].get("others_cores"), ".2f"),
            ])
        p0 = rpo[0]["producer"]
        out.append((
            f"RPO under steady load: ~1 KiB records for {p0['seconds']:.0f}s per run "
            "(target p99 <= min_interval_s + 50 ms)",
            ["MB/s", "min_interval_s", "RPO p50 ms", "RPO p99 ms", "RPO max ms",
             f"p99 after {WARMUP_S:g}s ms",
             "p99 from ack ms", "p99 - interval ms", "target ms", "p99 ok",
             "produce->encode p99 ms",
             "encode->durable p99 ms",
             "segments/min", "avg segment KiB", "records/segment", "shipper cores",
             "other procs cores"], rows))
    return out


def render(report: dict[str, Any]) -> tuple[str, str]:
    m = report["machine"]
    facts = (f"{m['nproc']} CPUs ({m.get('cpu_model')}), "
             f"{(m.get('mem_total_bytes') or 0) / GiB:.0f} GiB RAM, Python {m['python']}, "
             f"Kafka {m.get('kafka')}, confluent-kafka {m.get('confluent_kafka')} / librdkafka "
             f"{m.get('librdkafka')}, load average at start {m['loadavg_at_start'][0]:.2f}")
    md = ["# drstream ship benchmark", "", f"`{report['command']}`", "", facts, ""]
    txt = [facts, ""]
    for title, headers, rows in tables(report):
        md += [f"## {title}", "", md_table(headers, rows), ""]
        txt += [title, text_table(headers, rows), ""]
    notes = report.get("notes") or []
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
        txt += ["notes:"] + [f"  - {n}" for n in notes]
    return "\n".join(md), "\n".join(txt)


def _cpu_windows(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for v in ((report.get("backlog") or {}).get("variants") or {}).values():
        out += [v[k]["cpu_window"] for k in ("bare", "ship") if k in v and "cpu_window" in v[k]]
    out += [r["cpu_window"] for r in report.get("rpo") or [] if "cpu_window" in r]
    return out


def observations(report: dict[str, Any]) -> list[str]:
    """Facts worth a line under the tables: log problems, segment size vs max_bytes, ..."""
    notes = []
    others = [w["others_cores"] for w in _cpu_windows(report) if "others_cores" in w]
    if others and max(others) > 0.3:
        notes.append(f"shared machine: other processes used {min(others):.2f}-{max(others):.2f} "
                     f"of {report['machine']['nproc']} cores during the measured phases; wall-"
                     "clock rates and latencies are pessimistic, CPU s/GiB is the steadier "
                     "figure")
    b = report.get("backlog") or {}
    for name, v in (b.get("variants") or {}).items():
        s = v.get("ship")
        if not s:
            continue
        lc = s.get("log_check") or {}
        if lc:
            notes.append(f"[{name}] log check: {lc['records']:,} records in "
                         f"{lc['data_segments']} data segments (avg "
                         f"{(lc['avg_segment_bytes'] or 0) / MiB:.2f} MiB stored, max "
                         f"{(lc['max_segment_bytes'] or 0) / MiB:.2f} MiB, "
                         f"{lc['avg_records_per_segment']:.0f} records/segment), exactly once: "
                         f"{lc['exactly_once']}" + (f" {lc['problems']}" if lc["problems"] else ""))
        notes.append(f"[{name}] peak RSS {s['peak_rss_bytes'] / MiB:.0f} MiB vs bound "
                     f"{s['rss_bound_bytes'] / MiB:.0f} MiB: "
                     f"{'within' if s['rss_within_bound'] else 'EXCEEDED'}; RSS timeline (MiB): "
                     f"{s['rss_timeline_mib']}")
        notes.append(f"[{name}] shipper CPU by thread (s): {s['threads_cpu_s']}; stop after "
                     f"SIGTERM {s['stop']['stop_s']:.1f}s, exit {s['stop']['exit_code']}")
        if s["log"]["problem_count"]:
            notes.append(f"[{name}] shipper log had {s['log']['problem_count']} warning/error "
                         f"lines: {[p.get('event') for p in s['log']['problems'][:5]]}")
        paused = s["log"]["event_counts"].get("info:source_paused", 0)
        notes.append(f"[{name}] source paused {paused} times (buffer_max_bytes reached)")
    for r in report.get("rpo") or []:
        full = r.get("segments_cut_full_fraction")
        if full is not None:
            notes.append(f"rpo {r['producer']['mb_per_s']:.0f} MB/s "
                         f"min_interval={r['min_interval_s']}:"
                         f" {100 * full:.0f}% of data segments reached max_bytes (cut by size, "
                         f"not at the interval); {r['heartbeat_segments']} without records")
        if r["log"]["problem_count"]:
            notes.append(f"rpo min_interval={r['min_interval_s']}: {r['log']['problem_count']} "
                         f"warning/error lines in the shipper log")
        if r["duplicates"] or r["records_in_log"] != r["records_produced"]:
            notes.append(f"rpo min_interval={r['min_interval_s']}: {r['records_in_log']} "
                         "records in "
                         f"log vs {r['records_produced']} produced, {r['duplicates']} dups")
    return notes


# --------------------------------------------------------------------------- main


def stacks_main(argv: list[str]) -> int:
    """Run `daemon.cli` with a StackSampler over every thread; write its report as JSON."""
    from benchmarks.common import StackSampler

    ap = argparse.ArgumentParser(prog="benchmarks.ship _stacks")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    from drstream.daemon.cli import main as cli_main

    sampler = StackSampler().start()
    try:
        return cli_main(rest)
    finally:
        sampler.stop()
        report = sampler.report()
        report["thread_cpu"] = thread_cpu(os.getpid())
        args.out.write_text(json.dumps(report, indent=1))


def cpu_profile_main(argv: list[str]) -> int:
    """Run `daemon.cli` with cProfile (timer: time.thread_time, i.e. CPU of the calling
    thread) in the main thread and in every thread started afterwards; write one pstats
    file per thread group and a text summary (top functions by own and cumulative CPU)."""
    import cProfile
    import io
    import pstats

    ap = argparse.ArgumentParser(prog="benchmarks.ship _cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    profiles: list[tuple[str, cProfile.Profile]] = []
    lock = threading.Lock()
    original_run = threading.Thread.run

    def group(name: str) -> str:
        if name.startswith(("asyncio_", "uvloop_", "ThreadPoolExecutor")):
            return "to_thread workers"
        return name

    def profiled_run(self: threading.Thread) -> None:
        prof = cProfile.Profile(time.thread_time)
        prof.enable()
        try:
            original_run(self)
        finally:
            prof.disable()
            with lock:
                profiles.append((group(self.name), prof))

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    from drstream.daemon.cli import main as cli_main

    main_prof = cProfile.Profile(time.thread_time)
    main_prof.enable()
    try:
        return cli_main(rest)
    finally:
        main_prof.disable()
        profiles.append(("main (event loop)", main_prof))
        text = io.StringIO()
        groups: dict[str, list[cProfile.Profile]] = {}
        with lock:
            for name, prof in profiles:
                groups.setdefault(name, []).append(prof)
        for name, profs in groups.items():
            stats = pstats.Stats(profs[0], stream=text)
            for extra in profs[1:]:
                stats.add(extra)
            total = sum(t for _, _, t, _, _ in stats.stats.values())  # type: ignore[attr-defined]
            text.write(f"\n===== {name}: {len(profs)} thread(s), {total:.2f} CPU s "
                       "(own time of all functions) =====\n")
            stats.dump_stats(str(args.out.with_suffix(f".{name.split()[0]}.pstats")))
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats(25)
        args.out.write_text(text.getvalue())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ship", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="backlog,rpo", help="comma-separated: backlog, rpo")
    ap.add_argument("--backlog-mib", type=int, default=1024)
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--rate-mbps", default="10", help="RPO producer rate in MB/s; a "
                    "comma-separated list runs every min interval at each rate")
    ap.add_argument("--seconds", type=float, default=30.0, help="RPO producer duration")
    ap.add_argument("--min-intervals", default="0.1,0.02",
                    help="ship.min_interval_s values for the RPO case (the default and the "
                         "low-latency setting)")
    ap.add_argument("--buffer-max-mib", type=int, default=DEFAULT_BUFFER_MAX // MiB,
                    help="ship.buffer_max_bytes in MiB (default: the config default, 64)")
    ap.add_argument("--variant", action="append", default=None, metavar="NAME=JSON",
                    help="backlog case: extra librdkafka properties for both the bare loop and "
                         "the shipper (sources[].properties), one run pair per variant; default: "
                         + " and ".join(f"{n}={json.dumps(p)}" for n, p in DEFAULT_VARIANTS))
    ap.add_argument("--timeout", type=float, default=1800, help="backlog ship time limit (s)")
    ap.add_argument("--profile", choices=["none", "cprofile", "cpu", "stacks"], default="none",
                    help="profile the backlog shipper: cprofile = python -m cProfile (main "
                         "thread only); cpu = cProfile with a thread-CPU timer in every thread "
                         "(main, Kafka consumer, to_thread workers); stacks = wall-clock stack "
                         "sampler over every thread. Profiled numbers are not comparable; "
                         "results then go to --profile-dir")
    ap.add_argument("--profile-dir", type=Path, default=Path("/tmp/drstream-bench-profile"))
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="only print the tables of an earlier run (and rewrite --out if given)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the stores and shipper logs")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default "
                    "benchmarks/results/ship.json; the .md goes next to it)")
    args = ap.parse_args(argv)
    if args.variant is None:
        args.variants = list(DEFAULT_VARIANTS)
    else:
        args.variants = []
        for spec in args.variant:
            name, sep, props = spec.partition("={")  # names may hold '=' themselves
            if not sep:
                ap.error(f"--variant {spec!r}: expected NAME=JSON-OBJECT")
            props = "{" + props
            args.variants.append((name, json.loads(props)))
    return args


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["_bare"]:
        return bare_main(raw[1:])
    if raw[:1] == ["_produce"]:
        return produce_main(raw[1:])
    if raw[:1] == ["_stacks"]:
        return stacks_main(raw[1:])
    if raw[:1] == ["_cpu"]:
        return cpu_profile_main(raw[1:])
    args = parse_args(raw)
    if args.render is not None:  # tables from an earlier run's JSON, nothing is run
        report = json.loads(args.render.read_text())
        report["notes"] = observations(report)
        md, txt = render(report)
        print(txt)
        if args.out is not None:
            written = write_results("ship", report, md + "\n", json_path=args.out,
                                    md_path=args.out.with_suffix(".md"))
            print("wrote " + ", ".join(map(str, written)))
        return 0
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    exit_on_sigterm()
    report: dict[str, Any] = {
        "command": "python -m benchmarks.ship " + " ".join(raw),
        "machine": machine_facts(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    started = time.monotonic()
    factory = RecordFactory()
    with kafka_cluster("bench-ship") as cluster:
        progress(f"kafka up at {cluster.bootstrap_servers} (pid {cluster.pid})", force=True)
        if "backlog" in cases:
            run_backlog(args, cluster, factory, report)
        if "rpo" in cases:
            report["rpo"] = []
            for rate in (float(x) for x in str(args.rate_mbps).split(",")):
                for min_s in (float(x) for x in args.min_intervals.split(",")):
                    report["rpo"].append(run_rpo_one(args, cluster, min_s, rate))
    report["total_s"] = time.monotonic() - started
    report["notes"] = observations(report)
    md, txt = render(report)
    out = args.out
    md_path = out.with_suffix(".md") if out else None
    if args.profile != "none":  # profiled numbers are not the benchmark's numbers
        out = out or Path(args.profile_dir) / "ship.json"
        md_path = out.with_suffix(".md")
    written = write_results("ship", report, md + "\n", json_path=out, md_path=md_path)
    print(txt)
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
