"""`drstream bench`: the replication-lag benchmark a user runs on their own clusters,
through their running ship and apply.

The stream's connector writes stamped records at a fixed rate into an object of the
bench's own on the source side (a topic, created and removed by it) and reads them back
where the sink writes them. Per record: lag = first arrival on the standby - produce
time; RPO = when the bench saw the first durable segment whose positions cover the record
(it follows the log as apply does, probing for each next segment) - produce time, so RPO
is an upper bound by at most one probe interval. The run's figures (p50/p95/p99/max)
and counts (produced, arrived, missing, duplicates) are printed and written as JSON.
The benchmark harness under benchmarks/ stamps its records the same way, for side-by-side
runs with MirrorMaker 2.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from drstream.daemon.deltalog import DeltaLog
from drstream.daemon.errors import ConfigFieldError
from drstream.daemon.keyring import KeyRing
from drstream.daemon.logging import get_logger
from drstream.daemon.plugins import BenchLoad, BenchSpec
from drstream.daemon.segment import read_manifest
from drstream.daemon.store import Store

log = get_logger("drstream.bench")

PROGRESS_EVERY_S = 1.0
FOLLOW_POLL_S = 0.05  # how often the bench probes for the next segment: RPO resolution
RPO_SETTLE_S = 10.0  # after every record arrived, how long to wait for the log follower


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_ms(values: list[float]) -> dict[str, float | int | None]:
    """count, p50, p95, p99, max, mean of milliseconds (rounded to 0.1 ms)."""
    v = sorted(values)

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 1)

    return {"count": len(v), "p50": r(percentile(v, 50)), "p95": r(percentile(v, 95)),
            "p99": r(percentile(v, 99)), "max": r(v[-1] if v else None),
            "mean": r(sum(v) / len(v) if v else None)}


@dataclass
class BenchReport:
    """A bench run: what was asked, counts, lag and RPO (its JSON is `doc`)."""

    doc: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.doc["ok"])


Progress = Callable[[str], None]


async def run_bench(store: Store, keyring: KeyRing, log_id: str, load: BenchLoad,
                    spec: BenchSpec, *, ready_timeout_s: float, drain_timeout_s: float,
                    progress: Progress | None = None,
                    interrupt: asyncio.Event | None = None, keep: bool = False) -> BenchReport:
    """Prepare the load's target, produce for spec.seconds while reading on the standby
    and following the log, wait up to drain_timeout_s for the rest to arrive, remove the
    target unless `keep` (also when anything failed or `interrupt` was set), and report."""
    at_ms = int(time.time() * 1000)
    interrupt = interrupt if interrupt is not None else asyncio.Event()
    durable: dict[int, int] = {}  # id -> when a durable segment was seen to cover it (ns)
    stop_read, stop_produce, stop_follow = threading.Event(), threading.Event(), asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    try:
        await asyncio.to_thread(load.prepare, ready_timeout_s)
        head = await DeltaLog(store, log_id).head_seq() or 0
        tasks.append(asyncio.create_task(asyncio.to_thread(load.read, stop_read)))
        tasks.append(asyncio.create_task(
            _follow(store, keyring, log_id, load, head, durable, stop_follow)))
        started = time.monotonic()
        producer = asyncio.create_task(asyncio.to_thread(load.produce, spec, stop_produce))
        tasks.append(producer)
        while not producer.done():
            await asyncio.wait({producer, *tasks}, timeout=PROGRESS_EVERY_S,
                               return_when=asyncio.FIRST_COMPLETED)
            _raise_failed(tasks)
            if interrupt.is_set():
                stop_produce.set()
            _show(progress, load, started, spec, "")
        await producer
        load_s = time.monotonic() - started
        drain_s = 0.0 if interrupt.is_set() else await _drain(
            load, tasks, drain_timeout_s, progress, started, spec, interrupt)
        await _settle(load, durable, interrupt)
    finally:
        stop_produce.set()
        stop_read.set()
        stop_follow.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        removed = [] if keep else await asyncio.to_thread(load.remove)
    report = _report(load, spec, log_id, at_ms, load_s, drain_s, durable, removed)
    report.doc["interrupted"] = interrupt.is_set()
    return report


def _raise_failed(tasks: list[asyncio.Task[Any]]) -> None:
    for t in tasks:
        error = t.exception() if t.done() and not t.cancelled() else None
        if error is not None:
            raise error


async def _drain(load: BenchLoad, tasks: list[asyncio.Task[Any]], timeout_s: float,
                 progress: Progress | None, started: float, spec: BenchSpec,
                 interrupt: asyncio.Event) -> float:
    """Wait until every acknowledged record arrived (or the timeout); seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s and not interrupt.is_set():
        c = load.counts()
        if c["arrived"] >= c["acked"]:
            break
        await asyncio.sleep(0.1)
        _raise_failed(tasks)
        _show(progress, load, started, spec, f" (draining: {c['acked'] - c['arrived']:,} to go)")
    return time.monotonic() - t0


