"""Shared helpers for benchmarks that run real services and processes.

- machine facts for the result files (`machine_facts`)
- a private Kafka cluster started through tests/infra (`kafka_cluster`), topics, offsets
- load generation: ~1 KiB JSON-like Kafka records with keys and headers (`RecordFactory`),
  a fast bulk producer (`preload`) and a paced producer (`paced_produce`)
- process CPU and RSS sampling through /proc, including child processes (`ProcSampler`)
- percentiles, a rate-limited progress line, and atomic result writing

Nothing here asserts on time: benchmarks print numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import signal
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drstream.daemon.bench import percentile

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- machine


def produce_waiting(p: Any, topic: str, value: bytes | None, key: bytes | None, partition: int,
                    headers: Any, on_delivery: Any, wait_s: float) -> None:
    """produce(), polling `wait_s` while librdkafka's queue is full."""
    while True:
        try:
            p.produce(topic, value, key, partition=partition, headers=headers,
                      on_delivery=on_delivery)
            return
        except BufferError:
            p.poll(wait_s)


def _meminfo_total_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def commit() -> dict[str, Any]:
    """The commit measured (and whether the tree had changes on top of it)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD") or None,
            "tree_changed": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine_facts() -> dict[str, Any]:
    """nproc, memory, CPU model, Python, library and Kafka versions, current load, and the
    commit measured."""
    facts: dict[str, Any] = {
        **commit(),
        "nproc": os.cpu_count(),
        "sched_affinity_cpus": len(os.sched_getaffinity(0)),
        "mem_total_bytes": _meminfo_total_bytes(),
        "cpu_model": _cpu_model(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with contextlib.suppress(ImportError):
        import confluent_kafka

        facts["confluent_kafka"] = confluent_kafka.__version__
        facts["librdkafka"] = confluent_kafka.libversion()[0]
    with contextlib.suppress(Exception):
        from tests.infra.kafka import KAFKA_VERSION

        facts["kafka"] = KAFKA_VERSION
    with contextlib.suppress(Exception):
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
        facts["java"] = (out.stderr or out.stdout).splitlines()[0]
    with contextlib.suppress(ImportError):
        import zstandard

        facts["zstandard"] = zstandard.__version__
    with contextlib.suppress(ImportError):
        import cryptography

        facts["cryptography"] = cryptography.__version__
    return facts


# --------------------------------------------------------------------------- signals


def exit_on_sigterm() -> None:
    """SIGTERM -> SystemExit, so `finally` blocks stop the services a benchmark started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


# --------------------------------------------------------------------------- Kafka


@contextlib.contextmanager
def kafka_cluster(name: str = "bench", *, heap: str = "1g", keep: bool = False) -> Iterator[Any]:
    """A private single-node Kafka cluster (tests/infra) for the duration of the block.

    Its work directory lives under the test-services run dir and is deleted afterwards
    (unless `keep`); the broker is stopped by pid either way.
    """
    from tests.infra.kafka import KafkaCluster, ensure_jars

    ensure_jars()
    cluster = KafkaCluster(name, heap=heap)
    cluster.start()
    try:
        yield cluster
    finally:
        if keep:
            cluster.stop()
        else:
            cluster.remove()


