"""Restore speed: `drstream apply` and `drstream replay` from a prepared log, beside a bare
confluent-kafka produce loop of the same records in the same run.

    python -m benchmarks.restore                          # 1 GiB log, file and S3 stores
    python -m benchmarks.restore --gib 0.2 --stores file  # a quick look

1. Two private Kafka clusters (tests/infra). The primary gets `--gib` of ~1 KiB JSON-like
   records (keys, 4 headers) over `--partitions` partitions.
2. `drstream ship` builds the log in a file store and is stopped once the durable head
   covers the whole topic. For S3 the log's objects are copied into a bucket of a local S3
   API server (moto), so both stores hold the same bytes.
3. Bare loop: the driver decodes the whole log into memory (untimed) and produces every
   record to the same partition with its key, value, headers and timestamp through one
   confluent-kafka Producer (idempotent, linger 5 ms and the queue limits of the sink, but
   no transactions), then flushes. Timed from the first produce() to the end of flush().
   This is the ceiling a restore tool on this client and these brokers can reach.
4. `drstream apply --config` into the standby (file store): timed from launch until the
   checkpoint topic says the head segment is applied; start-up to the first checkpoint is
   reported apart.
5. `drstream replay --store URL --target-bootstrap ... --rename '{topic}.r-<store>'` from
   each store: timed as the process's wall time; its own summary line is kept.
6. Every target topic is read back (read_committed) and compared with the primary, per
   partition, by record count and digest (key, value, headers, timestamp).

7. For S3, a bare GET loop: every object of the log fetched from the S3 server with
   `--parallel` concurrent GETs through aiobotocore, the restore's other ceiling; replay
   from S3 is also given over the slower of the two ceilings.

Reported: MB/s of payload (keys + values + header keys and values, 10^6 bytes = 1 MB;
for the bare GET loop, the log's payload over its wall time), ratio to the bare loop, CPU
seconds per GiB of the drstream process trees (/proc), peak RSS.
Written to benchmarks/results/restore.{json,md}. A benchmark: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import (
    GiB,
    MiB,
    ProcSampler,
    Progress,
    RecordFactory,
    create_topic,
    end_offsets,
    exit_on_sigterm,
    kafka_cluster,
    machine_facts,
    md_table,
    preload,
    text_table,
    write_results,
)
from benchmarks.ship import LOG_ID, STREAM, LogReader, ShipperProc, wait_shipped, write_config
from drstream.connectors.kafka.config import DEFAULT_CHECKPOINT_TOPIC

ROOT = Path(__file__).resolve().parents[1]
TOPIC = "restore"
SINK_PRODUCER_CONF = {  # the Kafka sink's producer settings, minus the transaction
    "enable.idempotence": True,
    "linger.ms": 5,
    "queue.buffering.max.messages": 1_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
}
progress = Progress(5.0)


# --------------------------------------------------------------------------- prepare


def build_log(args: argparse.Namespace, primary: Any, workdir: Path) -> dict[str, Any]:
    factory = RecordFactory(seed=7)
    bs = primary.bootstrap_servers
    create_topic(bs, TOPIC, args.partitions)
    stats = preload(bs, TOPIC, args.partitions, int(args.gib * GiB), factory, progress)
    ends = end_offsets(bs, TOPIC, args.partitions)
    progress(f"preload: {stats.records:,} records, {stats.payload_bytes / 1e6:,.0f} MB in "
             f"{stats.seconds:.1f}s", force=True)
    config = write_config(workdir, bs, f"^{TOPIC}$", {})
    proc = ShipperProc(config, workdir / "ship.log")
    reader = LogReader(workdir)
    try:
        done = wait_shipped(reader, proc, TOPIC, ends, args.timeout,
                            stats.payload_bytes / stats.records, "ship (building the log)")
    finally:
        proc.stop()
        reader.close()
    if done["timed_out"]:
        raise RuntimeError("ship did not finish building the log in time")
    segs = sorted((workdir / "store" / "logs" / LOG_ID).glob("*.seg"))
    return {"records": stats.records, "payload_bytes": stats.payload_bytes,
            "preload": stats.as_dict(), "ends": ends, "head_seq": len(segs),
            "log_bytes": sum(p.stat().st_size for p in segs), "segments": len(segs),
            "config": config, "ship_wall_s": done["wall_s"]}


def load_records(workdir: Path, head: int) -> list[tuple[int, list[Any]]]:
    """Every Kafka batch of the log, in log order: [(partition, records)]."""
    reader = LogReader(workdir)
    out = []
    try:
        for seq in range(1, head + 1):
            _, body, _ = reader.decode(seq)
            out.extend((b.partition, b.records) for b in body.batches
                       if getattr(b, "topic", None) == TOPIC and b.stream == STREAM)
    finally:
        reader.close()
    return out


# --------------------------------------------------------------------------- bare loop


def run_bare(standby: Any, batches: list[tuple[int, list[Any]]], partitions: int,
             payload_bytes: int) -> dict[str, Any]:
    from confluent_kafka import Producer

    topic = f"{TOPIC}.bare"
    create_topic(standby.bootstrap_servers, topic, partitions)
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    p = Producer({"bootstrap.servers": standby.bootstrap_servers, **SINK_PRODUCER_CONF})
    cpu0, t0 = time.process_time(), time.monotonic()
    produce, poll = p.produce, p.poll
    n = 0
    for partition, records in batches:
        for r in records:
            while True:
                try:
                    produce(topic, r.value, r.key, partition=partition, headers=r.headers,
                            timestamp=r.timestamp, on_delivery=on_delivery)
                    break
                except BufferError:
                    poll(0.05)
            n += 1
            if n % 5000 == 0:
                poll(0)
                progress(f"bare loop: {n:,} records")
    left = p.flush(300)
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    if left or errors:
        raise RuntimeError(f"bare loop: {left} undelivered, {len(errors)} errors {errors[:3]}")
    progress(f"bare loop: {payload_bytes / 1e6 / wall:.1f} MB/s ({wall:.1f}s)", force=True)
    return {"topic": topic, "records": n, "wall_s": wall, "cpu_s": cpu,
            "mb_per_s": payload_bytes / 1e6 / wall,
            "cpu_s_per_gib": cpu / (payload_bytes / GiB)}


# --------------------------------------------------------------------------- apply


def dr_config(workdir: Path, store: dict[str, Any], standby: str,
              apply_settings: dict[str, Any]) -> Path:
    raw = yaml.safe_load((workdir / "drstream.yaml").read_text())
    raw["store"] = store
    raw["sinks"] = [{"type": "kafka", "name": "standby", "bootstrap_servers": standby,
                     "source": STREAM}]
    raw["service"] = {"ship_metrics_listen": None, "apply_metrics_listen": None}
    raw["apply"] = {**(raw.get("apply") or {}), **apply_settings}
    path = workdir / f"apply-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class CheckpointWatch:
    """Follows the standby's checkpoint topic: the newest applied seq of the apply sink."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka import Consumer

        self.consumer = Consumer({"bootstrap.servers": bootstrap, "enable.auto.commit": False,
                                  "group.id": f"bench-restore-{uuid.uuid4().hex[:6]}",
                                  "isolation.level": "read_committed",
                                  "auto.offset.reset": "earliest",
                                  "topic.metadata.refresh.interval.ms": 500})
        self.consumer.subscribe([DEFAULT_CHECKPOINT_TOPIC])
        self.seq = 0

    def poll(self, timeout: float) -> int:
        from drstream.connectors.kafka.sink import decode_checkpoint

        for m in self.consumer.consume(1000, timeout):
            if m.error() is None and m.value():
                self.seq = max(self.seq, decode_checkpoint(m.value()).seq)
        return self.seq

    def close(self) -> None:
        self.consumer.close()


