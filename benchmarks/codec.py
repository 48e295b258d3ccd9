"""Segment codec throughput: the full segment path beside raw zstd-1 + AES-256-GCM, and
the per-record paths of ship and apply (pure Python beside compiled, records beside columns).

    python -m benchmarks.codec [--segments 16] [--rounds 7] [--partitions 1,32]
                               [--instructions] [--out benchmarks/results/codec.json]

Workload: ~1 KB JSON-like Kafka record values (varied fields, realistic compressibility),
a key and two or three headers per record, grouped into ~1 MiB segments (~1000 records).
One workload per --partitions value: the records of each segment split into that many
batches (partitions over 4 topics); 1 is the reference case, 32 shows per-batch cost.

Paths, all over the same records, in the same run:
  segment encode  encode_segment(): columnar body encode + zstd level 1 + HKDF + AES-GCM
  raw encode      zstd level 1 + AES-GCM of the concatenated record bytes (keys, values,
                  header keys and values) of each segment, with reused zstd/AESGCM objects
  segment decode  decode_segment(): AES-GCM + zstd + body decode into KafkaRecord objects
  raw decode      AES-GCM decrypt + zstd decompress of the raw path's output
  segment digest  SHA-256 of each finished segment (the chain link; not in "encode")

MB/s are payload MB (10**6 bytes of record keys, values and headers) per second, the same
numerator for every path, so the ratios are time ratios. Each round times every path once
(order rotated per round); the table shows the median round (and the best). A benchmark,
not a test: nothing here asserts on time. The target is encode/raw >= 0.70.

Per-record paths, microseconds per record (wall, median and best round) over the same
records, with the cyclic garbage collector paused as apply and ship run them (paced_gc);
with --instructions also CPU instructions per record counted by valgrind's callgrind
(exact and repeatable on a busy machine, where wall time is not):
  decode               body bytes -> KafkaBatch of KafkaRecord: codec.decode_body (pure
                       Python, the reference) beside daemon/_ccodec.c (accel.decode_body)
  decode -> produce    body bytes -> produce() arguments with the sink's two headers
                       appended: decode_body + the conversion beside accel.decode_produce
  encode               Body -> bytes from KafkaBatch of KafkaRecord beside KafkaColumns
  ship messages->body  consumed Message lists -> open segment -> body bytes: a record
                       object per message (the path before the columnar one) beside
                       connectors.kafka.source.message_columns
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cryptography
import zstandard
from confluent_kafka import Message
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks.common import commit
from drstream.connectors.kafka.common import ORIGIN_HEADER, SOURCE_OFFSET_HEADER
from drstream.connectors.kafka.source import RECORD_OVERHEAD_BYTES, message_columns
from drstream.daemon import accel
from drstream.daemon.codec import (
    Body,
    EventBatch,
    KafkaBatch,
    KafkaColumns,
    KafkaRecord,
    decode_body,
    encode_body,
    make_manifest,
)
from drstream.daemon.keyring import KeyRing
from drstream.daemon.pipeline import OpenSegment
from drstream.daemon.segment import ZERO_DIGEST, decode_segment, encode_segment, segment_digest
from drstream.daemon.source import Delivery

SEGMENT_BYTES = 1 << 20
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "codec.json"

_WORDS = (  # noqa: SIM905
    "alpha beta gamma delta model train serve feature vector store region primary standby "
    "replica batch stream offset commit partition topic latency error retry checkout cart "
    "payment user session click view search recommend rank score label embedding shard"
).split()
_EVENTS = ("page_view", "click", "add_to_cart", "purchase", "search", "login", "logout")
_COUNTRIES = ("DE", "FR", "US", "GB", "JP", "BR", "IN", "NL", "SE", "ES")
_DEVICES = ("ios", "android", "web", "tv")


def _record_value(rng: random.Random, i: int, ts: int) -> bytes:
    """A ~1 KB JSON document: ids and numbers (incompressible-ish), enums, some text."""
    doc: dict[str, Any] = {
        "event_id": f"{rng.getrandbits(128):032x}",
        "event": rng.choice(_EVENTS),
        "ts": ts,
        "user_id": rng.randrange(10**9),
        "session": f"{rng.getrandbits(64):016x}",
        "device": {
            "os": rng.choice(_DEVICES),
            "app_version": f"{rng.randrange(1, 9)}.{rng.randrange(30)}.{rng.randrange(100)}",
            "screen": [rng.choice((375, 390, 414, 1080, 1440)), rng.choice((667, 844, 1920))],
        },
        "geo": {
            "country": rng.choice(_COUNTRIES),
            "lat": round(rng.uniform(-90, 90), 5),
            "lon": round(rng.uniform(-180, 180), 5),
        },
        "page": "/" + "/".join(rng.choice(_WORDS) for _ in range(rng.randrange(1, 4))),
        "items": [
            {
                "sku": f"SKU-{rng.randrange(100000):05d}",
                "qty": rng.randrange(1, 5),
                "price": round(rng.uniform(1, 500), 2),
            }
            for _ in range(rng.randrange(0, 5))
        ],
        "features": [round(rng.gauss(0, 1), 4) for _ in range(rng.randrange(30, 64))],
        "query": " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(4, 24))),
        "note": "".join(
            rng.choice(string.ascii_letters + " ") for _ in range(rng.randrange(20, 100))
        ),
        "seq": i,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def build_segments(n_segments: int, seed: int = 7) -> list[list[KafkaRecord]]:
    rng = random.Random(seed)
    segments: list[list[KafkaRecord]] = []
    offset = 0
    ts = 1_750_000_000_000
    for _ in range(n_segments):
        records: list[KafkaRecord] = []
        size = 0
        while size < SEGMENT_BYTES:
            ts += rng.randrange(0, 50)
            value = _record_value(rng, offset, ts)
            key = f"user-{rng.randrange(10**6)}".encode()
            headers: list[tuple[str, bytes | None]] = [
                ("content-type", b"application/json"),
                ("trace-id", f"{rng.getrandbits(64):016x}".encode()),
            ]
            if rng.random() < 0.3:
                headers.append(("schema-version", b"3"))
            records.append(KafkaRecord(offset, ts, 1, key, value, headers))
            size += _record_bytes(records[-1])
            offset += 1
        segments.append(records)
    return segments


def _record_bytes(r: KafkaRecord) -> int:
    n = len(r.key or b"") + len(r.value or b"")
    for k, v in r.headers:
        n += len(k.encode()) + len(v or b"")
    return n


def _raw_payload(records: list[KafkaRecord]) -> bytes:
    parts: list[bytes] = []
    for r in records:
        parts.append(r.key or b"")
        parts.append(r.value or b"")
        for k, v in r.headers:
            parts.append(k.encode())
            parts.append(v or b"")
    return b"".join(parts)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def build_bodies(segments: list[list[KafkaRecord]], partitions: int) -> list[Body]:
    """One body per segment; its records split into `partitions` contiguous batches
    (over 4 topics), with the full position map of every partition in each manifest."""
    bodies: list[Body] = []
    positions: dict[str, dict[str, int]] = {}
    for recs in segments:
        size = -(-len(recs) // partitions)
        batches: list[KafkaBatch | EventBatch] = []
        for p in range(partitions):
            chunk = recs[p * size : (p + 1) * size]
            if not chunk:
                continue
            topic = f"events-{p % 4}"
            batches.append(KafkaBatch("kafka:primary", topic, p, chunk))
            positions.setdefault(topic, {})[str(p)] = chunk[-1].offset + 1
        manifest = make_manifest({"kafka:primary": json.loads(json.dumps(positions))}, batches)
        bodies.append(Body(manifest, batches))
    return bodies


def run(n_segments: int, rounds: int, partitions: int = 1,
        count_instructions: bool = False) -> dict[str, Any]:
    segments = build_segments(n_segments)
    keyring = KeyRing({"bench": os.urandom(32)}, "bench")
    bodies = build_bodies(segments, partitions)
    payloads = [_raw_payload(recs) for recs in segments]
    payload_bytes = sum(map(len, payloads))
    n_records = sum(map(len, segments))

    cctx = zstandard.ZstdCompressor(level=1)
    dctx = zstandard.ZstdDecompressor()
    aead = AESGCM(os.urandom(32))
    nonce = os.urandom(12)

    encoded: list[bytes] = []

    # The chain digest (SHA-256 of each finished segment) is not part of the encode path
    # measured against raw zstd+AES; it is timed on its own ("segment digest").
    prevs = [ZERO_DIGEST] + [bytes([seq % 251 + 1]) * 32 for seq in range(2, n_segments + 1)]

    def seg_encode() -> None:
        encoded.clear()
        for seq, (body, prev) in enumerate(zip(bodies, prevs, strict=True), start=1):
            encoded.append(
                encode_segment(body, log_id="bench", seq=seq, prev_digest=prev, keyring=keyring)
            )

    def seg_digest() -> None:
        for data in encoded:
            segment_digest(data)

    raw_out: list[bytes] = []

    def raw_encode() -> None:
        raw_out.clear()
        for p in payloads:
            raw_out.append(aead.encrypt(nonce, cctx.compress(p), None))

    def seg_decode() -> None:
        for seq, data in enumerate(encoded, start=1):
            decode_segment(data, keyring, expect_log_id="bench", expect_seq=seq)

    def raw_decode() -> None:
        for c in raw_out:
            dctx.decompress(aead.decrypt(nonce, c, None))

    # Warm up (thread-local contexts, allocator) and check the round trip once.
    seg_encode()
    raw_encode()
    _, first = decode_segment(encoded[0], keyring)
    assert first == bodies[0], "segment round trip changed the body"

    paths: dict[str, Callable[[], None]] = {
        "segment encode": seg_encode,
        "raw zstd-1+AES-GCM encode": raw_encode,
        "segment decode": seg_decode,
        "raw AES-GCM+zstd decode": raw_decode,
        "segment digest (sha256)": seg_digest,
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for r in range(rounds):
        # Rotate the order so no path always runs right after another's allocations.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_timed(paths[name]))

    mb = payload_bytes / 1e6
    results: dict[str, Any] = {}
    for name, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        results[name] = {
            "median_s": med,
            "best_s": best,
            "mb_per_s_median": mb / med,
            "mb_per_s_best": mb / best,
            "ms_per_segment_median": med / n_segments * 1e3,
        }
    enc_ratio = times["raw zstd-1+AES-GCM encode"]
    dec_ratio = times["raw AES-GCM+zstd decode"]
    seg_total = sum(map(len, encoded))
    raw_total = sum(map(len, raw_out))
    return {
        "workload": {
            "partitions": partitions,
            "segments": n_segments,
            "records": n_records,
            "records_per_segment": n_records / n_segments,
            "payload_bytes": payload_bytes,
            "mean_record_bytes": payload_bytes / n_records,
            "segment_bytes_total": seg_total,
            "raw_ciphertext_bytes_total": raw_total,
            "compression_ratio_segment": payload_bytes / seg_total,
            "compression_ratio_raw": payload_bytes / raw_total,
            "rounds": rounds,
        },
        "results": results,
        "encode_ratio_median": statistics.median(enc_ratio) / results["segment encode"]["median_s"],
        "encode_ratio_best": min(enc_ratio) / results["segment encode"]["best_s"],
        "decode_ratio_median": statistics.median(dec_ratio) / results["segment decode"]["median_s"],
        "decode_ratio_best": min(dec_ratio) / results["segment decode"]["best_s"],
        "per_record": per_record(bodies, n_records, rounds, n_segments, partitions,
                                 count_instructions),
    }


def per_record(bodies: list[Body], n_records: int, rounds: int, n_segments: int,
               partitions: int, count_instructions: bool) -> dict[str, Any]:
    result = time_per_record(bodies, n_records, rounds)
    if count_instructions:
        # fewer segments under valgrind (~50x slower): counts per record do not depend on it
        counted = instructions(min(n_segments, 2), partitions)
        for name, ir in counted.items():
            result[name]["instructions_per_record"] = ir
    return result


# --------------------------------------------------------------------------- per record

STREAM = "kafka:primary"
# What the Kafka sink appends to every record it produces (connectors/kafka/sink.py).
SINK_TAIL = ((ORIGIN_HEADER, b"primary"),)


def consumed(body: Body) -> list[Any]:
    """A body's records as Consumer.consume hands them to ship: one Message each, in runs
    per partition (headers as a list, as confluent-kafka converts them)."""
    return [Message(topic=b.topic, partition=b.partition, offset=r.offset, key=r.key,
                    value=r.value, headers=list(r.headers),
                    timestamp=(r.timestamp_type, r.timestamp))
            for b in body.batches if isinstance(b, KafkaBatch) for r in b.records]


def _ship_records(msgs: list[Any]) -> bytes:
    """The ship path before the columnar one: a KafkaRecord per message, a header scan
    per record, merged per partition, then encoded (connectors/kafka/source.py at
    47d70e3, minus what does not touch records)."""
    runs: dict[tuple[str, int], list[KafkaRecord]] = {}
    nbytes = 0
    for m in msgs:
        if m.error() is not None:
            continue
        headers = m.headers() or []
        if headers and any(name == ORIGIN_HEADER for name, _ in headers):
            continue
        ts_type, ts = m.timestamp()
        key, value = m.key(), m.value()
        rec = KafkaRecord(m.offset(), ts, ts_type, key, value, headers)
        runs.setdefault((m.topic(), m.partition()), []).append(rec)
        nbytes += RECORD_OVERHEAD_BYTES + len(key or b"") + len(value or b"")
    merged: dict[tuple[str, str, int], KafkaBatch] = {}
    for (topic, partition), records in runs.items():
        if (STREAM, topic, partition) in merged:
            merged[STREAM, topic, partition].records.extend(records)
        else:
            merged[STREAM, topic, partition] = KafkaBatch(STREAM, topic, partition, records)
    batches = list(merged.values())
    return encode_body(Body(make_manifest({}, batches), batches))


def _ship_columns(msgs: list[Any]) -> bytes:
    """Today's ship path: message_columns, the open segment, the columnar encoder."""
    columns, nbytes = message_columns(STREAM, msgs, lambda m: True)
    seg = OpenSegment()
    seg.add(0, STREAM, Delivery(columns, {}, nbytes=nbytes))
    batches = list(seg.batches.values())
    return encode_body(Body(make_manifest({}, batches), batches))