def create_topic(bootstrap: str, topic: str, partitions: int,
                 config: dict[str, str] | None = None) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=1, config=config or {})]
    )
    futures[topic].result(timeout=60)
    # Wait until every partition has a leader (metadata shows it).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        md = admin.list_topics(topic, timeout=10).topics.get(topic)
        if md is not None and md.error is None and len(md.partitions) == partitions and all(
            p.leader >= 0 for p in md.partitions.values()
        ):
            return
        time.sleep(0.1)
    raise RuntimeError(f"topic {topic} has no leaders after 60s")


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    """High watermarks (read_committed: the last stable offsets) of every partition."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-offsets",
                  "isolation.level": "read_committed", "enable.auto.commit": False})
    try:
        return {p: int(c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1])
                for p in range(partitions)}
    finally:
        c.close()


# --------------------------------------------------------------------------- records

_WORDS = (  # noqa: SIM905
    "alpha beta gamma delta model train serve feature vector store region primary standby "
    "replica batch stream offset commit partition topic latency error retry checkout cart "
    "payment user session click view search recommend rank score label embedding shard"
).split()
_EVENTS = ("page_view", "click", "add_to_cart", "purchase", "search", "login", "logout")
_COUNTRIES = ("DE", "FR", "US", "GB", "JP", "BR", "IN", "NL", "SE", "ES")
_DEVICES = ("ios", "android", "web", "tv")
_MASK64 = (1 << 64) - 1


def json_event(rng: random.Random, ts: int) -> bytes:
    """A ~1 KB JSON document (the shape benchmarks/codec.py uses): ids and numbers
    (incompressible-ish), enums, some text; zstd-1 compresses it about 2.5x."""
    doc: dict[str, Any] = {
        "event_id": f"{rng.getrandbits(128):032x}",
        "event": rng.choice(_EVENTS),
        "ts": ts,
        "user_id": rng.randrange(10**9),
        "session": f"{rng.getrandbits(64):016x}",
        "device": {
            "os": rng.choice(_DEVICES),
            "app_version": f"{rng.randrange(1, 9)}.{rng.randrange(30)}.{rng.randrange(100)}",
            "screen": [rng.choice((375, 390, 414, 1080, 1440)), rng.choice((667, 844, 1920))],
        },
        "geo": {"country": rng.choice(_COUNTRIES), "lat": round(rng.uniform(-90, 90), 5),
                "lon": round(rng.uniform(-180, 180), 5)},
        "page": "/" + "/".join(rng.choice(_WORDS) for _ in range(rng.randrange(1, 4))),
        "items": [{"sku": f"SKU-{rng.randrange(100000):05d}", "qty": rng.randrange(1, 5),
                   "price": round(rng.uniform(1, 500), 2)} for _ in range(rng.randrange(0, 5))],
        "features": [round(rng.gauss(0, 1), 4) for _ in range(rng.randrange(30, 64))],
        "query": " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(4, 24))),
        "note": "".join(rng.choice(string.ascii_letters + " ")
                        for _ in range(rng.randrange(20, 100))),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


class RecordFactory:
    """Cheap per-record generation from a pool of pre-built JSON documents.

    Record i = key `user-<n>`, value `{"n":i,` + pool[i % pool_size] (so every value is
    distinct and a repeated document is >= pool_size records away, beyond zstd-1's window
    inside a ~1 MiB segment), headers content-type, trace-id and, for 30%, schema-version.
    """

    def __init__(self, pool_size: int = 32768, seed: int = 7) -> None:
        rng = random.Random(seed)
        ts = 1_750_000_000_000
        self.pool = [json_event(rng, ts + i * 13)[1:] for i in range(pool_size)]
        self.pool_size = pool_size

    def record(self, i: int) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
        key = b"user-%d" % ((i * 7919) % 1_000_003)
        value = b'{"n":%d,' % i + self.pool[i % self.pool_size]
        h = (i * 0x9E3779B97F4A7C15) & _MASK64
        headers = [("content-type", b"application/json"), ("trace-id", b"%016x" % h)]
        if h % 10 < 3:
            headers.append(("schema-version", b"3"))
        return key, value, headers

    @staticmethod
    def payload_bytes(key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> int:
        """Record payload as benchmarks count it: key + value + header keys and values."""
        return len(key) + len(value) + sum(len(k) + len(v) for k, v in headers)


FAST_PRODUCER_CONF: dict[str, Any] = {
    "linger.ms": 50,
    "batch.size": 1_000_000,
    "batch.num.messages": 100_000,
    "compression.type": "none",
    "acks": "1",
    "queue.buffering.max.kbytes": 1_048_576,
    "queue.buffering.max.messages": 1_000_000,
    "enable.idempotence": False,
}


@dataclass
class ProduceStats:
    records: int = 0
    payload_bytes: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records, "payload_bytes": self.payload_bytes,
                "seconds": self.seconds, "mb_per_s": self.payload_bytes / 1e6 / self.seconds
                if self.seconds else None, "errors": self.errors[:10],
                "error_count": len(self.errors)}


def preload(bootstrap: str, topic: str, partitions: int, target_bytes: int,
            factory: RecordFactory, progress: Callable[[str], None] | None = None,
            ) -> ProduceStats:
    """Produce `target_bytes` of payload round-robin over `partitions` as fast as possible."""
    from confluent_kafka import Producer

    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    p = Producer({"bootstrap.servers": bootstrap, **FAST_PRODUCER_CONF})
    stats = ProduceStats(errors=errors)
    started = time.monotonic()
    poll, record, size = p.poll, factory.record, factory.payload_bytes
    i = 0
    while stats.payload_bytes < target_bytes:
        key, value, headers = record(i)
        produce_waiting(p, topic, value, key, i % partitions, headers, on_delivery, 0.05)
        stats.payload_bytes += size(key, value, headers)
        i += 1
        if i % 2000 == 0:
            poll(0)
            if progress is not None:
                progress(f"preload: {stats.payload_bytes / MiB:,.0f} / "
                         f"{target_bytes / MiB:,.0f} MiB")
    remaining = p.flush(120)
    stats.records = i
    stats.seconds = time.monotonic() - started
    if remaining:
        errors.append(f"{remaining} messages not delivered after flush")
    if errors:
        raise RuntimeError(f"preload: {len(errors)} delivery errors, first: {errors[0]}")
    return stats


# --------------------------------------------------------------------------- /proc sampling


def _read_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()  # fields from 3 (state) on


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text()
                        .split()]
    return out


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += _children(p)
    return tree


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class CpuWindow:
    """CPU seconds used over a window by the machine and by named process trees; what is
    left over is everyone else (other test runs sharing the machine skew the numbers)."""

    def __init__(self, pids: dict[str, int | None], own: str | None = "bench") -> None:
        """`pids`: name -> process tree root; `own`: name for this process's own threads
        (not its children: those are named in `pids` or passed to close())."""
        self.pids = {k: v for k, v in pids.items() if v}
        self.own = own
        self.t0 = time.monotonic()
        self.m0 = machine_busy_seconds()
        self.c0 = {k: cpu_seconds(p) or 0.0 for k, p in self.pids.items()}
        self.own0 = cpu_seconds(os.getpid(), tree=False) or 0.0

    def close(self, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Cores used on average per name, 'machine' and 'others' (machine - named - extra);
        `extra` adds CPU seconds of processes that exited inside the window."""
        wall = max(time.monotonic() - self.t0, 1e-9)
        used = {k: (cpu_seconds(p) or self.c0[k]) - self.c0[k] for k, p in self.pids.items()}
        if self.own:
            used[self.own] = (cpu_seconds(os.getpid(), tree=False) or 0.0) - self.own0
        used.update(extra or {})
        machine = machine_busy_seconds() - self.m0
        out = {f"{k}_cores": round(v / wall, 3) for k, v in used.items()}
        out["machine_cores"] = round(machine / wall, 3)
        out["others_cores"] = round((machine - sum(used.values())) / wall, 3)
        out["wall_s"] = round(wall, 3)
        return out


