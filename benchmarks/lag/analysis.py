"""Per record lag and RPO, freshness and store facts of one run."""

from __future__ import annotations

import array
import contextlib
import itertools
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import GiB, percentile
from benchmarks.lag.base import CpuTrack, Replicator, StatusFile
from benchmarks.lag.read import load_arrivals
from benchmarks.lag.wrapper import read_ops
from drstream.daemon.bench import summarize_ms


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
    if rep.system == "drstream":
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


# S3 Standard request prices (us-east-1): PUT, COPY, POST, LIST $0.005 per 1,000;
# GET, HEAD and the rest $0.0004 per 1,000; DELETE free. A month of 730 hours.
S3_USD_PER_1000 = {"PUT": 0.005, "LIST": 0.005, "GET": 0.0004, "HEAD": 0.0004}
MINUTES_PER_MONTH = 730 * 60


def s3_request_usd_per_month(per_min: dict[str, float]) -> float:
    """What the store requests per minute would cost a month at S3 Standard prices."""
    return round(sum(per_min.get(op, 0) * MINUTES_PER_MONTH / 1000 * usd
                     for op, usd in S3_USD_PER_1000.items()), 2)


def store_facts(rep: Replicator, case: dict[str, Any], produce_ns: array.array[int],
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
        "s3_request_usd_per_month": s3_request_usd_per_month(all_per_min),
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