def _produce_args_py(data: bytes) -> list[Any]:
    body = decode_body(data)
    return [accel.produce_batch(b, SINK_TAIL, SOURCE_OFFSET_HEADER) for b in body.batches
            if isinstance(b, KafkaBatch)]


def per_record_paths(bodies: list[Body]) -> dict[str, Callable[[], object]]:
    """Each per-record path over all bodies, as a call (None: not built here)."""
    encoded = [encode_body(b) for b in bodies]
    columns = [Body(b.manifest, [KafkaColumns.of(k) for k in b.batches
                                 if isinstance(k, KafkaBatch)]) for b in bodies]
    messages = [consumed(b) for b in bodies]
    assert [_ship_columns(m) for m in messages] == [_ship_records(m) for m in messages]
    assert [encode_body(c) for c in columns] == encoded
    paths: dict[str, Callable[[], object]] = {
        "decode, pure Python": lambda: [decode_body(d) for d in encoded],
        "decode, compiled": lambda: [accel.decode_body(d) for d in encoded],
        "decode -> produce, pure Python": lambda: [_produce_args_py(d) for d in encoded],
        "decode -> produce, compiled": lambda: [
            accel.decode_produce(d, SINK_TAIL, SOURCE_OFFSET_HEADER) for d in encoded],
        "encode, records": lambda: [encode_body(b) for b in bodies],
        "encode, columns": lambda: [encode_body(c) for c in columns],
        "ship messages->body, records": lambda: [_ship_records(m) for m in messages],
        "ship messages->body, columns": lambda: [_ship_columns(m) for m in messages],
    }
    if not accel.COMPILED:
        for name in [n for n in paths if n.endswith("compiled")]:
            del paths[name]
    return paths