def cpu_seconds(pid: int, *, tree: bool = True) -> float | None:
    """utime+stime of `pid` (all threads) + its waited-for children (cutime+cstime) + its
    live descendants; with tree=False only the process's own threads (utime+stime).
    None once the process is gone."""
    if not tree:
        f = _read_stat(pid)
        return None if f is None else (int(f[11]) + int(f[12])) / CLK_TCK
    total = 0.0
    for i, p in enumerate(process_tree(pid)):
        f = _read_stat(p)
        if f is None:
            if i == 0:
                return None
            continue
        # stat fields 14..17 are utime stime cutime cstime; f[0] is field 3
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / CLK_TCK


def rss_bytes(pid: int) -> int | None:
    """VmRSS summed over the process and its live descendants."""
    total, found = 0, False
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    found = True
                    break
    return total if found else None


class ProcSampler:
    """Samples a process tree's CPU seconds and RSS every `interval` s in a thread.

    `samples` holds (monotonic time, cpu seconds, rss bytes); peak_rss is the largest RSS
    seen; last_cpu is the last CPU reading while the process was alive.
    """

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float, int]] = []
        self.peak_rss = 0
        self.last_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{pid}", daemon=True)

    def start(self) -> ProcSampler:
        self._thread.start()
        return self

    def sample(self) -> tuple[float, int] | None:
        cpu, rss = cpu_seconds(self.pid), rss_bytes(self.pid)
        if cpu is None or rss is None:
            return None
        self.samples.append((time.monotonic(), cpu, rss))
        self.last_cpu = cpu
        self.peak_rss = max(self.peak_rss, rss)
        return cpu, rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def rss_at(self, fraction: float) -> int | None:
        """RSS of the sample at `fraction` of the run (0 = first, 1 = last)."""
        if not self.samples:
            return None
        return self.samples[min(len(self.samples) - 1, int(fraction * len(self.samples)))][2]


# --------------------------------------------------------------------------- stats, output




def summarize(values: list[float]) -> dict[str, float | int | None]:
    v = sorted(values)
    return {"count": len(v), "min": v[0] if v else None, "p50": percentile(v, 50),
            "p90": percentile(v, 90), "p99": percentile(v, 99), "p999": percentile(v, 99.9),
            "max": v[-1] if v else None, "mean": sum(v) / len(v) if v else None}


