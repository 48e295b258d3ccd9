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

from benchmarks.lag.analysis import match_records
from benchmarks.lag.base import load_case
from benchmarks.lag.report import write_report
from benchmarks.lag.run import run_cases

__all__ = ["load_case", "match_records", "run_cases", "write_report"]