def run_apply(workdir: Path, standby: Any, prepared: dict[str, Any],
              args: argparse.Namespace) -> dict[str, Any]:
    timeout = args.timeout
    config = dr_config(workdir, {"type": "file", "path": str(workdir / "store")},
                       standby.bootstrap_servers, args.apply)
    watch = CheckpointWatch(standby.bootstrap_servers)
    log_path = workdir / "apply.log"
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "drstream.daemon.cli", "apply", "--config",
                                 str(config)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
    sampler = ProcSampler(proc.pid).start()
    first = None
    head, payload = prepared["head_seq"], prepared["payload_bytes"]
    try:
        while (seq := watch.poll(0.2)) < head:
            if first is None and seq:
                first = (time.monotonic() - t0, seq)
            if proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"apply stopped at seq {seq}/{head}:\n"
                                   + log_path.read_text()[-3000:])
            mb = payload * seq / head / 1e6
            progress(f"apply: seq {seq}/{head}, {mb / (time.monotonic() - t0):.1f} MB/s")
        wall = time.monotonic() - t0
    finally:
        cpu = sampler.last_cpu
        sampler.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(60)
        watch.close()
    first_s, first_seq = first or (wall, head)
    steady = payload * (head - first_seq) / head / 1e6 / max(wall - first_s, 1e-9)
    progress(f"apply: {payload / 1e6 / wall:.1f} MB/s ({wall:.1f}s)", force=True)
    return {"wall_s": wall, "mb_per_s": payload / 1e6 / wall, "startup_to_first_ckpt_s": first_s,
            "mb_per_s_after_first_ckpt": steady, "cpu_s": cpu,
            "cpu_s_per_gib": cpu / (payload / GiB), "peak_rss_bytes": sampler.peak_rss,
            "topic": TOPIC}