class Progress:
    """Prints a line at most every `every` seconds (and always when forced)."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self._last = 0.0

    def __call__(self, line: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.every:
            self._last = now
            print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(name: str, report: dict[str, Any], markdown: str | None = None,
                  json_path: Path | None = None, md_path: Path | None = None,
                  ) -> list[Path]:
    """benchmarks/results/<name>.json (and .md) unless other paths are given."""
    json_path = json_path or RESULTS_DIR / f"{name}.json"
    written = [json_path]
    write_atomic(json_path, json.dumps(report, indent=2, default=str) + "\n")
    if markdown is not None:
        md_path = md_path or json_path.with_suffix(".md")
        write_atomic(md_path, markdown)
        written.append(md_path)
    return written


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: list[str], rows: list[list[Any]]) -> str:
    cols = [[str(h)] + ["" if r[i] is None else str(r[i]) for r in rows]
            for i, h in enumerate(headers)]
    widths = [max(map(len, c)) for c in cols]
    out = []
    for j in range(len(rows) + 1):
        out.append("  ".join(c[j].rjust(w) if i else c[j].ljust(w)
                             for i, (c, w) in enumerate(zip(cols, widths, strict=True))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def thread_cpu(pid: int) -> list[dict[str, Any]]:
    """Per-thread CPU seconds of `pid` from /proc/<pid>/task (tid, OS thread name)."""
    out = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            f = _read_stat_path(Path(f"/proc/{pid}/task/{tid}/stat"))
            if f is None:
                continue
            comm = ""
            with contextlib.suppress(OSError):
                comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            out.append({"tid": int(tid), "comm": comm,
                        "cpu_s": (int(f[11]) + int(f[12])) / CLK_TCK})
    return sorted(out, key=lambda t: -t["cpu_s"])


def _read_stat_path(path: Path) -> list[str] | None:
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


# --------------------------------------------------------------------------- profiling


class StackSampler:
    """In-process wall-clock sampler of every thread's Python stack (a small py-spy).

    Every `interval` s it takes sys._current_frames() and counts, per thread, the leaf
    (file:function:line, so a thread blocked inside a C call such as Consumer.consume()
    shows the line that called it) and every function on the stack (inclusive). Waiting
    threads are counted too: this is where each thread's wall time goes, not CPU.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.samples = 0
        self.leaf: dict[tuple[str, str], int] = {}
        self.inclusive: dict[tuple[str, str], int] = {}
        self.per_thread: dict[str, int] = {}
        self.native_ids: dict[str, int | None] = {}
        self.thread_cpu_s: dict[str, float] = {}  # last CPU reading per thread name
        self._names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def start(self) -> StackSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _where(code: Any) -> str:
        filename = code.co_filename
        for marker in ("/site-packages/", "/work/main/", "/lib/python3"):
            if marker in filename:
                filename = filename.split(marker, 1)[1]
                break
        return f"{filename}:{code.co_name}"

    def _refresh_names(self) -> None:
        self._names = {}
        for t in threading.enumerate():
            if t.ident is not None:
                # asyncio.to_thread workers are named asyncio_0.. ; group them
                name = t.name.split("_")[0] if t.name.startswith("asyncio_") else t.name
                self._names[t.ident] = name
                self.native_ids.setdefault(t.name, t.native_id)
                f = _read_stat_path(Path(f"/proc/self/task/{t.native_id}/stat"))
                if f is not None:
                    self.thread_cpu_s[t.name] = (int(f[11]) + int(f[12])) / CLK_TCK

    def _run(self) -> None:
        own = threading.get_ident()
        next_names = 0.0
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now >= next_names:
                self._refresh_names()
                next_names = now + 0.5
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == own:
                    continue
                tname = self._names.get(ident, f"thread-{ident}")
                self.per_thread[tname] = self.per_thread.get(tname, 0) + 1
                leaf = (tname, f"{self._where(frame.f_code)}:{frame.f_lineno}")
                self.leaf[leaf] = self.leaf.get(leaf, 0) + 1
                seen = set()
                f: Any = frame
                while f is not None:
                    where = self._where(f.f_code)
                    if where not in seen:
                        seen.add(where)
                        k = (tname, where)
                        self.inclusive[k] = self.inclusive.get(k, 0) + 1
                    f = f.f_back

    def report(self, top: int = 20) -> dict[str, Any]:
        threads: dict[str, Any] = {}
        for tname, n in sorted(self.per_thread.items(), key=lambda kv: -kv[1]):
            def ranked(table: dict[tuple[str, str], int], tname: str = tname,
                       n: int = n) -> list[list[Any]]:
                rows = sorted(((w, c) for (t, w), c in table.items() if t == tname),
                              key=lambda wc: -wc[1])[:top]
                return [[w, c, round(100 * c / n, 1)] for w, c in rows]
            threads[tname] = {"samples": n, "leaf": ranked(self.leaf),
                              "inclusive": ranked(self.inclusive)}
        return {"interval_s": self.interval, "ticks": self.samples,
                "native_ids": self.native_ids, "thread_cpu_s": self.thread_cpu_s,
                "threads": threads}
