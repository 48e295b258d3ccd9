"""Dataset replication speed: `drstream ship` + `drstream apply` copying a bucket prefix,
beside a bare get/put loop with the same client library (aiobotocore) in the same run.

    python -m benchmarks.datasets                               # 1000 x 4 KiB, 3 x 64 MiB
    python -m benchmarks.datasets --small 0 --large 1 --large-mib 500   # memory for 500 MB

1. One S3 API server (moto, tests/infra) holds a primary bucket per case, filled untimed.
2. Bare loop: one aiobotocore client reads each object (GetObject, streamed) and writes it
   to a bucket of its own (PutObject; a multipart upload of 8 MiB parts above 8 MiB),
   one object after the other like drstream. Timed from the first request to the last.
3. drstream: ship (file-store log, 8 MiB chunks) and apply (8 MiB parts) as processes,
   timed from the launch of both until the standby lists every object with its size;
   peak RSS of each process tree sampled from /proc. The standby is then compared with the
   primary object by object (size, sha256, content type, metadata).
4. RPO and end-to-end lag of one new 4 KiB object once the case is in sync (listing
   interval 1 s).

    python -m benchmarks.datasets --rpo                         # RPO with/without the hint

`--rpo`: RPO of a new object (its PUT on the primary until a listing of the standby
shows it, polled every 20 ms), `--rpo-samples` objects one after the other, with the
same `interval_s` twice: listing only, then with bucket notifications to an SQS queue on
the same server (the latency hint, docs/datasets.md). Before each PUT a random pause of
0 to `interval_s`, so PUTs fall anywhere between two listings, not right after one.

MB = 10^6 bytes of object content. A benchmark: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session

from benchmarks.common import (
    MiB,
    ProcSampler,
    exit_on_sigterm,
    machine_facts,
    md_table,
    summarize,
    text_table,
    write_results,
)
from tests.infra.s3 import KEY_ENV, SECRET_ENV, S3Server
from tests.integration.objectslib import notify_queue, put_big, view, write_objects_config
from tests.support.procs import DrstreamProcess

PART = 8 * MiB


async def bare_copy(s3: S3Server, src: str, dst: str, prefix: str) -> float:
    """Copy every object of src/prefix into dst with one aiobotocore client; seconds."""
    async with get_session().create_client(
            "s3", endpoint_url=s3.endpoint_url, region_name=s3.region,
            aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key) as c:
        started = time.monotonic()
        pages = c.get_paginator("list_objects_v2").paginate(Bucket=src, Prefix=prefix)
        async for page in pages:
            for o in page.get("Contents", []):
                await _copy_one(c, src, dst, o["Key"], int(o["Size"]))
        return time.monotonic() - started


async def _copy_one(c: Any, src: str, dst: str, key: str, size: int) -> None:
    resp = await c.get_object(Bucket=src, Key=key)
    meta = {"Metadata": resp.get("Metadata") or {}, "ContentType": resp["ContentType"]}
    async with resp["Body"] as body:
        if size <= PART:
            await c.put_object(Bucket=dst, Key=key, Body=await body.read(), **meta)
            return
        up = await c.create_multipart_upload(Bucket=dst, Key=key, **meta)
        parts, buf, n = [], b"", 1
        async for piece in body.iter_chunks(MiB):
            buf += piece
            if len(buf) >= PART:
                r = await c.upload_part(Bucket=dst, Key=key, UploadId=up["UploadId"],
                                        PartNumber=n, Body=buf[:PART])
                parts.append({"ETag": r["ETag"], "PartNumber": n})
                buf, n = buf[PART:], n + 1
        if buf:
            r = await c.upload_part(Bucket=dst, Key=key, UploadId=up["UploadId"],
                                    PartNumber=n, Body=buf)
            parts.append({"ETag": r["ETag"], "PartNumber": n})
        await c.complete_multipart_upload(Bucket=dst, Key=key, UploadId=up["UploadId"],
                                          MultipartUpload={"Parts": parts})


def fill(s3: S3Server, bucket: str, count: int, size: int) -> int:
    for i in range(count):
        key = f"data/part-{i:06d}.bin"
        if size > PART:
            put_big(s3, bucket, key, size, seed=i, part=PART)
        else:
            s3.client.put_object(Bucket=bucket, Key=key, Body=os.urandom(size),
                                 Metadata={"i": str(i)}, ContentType="application/x-bin")
    return count * size


def listed(s3: S3Server, bucket: str, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                  Prefix=prefix):
        out.update({o["Key"][len(prefix):]: int(o["Size"]) for o in page.get("Contents", [])})
    return out


def run_case(s3: S3Server, name: str, count: int, size: int, work: Path) -> dict[str, Any]:
    primary, bare, standby = (s3.create_bucket() for _ in range(3))
    mb = fill(s3, primary, count, size) / 1e6
    bare_s = asyncio.run(bare_copy(s3, primary, bare, "data/"))
    (work / name).mkdir(parents=True)
    setup = write_objects_config(
        work / name, s3, source_bucket=primary, standby_bucket=standby,
        standby_prefix="data", source={"interval_s": 1.0, "chunk_bytes": PART},
        sink={"part_bytes": PART}, ship={"flush_interval_s": 0.1})
    want = listed(s3, primary, "data/")
    started = time.monotonic()
    ship = DrstreamProcess(["ship", "--config", str(setup.path)], work / name / "ship.log")
    apply = DrstreamProcess(["apply", "--config", str(setup.path)], work / name / "apply.log")
    samplers = {"ship": ProcSampler(ship.pid).start(), "apply": ProcSampler(apply.pid).start()}
    ready_at = None
    try:
        while listed(s3, standby, "data/") != want:
            for p in (ship, apply):
                if not p.alive():
                    raise SystemExit(f"{p.command} exited\n{p.describe(60)}")
            if ready_at is None and ship.ready() and apply.ready():
                ready_at = time.monotonic()
            time.sleep(0.1)
        drstream_s = time.monotonic() - started
        ready_s = (ready_at or started) - started
        equal = view(s3, primary, "data") == view(s3, standby, "data")
        rpo = _new_object(s3, primary, standby, ship)
    finally:
        for p in (ship, apply):
            p.terminate()
        for s in samplers.values():
            s.stop()
    return {"case": name, "objects": count, "object_bytes": size, "mb": round(mb, 1),
            "bare_s": round(bare_s, 2), "drstream_s": round(drstream_s, 2),
            "drstream_start_s": round(ready_s, 2),  # launch until both are ready
            "drstream_objects_per_s_after_start": round(count / (drstream_s - ready_s), 1),
            "drstream_mb_per_s_after_start": round(mb / (drstream_s - ready_s), 1),
            "bare_objects_per_s": round(count / bare_s, 1),
            "drstream_objects_per_s": round(count / drstream_s, 1),
            "bare_mb_per_s": round(mb / bare_s, 1),
            "drstream_mb_per_s": round(mb / drstream_s, 1),
            "ship_peak_rss_mib": round(samplers["ship"].peak_rss / MiB),
            "apply_peak_rss_mib": round(samplers["apply"].peak_rss / MiB),
            "standby_equal": equal, **rpo}


def _new_object(s3: S3Server, primary: str, standby: str,
                ship: DrstreamProcess) -> dict[str, float]:
    """Seconds from the put of one new object to its event in ship's output (in the log:
    the segment is written right after) and to its arrival on the standby."""
    before = ship.output().count('"object_changes"')
    put_at = time.monotonic()
    s3.client.put_object(Bucket=primary, Key="data/zz-new", Body=os.urandom(4096))
    logged = arrived = None
    while arrived is None or logged is None:
        now = time.monotonic() - put_at
        if logged is None and ship.output().count('"object_changes"') > before:
            logged = now
        if arrived is None and listed(s3, standby, "data/zz-new"):
            arrived = now
        time.sleep(0.02)
    return {"new_object_shipped_s": round(logged, 2), "new_object_on_standby_s": round(arrived, 2)}


def rpo_run(s3: S3Server, hint: bool, samples: int, interval_s: float,
            work: Path) -> dict[str, Any]:
    """PUT one 4 KiB object at a time; seconds until the standby has each."""
    name = "hint" if hint else "interval"
    primary, standby = s3.create_bucket(), s3.create_bucket()
    source: dict[str, Any] = {"interval_s": interval_s}
    if hint:
        source["notifications"] = {"sqs_queue_url": notify_queue(s3, primary, "data")}
    (work / name).mkdir(parents=True)
    setup = write_objects_config(work / name, s3, source_bucket=primary,
                                 standby_bucket=standby, standby_prefix="data", source=source,
                                 ship={"flush_interval_s": 0.1})
    ship = DrstreamProcess(["ship", "--config", str(setup.path)], work / name / "ship.log")
    apply = DrstreamProcess(["apply", "--config", str(setup.path)], work / name / "apply.log")
    rng = random.Random(7)
    times: list[float] = []
    try:
        ship.wait_ready(60)
        apply.wait_ready(60)
        if hint:
            ship.wait_output("s3_notifications_connected", 60)
        for i in range(samples):
            time.sleep(rng.uniform(0, interval_s))
            key = f"data/rpo-{i:04d}"
            put_at = time.monotonic()
            s3.client.put_object(Bucket=primary, Key=key, Body=os.urandom(4096))
            while not listed(s3, standby, key):
                for p in (ship, apply):
                    if not p.alive():
                        raise SystemExit(f"{p.command} exited\n{p.describe(60)}")
                time.sleep(0.02)
            times.append(time.monotonic() - put_at)
    finally:
        for p in (ship, apply):
            p.terminate()
    stats = summarize(times)
    return {"mode": "notification hint" if hint else "listing only", "interval_s": interval_s,
            "samples": len(times),
            **{f"rpo_{k}_s": round(float(stats[k] or 0), 2)
               for k in ("min", "p50", "p90", "p99", "max", "mean")},
            "rpo_all_s": [round(t, 3) for t in times]}


def rpo_main(args: argparse.Namespace, facts: dict[str, Any], s3: S3Server) -> None:
    with tempfile.TemporaryDirectory(prefix="drs-datasets-rpo-") as tmp:
        rows = [rpo_run(s3, hint, args.rpo_samples, args.rpo_interval, Path(tmp))
                for hint in (False, True)]
    cols = ["mode", "interval_s", "samples", "rpo_min_s", "rpo_p50_s", "rpo_p90_s",
            "rpo_p99_s", "rpo_max_s", "rpo_mean_s"]
    table = [[r[c] for c in cols] for r in rows]
    print(text_table(cols, table))
    cmd = (f"python -m benchmarks.datasets --rpo --rpo-samples {args.rpo_samples} "
           f"--rpo-interval {args.rpo_interval}")
    md = (f"# Dataset replication: RPO of a new object, with and without the notification "
          f"hint\n\n`{cmd}`\n\n{facts['nproc']} CPUs, {facts['timestamp']}, commit "
          f"{facts['commit']}, load average {facts['loadavg_at_start'][0]:.2f} at start\n\n"
          f"{md_table(cols, table)}\n")
    for path in write_results(f"{args.name}-rpo", {"machine": facts, "args": vars(args),
                                                   "runs": rows}, md):
        print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=1000, help="small objects (0: skip)")
    ap.add_argument("--small-kib", type=int, default=4)
    ap.add_argument("--large", type=int, default=3, help="large objects (0: skip)")
    ap.add_argument("--large-mib", type=int, default=64)
    ap.add_argument("--name", default="datasets",
                    help="results/<name>.{json,md} (--rpo: <name>-rpo)")
    ap.add_argument("--rpo", action="store_true",
                    help="only the RPO of new objects, with and without the hint")
    ap.add_argument("--rpo-samples", type=int, default=30)
    ap.add_argument("--rpo-interval", type=float, default=5.0, help="interval_s of both runs")
    args = ap.parse_args()
    exit_on_sigterm()
    facts = machine_facts()
    s3 = S3Server.start_new("bench-s3")
    os.environ[KEY_ENV], os.environ[SECRET_ENV] = s3.access_key, s3.secret_key
    if args.rpo:
        try:
            rpo_main(args, facts, s3)
        finally:
            s3.stop()
        return
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="drs-datasets-") as tmp:
            if args.small:
                rows.append(run_case(s3, "small", args.small, args.small_kib * 1024, Path(tmp)))
            if args.large:
                rows.append(run_case(s3, "large", args.large, args.large_mib * MiB, Path(tmp)))
    finally:
        s3.stop()
    cols = ["case", "objects", "mb", "bare_objects_per_s", "drstream_objects_per_s",
            "drstream_objects_per_s_after_start", "bare_mb_per_s", "drstream_mb_per_s",
            "drstream_mb_per_s_after_start", "ship_peak_rss_mib", "apply_peak_rss_mib",
            "new_object_shipped_s", "new_object_on_standby_s", "standby_equal"]
    table = [[r[c] for c in cols] for r in rows]
    print(text_table(cols, table))
    cmd = "python -m benchmarks.datasets " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    md = (f"# Dataset replication\n\n`{cmd}`\n\n{facts['nproc']} CPUs, {facts['timestamp']}, "
          f"commit {facts['commit']}, load average {facts['loadavg_at_start'][0]:.2f} at "
          f"start\n\n{md_table(cols, table)}\n")
    for path in write_results(args.name, {"machine": facts, "args": vars(args), "cases": rows},
                              md):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