# --------------------------------------------------------------------------- replay


def run_replay(workdir: Path, store_url: str, env: dict[str, str], standby: Any, label: str,
               prepared: dict[str, Any], parallel: int) -> dict[str, Any]:
    rename = f"{{topic}}.r-{label}"
    argv = [sys.executable, "-m", "drstream.daemon.cli", "replay", "--store", store_url,
            "--log-id", LOG_ID, "--key", f"k1=file:{workdir / 'k1.key'}",
            "--target-bootstrap", standby.bootstrap_servers, "--rename", rename,
            "--name", f"bench-{label}", "--parallel", str(parallel)]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, **env},
                            text=True)
    sampler = ProcSampler(proc.pid).start()
    out, err = proc.communicate()
    wall = time.monotonic() - t0
    cpu = sampler.last_cpu
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"replay from {label} failed ({proc.returncode}):\n{err[-3000:]}")
    summary = out.splitlines()[0] if out else ""
    m = re.search(r"in ([0-9.]+)s", summary)
    payload = prepared["payload_bytes"]
    progress(f"replay ({label}): {payload / 1e6 / wall:.1f} MB/s ({wall:.1f}s)", force=True)
    return {"wall_s": wall, "mb_per_s": payload / 1e6 / wall,
            "reported_s": float(m.group(1)) if m else None,
            "mb_per_s_reported": payload / 1e6 / float(m.group(1)) if m else None,
            "cpu_s": cpu, "cpu_s_per_gib": cpu / (payload / GiB),
            "peak_rss_bytes": sampler.peak_rss, "summary": summary, "parallel": parallel,
            "topic": rename.format(topic=TOPIC)}


def run_bare_get(server: Any, bucket: str, parallel: int, payload: int) -> dict[str, Any]:
    """The ceiling of a restore from this S3 server: every object of the log fetched with
    `parallel` concurrent GETs through aiobotocore (the S3 store's client), bodies read and
    dropped. A replay from S3 cannot outrun the slower of this and the bare produce loop."""
    import asyncio

    from aiobotocore.session import get_session

    async def fetch_all() -> tuple[float, int, int]:
        async with get_session().create_client(
                "s3", endpoint_url=server.endpoint_url, region_name=server.region,
                aws_access_key_id=server.access_key,
                aws_secret_access_key=server.secret_key) as client:
            keys = [o["Key"] async for page in client.get_paginator("list_objects_v2")
                    .paginate(Bucket=bucket) for o in page.get("Contents", [])]
            gate = asyncio.Semaphore(parallel)

            async def get(key: str) -> int:
                async with gate:
                    resp = await client.get_object(Bucket=bucket, Key=key)
                    async with resp["Body"] as body:
                        return len(await body.read())

            t0 = time.monotonic()
            sizes = await asyncio.gather(*map(get, keys))
            return time.monotonic() - t0, len(keys), sum(sizes)

    wall, objects, nbytes = asyncio.run(fetch_all())
    progress(f"bare GET (s3): {nbytes / 1e6 / wall:.1f} MB/s stored bytes ({wall:.1f}s)",
             force=True)
    return {"wall_s": wall, "objects": objects, "stored_bytes": nbytes,
            "stored_mb_per_s": nbytes / 1e6 / wall, "mb_per_s": payload / 1e6 / wall,
            "parallel": parallel, "cpu_s_per_gib": float("nan")}


def s3_copy(workdir: Path) -> tuple[Any, str, dict[str, str]]:
    from tests.infra.s3 import S3Server

    server = S3Server.start_new("bench-restore-s3")
    bucket = server.create_bucket()
    client = server.client
    root = workdir / "store"
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            client.put_object(Bucket=bucket, Key=str(path.relative_to(root)),
                              Body=path.read_bytes())
    return server, f"s3://{bucket}", server.store_env()


# --------------------------------------------------------------------------- check