def time_per_record(bodies: list[Body], n_records: int, rounds: int) -> dict[str, Any]:
    paths = per_record_paths(bodies)
    for fn in paths.values():  # warm up: struct and name caches, allocator
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    with gc_paused():
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(_timed(paths[name]))
                gc.collect()  # between paths, as the paced collection would
    return {name: {"us_per_record_median": statistics.median(ts) / n_records * 1e6,
                   "us_per_record_best": min(ts) / n_records * 1e6}
            for name, ts in times.items()}


def count_main(argv: list[str]) -> int:
    """Under callgrind (see instructions()): each path once inside functools.reduce, the
    only place collection is on; callgrind dumps a count after each."""
    segments, partitions = int(argv[0]), int(argv[1])
    paths = per_record_paths(build_bodies(build_segments(segments), partitions))
    for fn in paths.values():
        fn()
    print(json.dumps(list(paths)))
    with gc_paused():
        for fn in paths.values():
            functools.reduce(lambda _, f: f(), [fn], None)
            gc.collect()
    return 0


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def instructions(segments: int, partitions: int) -> dict[str, float]:
    """CPU instructions per record of each per-record path, counted by callgrind."""
    n_records = sum(map(len, build_segments(segments)))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", "--collect-atstart=no",
             "--toggle-collect=functools_reduce", "--dump-after=functools_reduce",
             f"--callgrind-out-file={out}", sys.executable, "-m", "benchmarks.codec",
             "--count", str(segments), str(partitions)],
            capture_output=True, text=True, check=True)
        names = json.loads(proc.stdout.strip().splitlines()[-1])
        counts = []
        for i in range(1, len(names) + 1):
            totals = [line for line in (Path(f"{out}.{i}").read_text().splitlines())
                      if line.startswith("totals:")]
            counts.append(int(totals[0].split()[1]))
    return {name: count / n_records for name, count in zip(names, counts, strict=True)}


