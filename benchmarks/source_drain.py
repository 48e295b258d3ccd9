"""How long a record waits in the Kafka source's consume call: two ways to drain.

    python -m benchmarks.source_drain [--rate-mbps 5] [--seconds 15]
                                      [--out benchmarks/results/source_drain.json]

Starts its own single-node Kafka cluster (tests/infra), then per strategy a fresh topic
of 12 partitions, the paced producer of benchmarks/ship.py (each record stamped with its
produce time), and a consumer with the source's settings in this process:

  batch        consume(2000, 0.1), as connectors/kafka/source.py calls it: returns when
               2000 records are there or 100 ms have passed
  first+drain  consume(1, 0.1) blocks for the first record, then consume(1999, 0)
               takes what is already fetched without waiting

Reports produce -> returned by consume (p50, p99, max), acknowledged by the broker ->
returned (the source's own wait, whatever the producer and broker lag on a busy
machine), records per consume call and the consumer thread's CPU per record. A
benchmark, not a test.
"""

from __future__ import annotations

import argparse
import array
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from benchmarks.common import commit, create_topic, kafka_cluster, summarize, write_results
from benchmarks.ship import PRODUCE_HEADER, run_producer

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "source_drain.json"
PARTITIONS = 12
BATCH = 2000
POLL_TIMEOUT_S = 0.1


def consume_batch(c: Consumer) -> list[Any]:
    return c.consume(BATCH, POLL_TIMEOUT_S)


def consume_first_then_drain(c: Consumer) -> list[Any]:
    first = c.consume(1, POLL_TIMEOUT_S)
    return first + c.consume(BATCH - 1, 0) if first else first


STRATEGIES = {"batch": consume_batch, "first+drain": consume_first_then_drain}


def measure(bootstrap: str, name: str, rate_mbps: float, seconds: float) -> dict[str, Any]:
    topic = f"drain-{name.replace('+', '-')}"
    create_topic(bootstrap, topic, PARTITIONS)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{topic}",
                  "enable.auto.commit": False, "isolation.level": "read_committed",
                  "auto.offset.reset": "earliest", "enable.partition.eof": False,
                  "fetch.queue.backoff.ms": 10})  # as the source sets it
    c.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    fetch = STRATEGIES[name]
    waits: list[float] = []
    returned: dict[tuple[int, int], int] = {}  # (partition, offset) -> ns consume returned it
    calls = [0]
    cpu = [0.0]
    stop, fetching = threading.Event(), threading.Event()

    def run() -> None:
        while not stop.is_set() and not fetching.is_set():  # until the warm-up record
            if c.consume(1, POLL_TIMEOUT_S):
                fetching.set()
        t0 = time.thread_time()
        while not stop.is_set():
            msgs = fetch(c)
            now = time.time_ns()
            calls[0] += 1
            for m in msgs:
                for k, v in m.headers() or []:
                    if k == PRODUCE_HEADER:
                        waits.append((now - int(v)) / 1e6)
                        returned[m.partition(), m.offset()] = now
        cpu[0] = time.thread_time() - t0

    thread = threading.Thread(target=run)
    thread.start()
    # A new topic's partitions may have no leader for a while: measure only once the
    # consumer fetches (else the run measures the backlog of its start-up).
    warm = Producer({"bootstrap.servers": bootstrap})
    warm.produce(topic, b"warm-up", partition=0)
    warm.flush(30)
    if not fetching.wait(120):
        stop.set()
        thread.join()
        raise SystemExit(f"{name}: the consumer received nothing within 120 s")
    with tempfile.TemporaryDirectory() as tmp:
        produced = run_producer(bootstrap, topic, PARTITIONS, rate_mbps, seconds,
                                Path(tmp) / "acks")
        acks = array.array("q", (Path(tmp) / "acks").read_bytes())
    time.sleep(1.0)
    stop.set()
    thread.join()
    c.close()
    # acked -> returned: the source's own wait, whatever the broker and producer lag
    after_ack = [(returned[p, o] - ns) / 1e6 for p, o, ns in
                 zip(acks[0::3], acks[1::3], acks[2::3], strict=True) if (p, o) in returned]
    return {"strategy": name, "records": len(waits), "produced": produced["records"],
            "producer": produced, "wait_ms": summarize(waits),
            "after_ack_ms": summarize(after_ack), "consume_calls": calls[0],
            "records_per_call": len(waits) / max(calls[0], 1),
            "consumer_cpu_us_per_record": cpu[0] / max(len(waits), 1) * 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.source_drain", description=__doc__)
    ap.add_argument("--rate-mbps", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    results = []
    with kafka_cluster("drain") as cluster:
        for name in STRATEGIES:
            r = measure(cluster.bootstrap_servers, name, args.rate_mbps, args.seconds)
            results.append(r)
            w, a = r["wait_ms"], r["after_ack_ms"]
            print(f"{name:<12} produced->returned p50 {w['p50']:.1f} p99 {w['p99']:.1f} ms; "
                  f"acked->returned p50 {a['p50']:.1f} p99 {a['p99']:.1f} "
                  f"max {a['max']:.1f} ms;  {r['records_per_call']:6.1f} records/call  "
                  f"{r['consumer_cpu_us_per_record']:.2f} CPU us/record  "
                  f"({r['records']}/{r['produced']} records)")
    report = {"rate_mbps": args.rate_mbps, "seconds": args.seconds, "results": results,
              **commit()}
    for path in write_results("source_drain", report, json_path=args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
