"""The load generator (`python -m benchmarks.lag _produce`): stamped records at the
case's rates."""

from __future__ import annotations

import array
import time
from typing import Any

from benchmarks.common import (
    FAST_PRODUCER_CONF,
    RecordFactory,
    produce_waiting,
)
from benchmarks.lag.base import ID_HEADER, QUIET, STATUS_EVERY_S, TS_HEADER, child_args


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


def produce_main(argv: list[str]) -> int:
    """`_produce --spec JSON --status PATH --out PATH`: the case's phases into one topic,
    each record stamped (bench.id, bench.ts); produce times to --out (int64 per id)."""
    from confluent_kafka import Producer

    spec, status, out, halt = child_args("_produce", argv)
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
    poll = p.poll
    i = sent_bytes = 0
    max_behind = 0.0
    t_start = time.monotonic()
    next_status = 0.0
    phase_marks: list[dict[str, Any]] = []

    def send(ts: int) -> int:
        nonlocal i
        key, value, headers, nbytes = make(i, ts)
        produce_waiting(p, topic, value, key, i % parts, headers, on_delivery, 0.02)
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
    out.write_bytes(produce_ns.tobytes())
    report(done=True, seconds=elapsed, undelivered=left, first_errors=errors[:5],
           cpu_s=ru.ru_utime + ru.ru_stime,
           max_behind_s=max_behind, phases=phase_marks)
    return 0