def check_targets(primary: Any, standby: Any, topics: list[str]) -> dict[str, Any]:
    from drstream.connectors.kafka.common import Cluster
    from drstream.connectors.kafka.verify import partition_digests

    progress("checking every target topic against the primary", force=True)
    source = partition_digests(Cluster(primary.bootstrap_servers), [TOPIC])
    want = {p: v for (_, p), v in source.items()}
    got = partition_digests(Cluster(standby.bootstrap_servers), topics)
    out = {}
    for topic in topics:
        have = {p: v for (t, p), v in got.items() if t == topic}
        bad = sorted(p for p in want if have.get(p) != want[p])
        out[topic] = {"equal": not bad and len(have) == len(want), "mismatched_partitions": bad,
                      "records": sum(v[0] for v in have.values())}
    return out


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine_facts(), "params": vars(args) | {
        "out_dir": str(args.out_dir)}, "runs": {}}
    workdir = Path(tempfile.mkdtemp(prefix="drstream-bench-restore-"))
    s3 = None
    try:
        with kafka_cluster("restore-primary") as primary, \
                kafka_cluster("restore-standby") as standby:
            prepared = build_log(args, primary, workdir)
            report["log"] = {k: v for k, v in prepared.items() if k not in ("config", "ends")}
            progress(f"log: {prepared['segments']} segments, {prepared['log_bytes'] / MiB:,.0f}"
                     f" MiB stored for {prepared['payload_bytes'] / MiB:,.0f} MiB payload",
                     force=True)
            batches = load_records(workdir, prepared["head_seq"])
            runs = report["runs"]
            runs["bare"] = run_bare(standby, batches, args.partitions,
                                    prepared["payload_bytes"])
            del batches
            if "apply" in args.runs:
                runs["apply-file"] = run_apply(workdir, standby, prepared, args)
            for store in args.stores:
                if store == "file":
                    url, env = f"file://{workdir / 'store'}", {}
                else:
                    s3, url, env = s3_copy(workdir)
                    runs["bare-get-s3"] = run_bare_get(s3, url.removeprefix("s3://"),
                                                       args.parallel, prepared["payload_bytes"])
                runs[f"replay-{store}"] = run_replay(workdir, url, env, standby, store,
                                                     prepared, args.parallel)
            bare = runs["bare"]["mb_per_s"]
            for name, r in runs.items():
                r["over_bare"] = r["mb_per_s"] / bare
                if name == "replay-s3" and "bare-get-s3" in runs:  # the slower ceiling
                    r["over_ceiling"] = r["mb_per_s"] / min(bare, runs["bare-get-s3"]["mb_per_s"])
            checks = check_targets(primary, standby,
                                   [r["topic"] for r in runs.values() if "topic" in r])
            for r in runs.values():
                if "topic" in r:
                    r["target_equal_to_primary"] = checks[r["topic"]]["equal"]
            report["checks"] = checks
    finally:
        if s3 is not None:
            s3.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def render(report: dict[str, Any]) -> tuple[str, str]:
    headers = ["run", "MB/s", "x bare", "x ceiling", "wall s", "CPU s/GiB", "peak RSS MiB",
               "target == primary"]
    rows = [[name, f"{r['mb_per_s']:.1f}", f"{r['over_bare']:.2f}",
             f"{r['over_ceiling']:.2f}" if "over_ceiling" in r else "-", f"{r['wall_s']:.1f}",
             f"{r['cpu_s_per_gib']:.1f}" if r["cpu_s_per_gib"] == r["cpu_s_per_gib"] else "-",
             f"{r['peak_rss_bytes'] / MiB:.0f}" if r.get("peak_rss_bytes") else "-",
             {True: "yes", False: "NO"}.get(r.get("target_equal_to_primary"), "-")]
            for name, r in report["runs"].items()]
    log = report["log"]
    head = (f"log: {log['records']:,} records, {log['payload_bytes'] / 1e6:,.0f} MB payload in "
            f"{log['segments']} segments ({log['log_bytes'] / 1e6:,.0f} MB stored)")
    m = report["machine"]
    facts = (f"{m.get('nproc')} CPUs, {m.get('timestamp')}, load average "
             f"{m.get('loadavg_at_start', [0])[0]:.2f} at start, "
             f"{report.get('loadavg_at_end', [0])[0]:.2f} at end")
    md = "\n".join([f"# Restore throughput\n\n`{report['command']}`\n", facts, "", head, "",
                    md_table(headers, rows), ""])
    return md, head + "\n" + text_table(headers, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.restore", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="payload in the log (default 1)")
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--stores", default="file,s3", help="replay sources: file,s3")
    ap.add_argument("--runs", default="apply,replay", help="apply,replay (bare always runs)")
    ap.add_argument("--parallel", type=int, default=8, help="replay --parallel")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--apply", type=json.loads, default={}, metavar="JSON",
                    help="the `apply:` settings of the apply run, "
                         "e.g. '{\"batch_max_segments\": 32}'")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    args.stores = [s for s in args.stores.split(",") if s] if "replay" in args.runs else []
    return args


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    args = parse_args(argv)
    report = run(args)
    report["loadavg_at_end"] = os.getloadavg()
    report["command"] = " ".join(["python -m benchmarks.restore", *(argv or sys.argv[1:])])
    md, text = render(report)
    print(text)
    json_path = args.out_dir / "restore.json" if args.out_dir else None
    print("wrote " + ", ".join(map(str, write_results("restore", report, md, json_path))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
