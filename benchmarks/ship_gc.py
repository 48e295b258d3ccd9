"""Ship's CPU per record under three policies of the cyclic garbage collector (no services).

    python -m benchmarks.ship_gc [--records 200000] [--instructions]
                                 [--out benchmarks/results/ship_gc.json]

In one process with everything `drstream ship` imports loaded, the per-record path of a
backlog drain runs as the shipper runs it: messages as Consumer.consume returns them
(2000 at a time, fresh objects with fresh header lists, 12 partitions), taken into
columns (message_columns), queued while up to buffer_max_bytes (64 MiB) are buffered, merged
into the open segment and cut at max_bytes (1 MiB) into an encoded, compressed, encrypted
segment. Policies:

  automatic   Python's default thresholds (700, 10, 10): what ship ran with before
  paced       automatic collection off, a full collection every 5 s of the drain
  frozen      paced, and the objects alive when the loop starts (imports, config,
              clients) frozen out of every collection (gc.freeze)

Per policy: the least CPU time of --repeat runs (a busy machine only adds to it), the
collections that ran and their CPU, and one full collection timed at the end with the
buffer full (what each paced collection costs).

"every 5 s" is modelled as every RATE * 5 records, RATE being the drain rate measured by
the lag benchmark (36,000 records/s, benchmarks/results/lag.md). Reports microseconds per
record (CPU time of the process) and, with --instructions, CPU instructions per
record counted by valgrind's callgrind (repeatable), plus the count and cost of the
collections. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Message

import drstream.daemon.cli  # noqa: F401  everything ship imports, so the heap is the shipper's
from benchmarks.codec import environment
from benchmarks.common import RecordFactory, commit, write_results
from drstream.connectors.kafka.source import message_columns
from drstream.daemon.codec import Body, KafkaColumns, make_manifest
from drstream.daemon.config import DEFAULT_BUFFER_MAX_BYTES, DEFAULT_MAX_BYTES
from drstream.daemon.keyring import KeyRing
from drstream.daemon.pipeline import OpenSegment
from drstream.daemon.plugins import installed
from drstream.daemon.segment import ZERO_DIGEST, encode_segment
from drstream.daemon.source import Delivery

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ship_gc.json"
POLICIES = ("automatic", "paced", "frozen")
CONSUME_BATCH = 2000
PARTITIONS = 12
RUN = 500  # records of one partition in a row, as fetches hand them out
DRAIN_RECORDS_PER_S = 36_000
PACE_S = 5.0


class Drain:
    """The shipper's per-record work, with its buffer of consumed, not yet cut records."""

    def __init__(self, records: int) -> None:
        self.factory = RecordFactory(pool_size=4096)
        self.records = records
        self.keyring = KeyRing({"k": bytes(32)}, "k")
        self.queue: collections.deque[Delivery] = collections.deque()
        self.queued = 0
        self.seg = OpenSegment()
        self.seq = 0
        self.collections: list[float] = []  # seconds per paced collection

    def consume(self, start: int) -> list[Any]:
        """What consume() returns: new Message objects, each with its own header list."""
        msgs = []
        for i in range(start, start + CONSUME_BATCH):
            key, value, headers = self.factory.record(i)
            msgs.append(Message(topic="events", partition=(i // RUN) % PARTITIONS, offset=i,
                                key=key, value=value, headers=headers,
                                timestamp=(1, 1_750_000_000_000 + i)))
        return msgs

    def cut(self) -> None:
        batches: list[KafkaColumns] = list(self.seg.batches.values())
        self.seq += 1
        body = Body(make_manifest({}, batches), batches)
        encode_segment(body, log_id="bench", seq=self.seq, keyring=self.keyring,
                       prev_digest=ZERO_DIGEST if self.seq == 1 else b"\1" * 32)
        self.seg = OpenSegment()

    def run(self, paced_every: int | None) -> None:
        next_collect = paced_every
        for start in range(0, self.records, CONSUME_BATCH):
            columns, nbytes = message_columns("kafka:primary", self.consume(start),
                                              lambda m: True)
            self.queue.append(Delivery(columns, {}, nbytes=nbytes))
            self.queued += nbytes
            while self.queued > DEFAULT_BUFFER_MAX_BYTES:  # the source pauses at the bound
                d = self.queue.popleft()
                self.queued -= d.nbytes
                self.seg.add(0, "kafka:primary", d)
                if self.seg.nbytes >= DEFAULT_MAX_BYTES:
                    self.cut()
            if next_collect is not None and start >= next_collect:
                t0 = time.process_time()
                gc.collect()
                self.collections.append(time.process_time() - t0)
                next_collect += paced_every or 0


def one(policy: str, records: int, warm: int) -> dict[str, Any]:
    """Run `policy` (after a warm-up that fills the buffer) inside functools.reduce, the
    one place callgrind counts when this runs under it."""
    installed()  # the connectors loaded, as in ship
    drain = Drain(records)
    drain.records = warm
    drain.run(None)
    drain.records = records
    gc.collect()
    paced = None
    if policy != "automatic":
        paced = int(DRAIN_RECORDS_PER_S * PACE_S)
        gc.disable()
    if policy == "frozen":
        gc.freeze()
    automatic: list[float] = []
    started: list[float] = []

    def watch(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(time.process_time())
        elif started:
            automatic.append(time.process_time() - started.pop())

    gc.callbacks.append(watch)
    t0 = time.process_time()
    functools.reduce(lambda _, f: f(), [lambda: drain.run(paced)], None)
    cpu = time.process_time() - t0
    gc.callbacks.remove(watch)
    spent = automatic if policy == "automatic" else drain.collections
    t0 = time.process_time()  # one full collection with the buffer full, as paced runs it
    gc.collect()
    full = time.process_time() - t0
    return {"policy": policy, "records": records, "cpu_us_per_record": cpu / records * 1e6,
            "collections": len(spent), "collection_cpu_s": sum(spent),
            "full_collection_cpu_ms": full * 1e3, "frozen_objects": gc.get_freeze_count(),
            "tracked_objects": len(gc.get_objects())}


def count(policy: str, records: int, warm: int) -> int:
    """Instructions of `policy`'s drain, counted by callgrind in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--collect-atstart=no",
             "--toggle-collect=functools_reduce", f"--callgrind-out-file={out}",
             sys.executable, "-m", "benchmarks.ship_gc", "--one", policy,
             "--records", str(records), "--warm", str(warm)],
            check=True, capture_output=True, text=True)
        totals = [ln for ln in out.read_text().splitlines() if ln.startswith("totals:")]
        return int(totals[0].split()[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ship_gc", description=__doc__)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--warm", type=int, default=80_000, help="records that fill the buffer "
                    "before the measured drain")
    ap.add_argument("--repeat", type=int, default=3, help="runs per policy (least CPU kept)")
    ap.add_argument("--instructions", action="store_true",
                    help="also count instructions per record with valgrind's callgrind")
    ap.add_argument("--one", choices=POLICIES, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.records, args.warm)))
        return 0
    results = []
    for policy in POLICIES:
        runs = []
        for _ in range(args.repeat):  # the least CPU of a few runs: a busy machine adds, never
            proc = subprocess.run([sys.executable, "-m", "benchmarks.ship_gc", "--one", policy,
                                   "--records", str(args.records), "--warm", str(args.warm)],
                                  check=True, capture_output=True, text=True)
            runs.append(json.loads(proc.stdout))
        r = min(runs, key=lambda x: x["cpu_us_per_record"])
        r["cpu_us_per_record_runs"] = [x["cpu_us_per_record"] for x in runs]
        if args.instructions:
            r["instructions_per_record"] = count(policy, args.records, args.warm) / args.records
        results.append(r)
        ir = r.get("instructions_per_record")
        print(f"{policy:<10} {r['cpu_us_per_record']:7.2f} CPU us/record  "
              f"{'' if ir is None else f'{ir:,.0f} instructions/record  '}"
              f"{r['collections']} collections, {r['collection_cpu_s'] * 1e3:.0f} ms CPU; "
              f"a full one {r['full_collection_cpu_ms']:.0f} ms over {r['tracked_objects']:,} "
              f"objects ({r['frozen_objects']:,} frozen)")
    report = {"results": results, "drain_records_per_s": DRAIN_RECORDS_PER_S,
              "pace_s": PACE_S, "buffer_max_bytes": DEFAULT_BUFFER_MAX_BYTES,
              "max_bytes": DEFAULT_MAX_BYTES, **environment(), **commit()}
    for path in write_results("ship_gc", report, json_path=args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