async def _settle(load: BenchLoad, durable: dict[int, int], interrupt: asyncio.Event) -> None:
    """Give the log follower time to see the segments of the last records."""
    deadline = time.monotonic() + RPO_SETTLE_S
    while (len(durable) < load.counts()["acked"] and time.monotonic() < deadline
           and not interrupt.is_set()):
        await asyncio.sleep(FOLLOW_POLL_S)


async def _follow(store: Store, keyring: KeyRing, log_id: str, load: BenchLoad, after: int,
                  durable: dict[int, int], stop: asyncio.Event) -> None:
    log_ = DeltaLog(store, log_id)
    async for seq, data in log_.follow(after, stop, prefetch=2, poll_max_s=FOLLOW_POLL_S):
        seen = time.time_ns()
        _, manifest = await asyncio.to_thread(read_manifest, data, keyring,
                                              expect_log_id=log_id, expect_seq=seq)
        for i in load.covered(manifest.positions.get(load.stream, {})):
            durable.setdefault(i, seen)


def _show(progress: Progress | None, load: BenchLoad, started: float, spec: BenchSpec,
          extra: str) -> None:
    if progress is None:
        return
    c = load.counts()
    w = sorted(load.take_window())
    lag = (f"lag p50 {percentile(w, 50):.0f} ms, p99 {percentile(w, 99):.0f} ms"
           if w else "lag -")
    progress(f"bench {time.monotonic() - started:4.0f}s/{spec.seconds:g}s: produced "
             f"{c['acked']:,}, arrived {c['arrived']:,}, {lag}{extra}")


def _report(load: BenchLoad, spec: BenchSpec, log_id: str, at_ms: int, load_s: float,
            drain_s: float, durable: dict[int, int], removed: list[str]) -> BenchReport:
    produced, arrival = load.produced_ns(), load.arrival_ns()
    c = load.counts()
    lags, rpos = [], []
    for i, t in enumerate(produced):
        if not t:
            continue
        if i < len(arrival) and arrival[i]:
            lags.append((arrival[i] - t) / 1e6)
        if i in durable:
            rpos.append((durable[i] - t) / 1e6)
    missing = c["acked"] - c["arrived"]
    lag_ms = summarize_ms(lags)
    doc: dict[str, Any] = {
        "action": "bench", "log_id": log_id, "stream": load.stream, "target": load.target,
        "at_ms": at_ms,
        "spec": {"rate": spec.rate, "seconds": spec.seconds, "record_bytes": spec.record_bytes,
                 "partitions": spec.partitions},
        "records": {"produced": c["acked"], "failed": c["failed"], "arrived": c["arrived"],
                    "missing": missing, "duplicates": c["duplicates"],
                    "unknown": c["unknown"]},
        "load_s": round(load_s, 3), "drain_s": round(drain_s, 3),
        "records_per_s": round(c["acked"] / load_s, 1) if load_s else None,
        "lag_ms": lag_ms,
        "rpo_ms": summarize_ms(rpos), "rpo_unseen_records": c["acked"] - len(rpos),
        "removed": removed,
        "ok": missing == 0 and c["duplicates"] == 0 and c["unknown"] == 0
        and c["failed"] == 0 and c["acked"] > 0,
    }
    log.info("bench_done", produced=c["acked"], arrived=c["arrived"],
             lag_p50_ms=lag_ms["p50"])
    return BenchReport(doc)


def check_spec(spec: BenchSpec) -> None:
    """Refuse a spec no run can honour (the command line names the option)."""
    checks = (("--rate", spec.rate, 0 < spec.rate <= 1_000_000, "records per second, "
               "more than 0 and at most 1,000,000"),
              ("--duration", spec.seconds, 0 < spec.seconds <= 86400, "seconds, more than 0 "
               "and at most a day"),
              ("--record-bytes", spec.record_bytes, 1 <= spec.record_bytes <= 1 << 20,
               "1 to 1048576"),
              ("--partitions", spec.partitions, 1 <= spec.partitions <= 10_000, "1 to 10000"))
    for option, value, good, why in checks:
        if not good:
            raise ConfigFieldError(option, value, f"must be {why}")

