"""The standby reader (`python -m benchmarks.lag _read`): arrival time of every record."""

from __future__ import annotations

import array
import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import (
    percentile,
)
from benchmarks.lag.base import ID_HEADER, QUIET, STATUS_EVERY_S, TS_HEADER, child_args


def read_main(argv: list[str]) -> int:
    """`_read --spec JSON --status PATH --out PATH`: reads the standby topic (and the
    freshness topic) until SIGTERM; per stamped record the first arrival time (ns) and the
    stamp's produce time, to --out; duplicates, unmatched records and freshness signals
    counted in the final status."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    spec, status, out, halt = child_args("_read", argv)
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
        with open(out, "wb") as f:
            f.write(n.to_bytes(8, "little"))
            f.write(arrival[:n].tobytes())
            f.write(stamp[:n].tobytes())
        (out.with_suffix(".fresh.json")).write_text(json.dumps(fresh))
        report(done=True)
    return 0


def load_arrivals(path: Path) -> tuple[array.array[int], array.array[int]]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    arrival, stamp = array.array("q"), array.array("q")
    arrival.frombytes(data[8:8 + 8 * n])
    stamp.frombytes(data[8 + 8 * n:8 + 16 * n])
    return arrival, stamp