def environment() -> dict[str, Any]:
    return {
        "environment": {
            "python": sys.version.split()[0],
            "implementation": platform.python_implementation(),
            "machine": platform.machine(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "zstandard": zstandard.__version__,
            "zstd_backend": zstandard.backend,
            "cryptography": cryptography.__version__,
            "byteorder": sys.byteorder,
            "compiled_decoder": accel.COMPILED,
            "load_average_at_end": os.getloadavg(),  # other work on the machine
        },
        **commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def print_table(report: dict[str, Any]) -> None:
    w = report["workload"]
    print(
        f"{w['partitions']} partition(s) per segment, "
        f"{w['segments']} segments, {w['records']} records "
        f"({w['records_per_segment']:.0f}/segment, {w['mean_record_bytes']:.0f} B/record), "
        f"{w['payload_bytes'] / 1e6:.1f} MB payload, {w['rounds']} rounds"
    )
    print(
        f"compression: segment {w['compression_ratio_segment']:.2f}x, "
        f"raw {w['compression_ratio_raw']:.2f}x"
    )
    print(f"{'path':<28}{'MB/s median':>12}{'MB/s best':>12}{'ms/segment':>12}")
    for name, r in report["results"].items():
        print(
            f"{name:<28}{r['mb_per_s_median']:>12.1f}{r['mb_per_s_best']:>12.1f}"
            f"{r['ms_per_segment_median']:>12.2f}"
        )
    print(
        f"encode/raw: {report['encode_ratio_median']:.3f} (median), "
        f"{report['encode_ratio_best']:.3f} (best)"
    )
    print(
        f"decode/raw: {report['decode_ratio_median']:.3f} (median), "
        f"{report['decode_ratio_best']:.3f} (best)"
    )
    print(f"{'per-record path':<34}{'us/record median':>17}{'best':>8}{'instr/record':>14}")
    for name, r in report["per_record"].items():
        ir = r.get("instructions_per_record")
        print(f"{name:<34}{r['us_per_record_median']:>17.3f}{r['us_per_record_best']:>8.3f}"
              f"{'' if ir is None else f'{ir:,.0f}':>14}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.codec", description=__doc__)
    ap.add_argument("--segments", type=int, default=16, help="~1 MiB segments per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--partitions",
        default="1,32",
        help="comma-separated batches per segment, one workload each (default 1,32)",
    )
    ap.add_argument("--instructions", action="store_true",
                    help="also count CPU instructions per record with valgrind's callgrind")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--count"]:
        return count_main(argv[1:])
    args = ap.parse_args(argv)
    workloads = []
    for partitions in (int(p) for p in args.partitions.split(",")):
        workloads.append(run(args.segments, args.rounds, partitions, args.instructions))
        print_table(workloads[-1])
        print()
    report = {"workloads": workloads, "target_encode_ratio": 0.70, **environment()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
