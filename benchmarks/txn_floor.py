"""What exactly-once costs on the standby: a segment's transaction, stage by stage, beside
the plain produce a replicator without transactions does.

    python -m benchmarks.txn_floor [--segments 80] [--records 500] [--interval 0.1]

Starts its own single-node Kafka cluster (tests/infra). Every `--interval` seconds one
segment's worth of ~1 KiB records (12 partitions) is written, as `drstream apply`'s Kafka
sink writes a segment, and as a replicator without transactions (MirrorMaker 2's default)
would:

  transaction   begin, produce the records, flush (their offsets go into the checkpoint),
                produce the checkpoint record, commit_transaction (connectors/kafka/sink.py)
  plain         produce the same records with acks=all (idempotent), flush

A read_committed consumer (as the lag benchmark's standby reader) stamps when the
segment's last record becomes readable (done->readable is negative where it saw the
record before the producer heard its acknowledgement). Reports p50/p99 of each stage
and of write start -> readable. The difference between the two rows is the floor
exactly-once puts under apply's share of drstream's lag on these brokers. A benchmark,
not a test.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer

from benchmarks.common import (
    commit,
    create_topic,
    kafka_cluster,
    machine_facts,
    md_table,
    summarize,
    text_table,
    write_results,
)

PARTITIONS = 12
VALUE = b"v" * 1000
LAST = b"L"  # first byte of a segment's last record: the reader stamps it


class Reader(threading.Thread):
    """read_committed consumer: when each segment's last record became readable."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        super().__init__(daemon=True, name="reader")
        self.seen: dict[bytes, float] = {}
        self.halt = threading.Event()
        self.ready = threading.Event()
        self._c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"r-{uuid.uuid4()}",
                            "isolation.level": "read_committed", "enable.auto.commit": False,
                            "auto.offset.reset": "earliest", "fetch.wait.max.ms": 5})
        self._c.subscribe(topics, on_assign=lambda *_: self.ready.set())

    def run(self) -> None:
        while not self.halt.is_set():
            for m in self._c.consume(1000, 0.05):
                if m.error() is None and (m.value() or b"")[:1] == LAST:
                    self.seen[m.key()] = time.monotonic()
        self._c.close()

    def wait_seen(self, key: bytes, timeout: float = 10.0) -> float | None:
        deadline = time.monotonic() + timeout
        while key not in self.seen and time.monotonic() < deadline:
            time.sleep(0.0005)
        return self.seen.get(key)


def write_records(p: Producer, topic: str, n: int, key: bytes) -> None:
    for i in range(n - 1):
        p.produce(topic, VALUE, None, i % PARTITIONS)
    p.produce(topic, LAST + VALUE, key, 0)


def run_mode(mode: str, bootstrap: str, topic: str, ckpt_topic: str, reader: Reader,
             args: argparse.Namespace) -> dict[str, list[float]]:
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "enable.idempotence": True,
                            "linger.ms": 5}
    if mode == "transaction":
        conf["transactional.id"] = f"floor-{uuid.uuid4()}"
    p = Producer(conf)
    if mode == "transaction":
        p.init_transactions(30)
    stages: dict[str, list[float]] = {"produce+flush": [], "checkpoint+commit": [],
                                      "done->readable": [], "start->readable": []}
    run = uuid.uuid4().hex[:8]
    for s in range(args.segments + 5):
        key = f"{mode}-{run}-{s}".encode()
        t0 = time.monotonic()
        if mode == "transaction":
            p.begin_transaction()
        write_records(p, topic, args.records, key)
        p.flush(30)
        t1 = time.monotonic()
        if mode == "transaction":
            p.produce(ckpt_topic, b"checkpoint", b"ckpt", 0)
            p.commit_transaction(30)
        t2 = time.monotonic()
        seen = reader.wait_seen(key)
        if s >= 5 and seen is not None:  # the first ones warm up connections
            stages["produce+flush"].append((t1 - t0) * 1e3)
            stages["checkpoint+commit"].append((t2 - t1) * 1e3)
            stages["done->readable"].append((seen - t2) * 1e3)
            stages["start->readable"].append((seen - t0) * 1e3)
        time.sleep(max(0.0, t0 + args.interval - time.monotonic()))
    p.flush(10)
    return stages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segments", type=int, default=80)
    ap.add_argument("--records", type=int, default=500, help="records per segment")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between segments")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    facts = machine_facts()
    results: dict[str, dict[str, Any]] = {}
    with kafka_cluster("floor") as cluster:
        bootstrap = cluster.bootstrap_servers
        topic, ckpt = f"floor-{uuid.uuid4().hex[:8]}", f"floor-ckpt-{uuid.uuid4().hex[:8]}"
        create_topic(bootstrap, topic, PARTITIONS)
        create_topic(bootstrap, ckpt, 1, {"cleanup.policy": "compact"})
        reader = Reader(bootstrap, [topic])
        reader.start()
        reader.ready.wait(30)
        try:
            for mode in ("plain", "transaction", "plain", "transaction"):
                stages = run_mode(mode, bootstrap, topic, ckpt, reader, args)
                for name, values in stages.items():
                    results.setdefault(mode, {}).setdefault(name, []).extend(values)
                print(f"{mode}: {len(stages['start->readable'])} segments", file=sys.stderr)
        finally:
            reader.halt.set()
            reader.join(10)
    summary = {mode: {k: summarize(v) for k, v in st.items()} for mode, st in results.items()}
    headers = ["write", "produce+flush p50/p99 ms", "checkpoint+commit p50/p99 ms",
               "done->readable p50/p99 ms", "start->readable p50/p99 ms"]
    rows = [[mode] + [f"{s[k]['p50']:.1f} / {s[k]['p99']:.1f}" if s[k]["count"] else "-"
                      for k in ("produce+flush", "checkpoint+commit", "done->readable",
                                "start->readable")]
            for mode, s in summary.items()]
    print(text_table(headers, rows))
    report = {"benchmark": "txn_floor", **commit(), "machine": facts,
              "args": vars(args) | {"out": str(args.out) if args.out else None},
              "results": summary}
    md = (f"# Exactly-once floor: a segment's transaction beside a plain produce\n\n"
          f"`python -m benchmarks.txn_floor --segments {args.segments} --records "
          f"{args.records} --interval {args.interval}` at commit {report['commit']}, "
          f"load average {facts['loadavg_at_start'][0]:.1f} at start\n\n"
          + md_table(headers, rows) + "\n")
    for path in write_results("txn_floor", report, md, json_path=args.out):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
