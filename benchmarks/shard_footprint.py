"""Footprint of one shard's ship and apply (peak RSS, CPU) under a steady load, with a
set of 1 and of 2 shards: the numbers behind the resource requests of
deploy/kubernetes/ and beside docs/shards.md.

    python -m benchmarks.shard_footprint [--shards 1,2] [--rate-mbps 5] [--seconds 30]

Starts its own primary and standby Kafka clusters (tests/infra), a file store, and per
shard one `drstream ship --shard K` and one `drstream apply --shard K`; produces 1 KiB
records to 12 partitions at the rate for the time, waits until every shard applied
everything, then reads each process's peak RSS (VmHWM) and CPU (utime + stime) from
/proc. Writes benchmarks/results/shard_footprint.json. A number, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from drstream.daemon.shards import shard_log_id, shard_of
from tests.infra.kafka import start_clusters
from tests.integration.applylib import (
    DrSetup,
    checkpoint_watch,
    create_topics,
    high_watermarks,
    unique,
    write_dr_config,
)
from tests.support.procs import DrstreamProcess, wait_for

RESULTS = Path(__file__).parent / "results" / "shard_footprint.json"
RECORD = 1024
PARTITIONS = 12
TICKS = os.sysconf("SC_CLK_TCK")


def proc_stats(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    hwm_kib = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    return {"peak_rss_mib": round(hwm_kib / 1024, 1), "cpu_s": round(cpu, 2)}


def produce(bootstrap: str, topic: str, mbps: float, seconds: float) -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5,
                         "enable.idempotence": True})
    value = os.urandom(RECORD)
    per_s = mbps * 1e6 / RECORD
    start, sent = time.monotonic(), 0
    while (elapsed := time.monotonic() - start) < seconds:
        while sent < per_s * elapsed:
            producer.produce(topic, value, partition=sent % PARTITIONS)
            sent += 1
            if sent % 1000 == 0:
                producer.poll(0)
        time.sleep(0.005)
    producer.flush(60)
    return sent


def run_set(primary: str, standby: str, work: Path, shards: int, mbps: float,
            seconds: float) -> dict[str, Any]:
    topic = unique("footprint")
    create_topics(primary, {topic: PARTITIONS})
    setup = write_dr_config(work, store={"type": "file", "path": str(work / "store")},
                            source_bootstrap=primary, sink_bootstrap=standby,
                            include=[re.escape(topic)], log_id=unique("fp"))
    setup.rewrite(shards={"count": shards})
    procs = {(role, k): DrstreamProcess([role, "--config", str(setup.path), "--shard", str(k)],
                                        work / f"{role}-{k}.log", f"{role}-{k}")
             for role in ("ship", "apply") for k in range(shards)}
    try:
        for p in procs.values():  # start-up CPU (imports, connects) is not the load's
            wait_for(p.ready, 120, f"{p.label} started", [p])
        time.sleep(3)
        idle = {f"{r}-{k}": proc_stats(p.pid) for (r, k), p in procs.items()}
        sent = produce(primary, topic, mbps, seconds)
        ends = high_watermarks(primary, {topic: PARTITIONS})
        with checkpoint_watch(standby) as watch:
            watch._start = None
            for k in range(shards):
                view = DrSetup(setup.path, {**setup.raw,
                                            "log_id": shard_log_id(setup.log_id, k, shards)})
                mine = {tp: o for tp, o in ends.items()
                        if shard_of(tp[0], tp[1], shards) == k}
                watch.wait_applied(view, mine, timeout=600)
        done = {f"{r}-{k}": proc_stats(p.pid) for (r, k), p in procs.items()}
    finally:
        for p in procs.values():
            p.reap()
    gib = sent * RECORD / 2**30
    per = {name: {"peak_rss_mib": s["peak_rss_mib"], "idle_rss_mib": idle[name]["peak_rss_mib"],
                  "cpu_s_load": round(s["cpu_s"] - idle[name]["cpu_s"], 2)}
           for name, s in done.items()}
    total_cpu = sum(v["cpu_s_load"] for v in per.values())
    return {"shards": shards, "mbps": mbps, "seconds": seconds, "records": sent,
            "processes": per, "cpu_s_per_gib": round(total_cpu / gib, 1),
            "cores_at_rate": round(total_cpu / seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", default="1,2")
    ap.add_argument("--rate-mbps", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    primary, standby = start_clusters(("fp-primary", "fp-standby"))
    runs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in [int(x) for x in args.shards.split(",")]:
                work = Path(tmp) / f"set-{n}"
                work.mkdir()
                runs.append(run_set(primary.bootstrap_servers, standby.bootstrap_servers,
                                    work, n, args.rate_mbps, args.seconds))
                print(json.dumps(runs[-1], indent=1))
    finally:
        primary.remove()
        standby.remove()
    doc = {"command": f"python -m benchmarks.shard_footprint --shards {args.shards} "
                      f"--rate-mbps {args.rate_mbps:g} --seconds {args.seconds:g}",
           "loadavg_at_end": os.getloadavg(), "runs": runs}
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
