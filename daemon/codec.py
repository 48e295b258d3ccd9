"""Body encoding of a segment: the plaintext that is zstd-compressed, then encrypted.

Layout (byte by byte in docs/format.md):

    u32 LE manifest_len | manifest JSON (UTF-8) | section* (to the end of the body)
    section = u8 type | u64 LE payload_len | payload
        type 1: one Kafka batch, columnar (fixed-width little-endian columns, one data blob)
        type 2: one event batch, a JSON document {"stream": ..., "events": [...]}

Every integer in the body is little-endian (the header of the segment is big-endian).
A column is packed and unpacked whole with an explicit "<" struct format ("<1000q"), so
the bytes are the same on every machine and a big-endian one needs no byte swap.

Speed: the per-record work is a handful of C-level passes (list comprehensions over the
records, one struct.pack for all columns of a batch, one `b"".join` for the whole body),
never a Python loop per record, so a 1 MiB body of ~1 KB records encodes in about a quarter of the
time zstd level 1 needs to compress it (benchmarks/codec.py).

Decoding is strict: a length that runs past the end, an unknown section type, bytes left
over, an invalid UTF-8 string, a column that disagrees with the blob or a manifest that
disagrees with the records raises SegmentFormatError, and no other exception escapes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from itertools import accumulate, chain, repeat
from operator import attrgetter
from typing import Any, Final, cast

from drstream.daemon.errors import SegmentFormatError
from drstream.daemon.records import (
    Batch,
    Body,
    EventBatch,
    KafkaBatch,
    KafkaColumns,
    KafkaRecord,
    Manifest,
    ManifestKind,
)

__all__ = [
    "SECTION_EVENT_BATCH",
    "SECTION_KAFKA_BATCH",
    "TIMESTAMP_CREATE_TIME",
    "TIMESTAMP_LOG_APPEND_TIME",
    "TIMESTAMP_NOT_AVAILABLE",
    "Batch",
    "Body",
    "EventBatch",
    "KafkaBatch",
    "KafkaColumns",
    "KafkaRecord",
    "Manifest",
    "decode_body",
    "decode_body_with",
    "decode_manifest",
    "decode_sections",
    "encode_body",
    "make_manifest",
]

# confluent_kafka.TIMESTAMP_* values.
TIMESTAMP_NOT_AVAILABLE: Final = 0
TIMESTAMP_CREATE_TIME: Final = 1
TIMESTAMP_LOG_APPEND_TIME: Final = 2

SECTION_KAFKA_BATCH: Final = 1
SECTION_EVENT_BATCH: Final = 2

_KINDS: Final = ("data", "heartbeat")
_MANIFEST_FIELDS: Final = frozenset(
    ("kind", "record_count", "min_timestamp_ms", "max_timestamp_ms", "positions", "extra")
)

_I64_MIN: Final = -(2**63)
_I64_MAX: Final = 2**63 - 1


_U32_S = struct.Struct("<I")
_SECTION_S = struct.Struct("<BQ")  # type, payload length
_U16_S = struct.Struct("<H")
# After stream and topic: partition i32, record count u32, header count u32.
_KAFKA_FIXED_S = struct.Struct("<iII")
# Column bytes per record (offsets, timestamps, key len, value len, header count, ts type)
# and per header (key len, value len).
_PER_RECORD: Final = 8 + 8 + 4 + 4 + 4 + 1
_PER_HEADER: Final = 4 + 4

_get_timestamp = attrgetter("timestamp")


def make_manifest(
    positions: dict[str, Any],
    batches: Sequence[Batch],
    *,
    kind: ManifestKind | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """A manifest whose counts and timestamp bounds are computed from `batches`.

    kind defaults to "heartbeat" when there are no batches, else "data".
    """
    count = 0
    lo: int | None = None
    hi: int | None = None
    for b in batches:
        if isinstance(b, EventBatch):
            count += len(b.events)
            continue
        ts = (list(map(_get_timestamp, b.records)) if isinstance(b, KafkaBatch)
              else b.timestamps)
        count += len(ts)
        if ts:
            bmin, bmax = min(ts), max(ts)
            lo = bmin if lo is None else min(lo, bmin)
            hi = bmax if hi is None else max(hi, bmax)
    if kind is None:
        kind = "data" if batches else "heartbeat"
    return Manifest(
        positions=positions,
        record_count=count,
        min_timestamp_ms=lo,
        max_timestamp_ms=hi,
        kind=kind,
        extra={} if extra is None else extra,
    )


# --------------------------------------------------------------------------- encode


def _fail(message: str) -> SegmentFormatError:
    return SegmentFormatError(message)


def _json_dumps(obj: object, what: str) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8"
        )
    except (TypeError, ValueError, RecursionError) as e:
        raise _fail(f"cannot encode {what} as JSON: {e}") from e


def _short_str(s: object, what: str) -> bytes:
    if not isinstance(s, str):
        raise _fail(f"{what} must be a str, got {type(s).__name__}")
    try:
        raw = s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _fail(f"{what} is not encodable as UTF-8: {e}") from e
    if len(raw) > 0xFFFF:
        raise _fail(f"{what} is longer than 65535 bytes")
    return _U16_S.pack(len(raw)) + raw


def _manifest_doc(m: Manifest) -> dict[str, Any]:
    return {
        "kind": m.kind,
        "record_count": m.record_count,
        "min_timestamp_ms": m.min_timestamp_ms,
        "max_timestamp_ms": m.max_timestamp_ms,
        "positions": m.positions,
        "extra": m.extra,
    }


def _lens(items: list[Any]) -> tuple[list[int], int]:
    """Lengths of byte strings, None (where allowed) as -1; and how many were None.

    Lists, not arrays: sum/min/max over a list of existing ints is faster than over an
    array, which creates an int object per element.
    """
    try:
        return list(map(len, items)), 0  # fast path: no None
    except TypeError:
        lens = [-1 if x is None else len(x) for x in items]
        return lens, lens.count(-1)


_NAMES_CACHE: dict[tuple[str, str], bytes] = {}
_NAMES_CACHE_MAX: Final = 4096


def _names(stream: str, topic: str) -> bytes:
    """u16 + UTF-8 stream, u16 + UTF-8 topic; cached (the same few pairs recur)."""
    try:
        return _NAMES_CACHE[stream, topic]
    except (KeyError, TypeError):
        pass
    raw = _short_str(stream, "stream") + _short_str(topic, "topic")
    if len(_NAMES_CACHE) >= _NAMES_CACHE_MAX:
        _NAMES_CACHE.clear()
    _NAMES_CACHE[stream, topic] = raw
    return raw


_COLUMNS_CACHE: dict[tuple[int, int], struct.Struct] = {}
_COLUMNS_CACHE_MAX: Final = 4096


def _columns(n: int, nh: int) -> struct.Struct:
    """The struct packing every column of a batch of n records and nh headers."""
    try:
        return _COLUMNS_CACHE[n, nh]
    except KeyError:
        pass
    st = struct.Struct(f"<{n}q{n}q{n}i{n}i{n}I{nh}I{nh}i{n}B")
    if len(_COLUMNS_CACHE) >= _COLUMNS_CACHE_MAX:
        _COLUMNS_CACHE.clear()
    _COLUMNS_CACHE[n, nh] = st
    return st


def _encode_kafka(b: KafkaBatch | KafkaColumns, out: list[Any]) -> tuple[int, int, int]:
    """Append the Kafka section to `out`; return (record count, min ts, max ts)."""
    if isinstance(b, KafkaColumns):
        return _encode_columns(b, b.offsets, b.timestamps, b.timestamp_types, b.keys,
                               b.values, b.headers, out)
    recs = b.records
    return _encode_columns(
        b, [r.offset for r in recs], [r.timestamp for r in recs],
        [r.timestamp_type for r in recs], [r.key for r in recs], [r.value for r in recs],
        [r.headers for r in recs], out)


def _encode_columns(
    b: KafkaBatch | KafkaColumns,
    offsets: list[int],
    timestamps: list[int],
    ts_types: list[int],
    keys: list[Any],  # bytes | None (checked by len and join)
    values: list[Any],
    hdrs: Sequence[Sequence[tuple[str, bytes | None]]],
    out: list[Any],
) -> tuple[int, int, int]:
    """The Kafka section of batch b (its names) whose records are given column by column.

    All columns of the batch are packed by one struct with an explicit "<" format
    ("<3q3q3i3i3I5I5i3B"): the same bytes on every machine (a big-endian one needs no
    byte swap), and much faster than array(typecode, list) or a pack per column. The
    byte strings are appended as they are and copied once, by the caller's b"".join;
    a null takes no bytes (its length is -1).
    """
    n = len(offsets)
    try:
        key_lens = list(map(len, keys))  # fast path: no None
        key_nulls = 0
    except TypeError:
        key_lens, key_nulls = _lens(keys)
    try:
        value_lens = list(map(len, values))
        value_nulls = 0
    except TypeError:
        value_lens, value_nulls = _lens(values)
    header_counts = list(map(len, hdrs))
    nh = sum(header_counts)
    if nh:
        hkeys: list[str] = []
        hvals: list[bytes | None] = []
        for k, v in chain.from_iterable(hdrs):  # also checks every header is a pair
            hkeys.append(k)
            hvals.append(v)
        text = "".join(hkeys)
        if text.isascii():  # the usual case: one encode, char lengths = byte lengths
            hk_blob = text.encode("ascii")
            hkey_lens = list(map(len, hkeys))
        else:
            encoded = [k.encode("utf-8") for k in hkeys]
            hk_blob = b"".join(encoded)
            hkey_lens = list(map(len, encoded))
        hval_lens, hval_nulls = _lens(hvals)
        blob_len = len(hk_blob) + sum(hval_lens) + hval_nulls
    else:
        hkey_lens = hval_lens = []
        blob_len = 0
    if n:
        if max(ts_types) > TIMESTAMP_LOG_APPEND_TIME:  # negatives: struct "B" refuses them
            raise _fail(f"timestamp_type must be 0, 1 or 2 in {b.topic}[{b.partition}]")
        lo, hi = min(timestamps), max(timestamps)
    else:
        lo = hi = 0
    blob_len += sum(key_lens) + key_nulls + sum(value_lens) + value_nulls
    try:
        names = _NAMES_CACHE[b.stream, b.topic]
    except (KeyError, TypeError):
        names = _names(b.stream, b.topic)
    payload_len = len(names) + _KAFKA_FIXED_S.size + n * _PER_RECORD + nh * _PER_HEADER
    out += (
        _SECTION_S.pack(SECTION_KAFKA_BATCH, payload_len + blob_len),
        names,
        _KAFKA_FIXED_S.pack(b.partition, n, nh),
        _columns(n, nh).pack(
            *offsets,  # i64
            *timestamps,  # i64
            *key_lens,  # i32, -1 = null
            *value_lens,  # i32, -1 = null
            *header_counts,  # u32
            *hkey_lens,  # u32
            *hval_lens,  # i32, -1 = null
            *ts_types,  # u8
        ),
    )
    out.extend(filter(None, keys) if key_nulls else keys)
    out.extend(filter(None, values) if value_nulls else values)
    if nh:
        out.append(hk_blob)
        out.extend(filter(None, hvals) if hval_nulls else hvals)
    return n, lo, hi


def _check_manifest(m: Manifest, count: int, lo: int | None, hi: int | None) -> None:
    """The manifest must agree with the records (also checked again when decoding)."""
    if m.kind not in _KINDS:
        raise _fail(f"manifest kind must be 'data' or 'heartbeat', got {m.kind!r}")
    if type(m.record_count) is not int or m.record_count != count:
        raise _fail(f"manifest record_count is {m.record_count!r} but the body holds {count}")
    if m.kind == "heartbeat" and count:
        raise _fail(f"a heartbeat holds no records, this one holds {count}")
    mn, mx = m.min_timestamp_ms, m.max_timestamp_ms
    if (mn is None) != (mx is None):
        raise _fail("manifest min_timestamp_ms and max_timestamp_ms must both be set or unset")
    if mn is not None and mx is not None:
        if type(mn) is not int or type(mx) is not int:
            raise _fail("manifest min/max_timestamp_ms must be integers")
        if not (_I64_MIN <= mn <= mx <= _I64_MAX):
            raise _fail(f"manifest timestamps out of order or range: {mn} > {mx}")
        if count == 0:
            raise _fail("manifest has timestamps but the body holds no records")
    if lo is not None and hi is not None and (mn is None or mx is None or lo < mn or hi > mx):
        raise _fail(f"manifest timestamps [{mn}, {mx}] do not cover the records' [{lo}, {hi}]")
    if not isinstance(m.positions, dict):
        raise _fail("manifest positions must be a dict")
    if not isinstance(m.extra, dict):
        raise _fail("manifest extra must be a dict")


def encode_body(body: Body) -> bytes:
    """The plaintext body: manifest first (length-prefixed), then one section per batch.

    Raises SegmentFormatError when the body cannot be encoded (a value out of range, a
    header key that is not UTF-8 encodable, a manifest that disagrees with the records).
    """
    out: list[Any] = [b""]  # placeholder for the manifest
    count = 0
    lo: int | None = None
    hi: int | None = None
    try:
        for b in body.batches:
            if isinstance(b, KafkaBatch | KafkaColumns):
                n, bmin, bmax = _encode_kafka(b, out)
                count += n
                if n:
                    lo = bmin if lo is None else min(lo, bmin)
                    hi = bmax if hi is None else max(hi, bmax)
            elif isinstance(b, EventBatch):
                if not isinstance(b.events, list) or not all(isinstance(e, dict) for e in b.events):
                    raise _fail(f"events of stream {b.stream!r} must be a list of dicts")
                if not isinstance(b.stream, str):
                    raise _fail("event stream must be a str")
                doc = _json_dumps({"stream": b.stream, "events": b.events}, "events")
                out.append(_SECTION_S.pack(SECTION_EVENT_BATCH, len(doc)))
                out.append(doc)
                count += len(b.events)
            else:
                raise _fail(f"unknown batch type {type(b).__name__}")
    except SegmentFormatError:
        raise
    except (OverflowError, struct.error, TypeError, ValueError, AttributeError) as e:
        raise _fail(f"cannot encode batch: {e}") from e
    _check_manifest(body.manifest, count, lo, hi)
    manifest = _json_dumps(_manifest_doc(body.manifest), "manifest")
    if len(manifest) > 0xFFFFFFFF:
        raise _fail("manifest is larger than 4 GiB")
    out[0] = _U32_S.pack(len(manifest)) + manifest
    try:
        return b"".join(out)
    except TypeError as e:  # a key or value that is not bytes
        raise _fail(
            f"cannot encode batch: record keys, values and header values must be bytes: {e}"
        ) from e


# --------------------------------------------------------------------------- decode


def _loads(raw: bytes | memoryview, what: str) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not allowed")

    try:
        return json.loads(bytes(raw).decode("utf-8"), parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _fail(f"{what} is not valid UTF-8 JSON: {e}") from e


def _is_int(v: object) -> bool:
    return type(v) is int


def _parse_manifest(raw: bytes | memoryview) -> Manifest:
    doc = _loads(raw, "manifest")
    if not isinstance(doc, dict):
        raise _fail("manifest is not a JSON object")
    keys = set(doc)
    if keys != _MANIFEST_FIELDS:
        missing = sorted(_MANIFEST_FIELDS - keys)
        unknown = sorted(keys - _MANIFEST_FIELDS)
        raise _fail(f"manifest fields wrong: missing {missing}, unknown {unknown}")
    kind = doc["kind"]
    count = doc["record_count"]
    mn = doc["min_timestamp_ms"]
    mx = doc["max_timestamp_ms"]
    if kind not in _KINDS:
        raise _fail(f"manifest kind {kind!r} is not 'data' or 'heartbeat'")
    if not _is_int(count) or count < 0:
        raise _fail(f"manifest record_count {count!r} is not a non-negative integer")
    if not (mn is None or _is_int(mn)) or not (mx is None or _is_int(mx)):
        raise _fail("manifest min/max_timestamp_ms must be integers or null")
    if not isinstance(doc["positions"], dict) or not isinstance(doc["extra"], dict):
        raise _fail("manifest positions and extra must be JSON objects")
    return Manifest(
        positions=doc["positions"],
        record_count=count,
        min_timestamp_ms=mn,
        max_timestamp_ms=mx,
        kind=kind,
        extra=doc["extra"],
    )


def _split_manifest(data: bytes | memoryview) -> tuple[memoryview, int]:
    mv = memoryview(data)
    if len(mv) < 4:
        raise _fail(f"body too short for the manifest length ({len(mv)} bytes)")
    (mlen,) = _U32_S.unpack_from(mv, 0)
    if 4 + mlen > len(mv):
        raise _fail(f"manifest length {mlen} runs past the end of the body ({len(mv)} bytes)")
    return mv[4 : 4 + mlen], 4 + mlen


def decode_manifest(data: bytes | memoryview) -> Manifest:
    """Only the manifest of a body (or of a prefix of it at least that long)."""
    raw, _ = _split_manifest(data)
    return _parse_manifest(raw)


def _read_col(
    mv: memoryview, pos: int, code: str, size: int, n: int
) -> tuple[tuple[int, ...], int]:
    """n little-endian integers of `size` bytes at pos (the caller checked the bounds)."""
    return struct.unpack_from(f"<{n}{code}", mv, pos), pos + n * size


def _cut(data: bytes, start: int, lens: Sequence[int]) -> tuple[list[bytes], int]:
    """Consecutive byte strings of `lens` (all >= 0) from data[start:]."""
    bounds = list(accumulate(lens, initial=start))
    return list(map(data.__getitem__, map(slice, bounds, bounds[1:]))), bounds[-1]


def _cut_nullable(data: bytes, start: int, lens: Sequence[int]) -> tuple[list[bytes | None], int]:
    """Like _cut, where a length of -1 stands for None (and takes no bytes)."""
    if not lens:
        return [], start
    if min(lens) < -1:
        raise _fail("negative length in a column")
    if not lens.count(-1):
        cut, pos = _cut(data, start, lens)
        return cast("list[bytes | None]", cut), pos
    cut, pos = _cut(data, start, list(map(max, lens, repeat(0))))
    out = cast("list[bytes | None]", cut)
    for i, ln in enumerate(lens):
        if ln == -1:
            out[i] = None
    return out, pos


def _decode_kafka(data: bytes, pos: int, end: int) -> tuple[KafkaBatch, Sequence[int]]:
    mv = memoryview(data)
    stream, pos = _read_short_str(mv, pos, end, "stream")
    topic, pos = _read_short_str(mv, pos, end, "topic")
    if pos + _KAFKA_FIXED_S.size > end:
        raise _fail("Kafka batch header runs past the end of its section")
    partition, n, nh = _KAFKA_FIXED_S.unpack_from(mv, pos)
    pos += _KAFKA_FIXED_S.size
    if pos + n * _PER_RECORD + nh * _PER_HEADER > end:
        raise _fail(f"Kafka batch columns ({n} records, {nh} headers) run past its section")
    offsets, pos = _read_col(mv, pos, "q", 8, n)
    timestamps, pos = _read_col(mv, pos, "q", 8, n)
    key_lens, pos = _read_col(mv, pos, "i", 4, n)
    value_lens, pos = _read_col(mv, pos, "i", 4, n)
    header_counts, pos = _read_col(mv, pos, "I", 4, n)
    hkey_lens, pos = _read_col(mv, pos, "I", 4, nh)
    hval_lens, pos = _read_col(mv, pos, "i", 4, nh)
    ts_types = data[pos : pos + n]
    pos += n
    if ts_types and max(ts_types) > TIMESTAMP_LOG_APPEND_TIME:
        raise _fail("timestamp type out of range (0..2)")
    if sum(header_counts) != nh:
        raise _fail(f"header counts sum to {sum(header_counts)}, batch declares {nh}")
    # Bound the blob before slicing anything: the lengths must use it exactly.
    blob = (
        sum(key_lens) + key_lens.count(-1) + sum(value_lens) + value_lens.count(-1)
        + sum(hkey_lens) + sum(hval_lens) + hval_lens.count(-1)
    )  # fmt: skip
    if pos + blob != end:
        raise _fail(f"Kafka batch data is {end - pos} bytes, its columns describe {blob}")
    keys, pos = _cut_nullable(data, pos, key_lens)
    values, pos = _cut_nullable(data, pos, value_lens)
    if nh:
        hkeys, pos = _decode_header_keys(data, pos, hkey_lens)
        hvals, pos = _cut_nullable(data, pos, hval_lens)
        pairs = list(zip(hkeys, hvals, strict=True))
        headers: list[list[tuple[str, bytes | None]]] = []
        append = headers.append
        i = 0
        for c in header_counts:
            append(pairs[i : i + c])
            i += c
    else:
        headers = [[] for _ in range(n)]
    if pos != end:  # pragma: no cover - guaranteed by the blob check above
        raise _fail("Kafka batch data does not end at its section end")
    records = list(map(KafkaRecord, offsets, timestamps, ts_types, keys, values, headers))
    batch = KafkaBatch(stream=stream, topic=topic, partition=partition, records=records)
    return batch, timestamps


def _decode_header_keys(data: bytes, start: int, lens: Sequence[int]) -> tuple[list[str], int]:
    """The header keys (UTF-8) of `lens` bytes each, stored one after another at start."""
    end = start + sum(lens)
    region = data[start:end]
    if region.isascii():
        # The usual case: one decode, then str slices at the same (byte = char) offsets.
        text = region.decode("ascii")
        bounds = list(accumulate(lens, initial=0))
        return list(map(text.__getitem__, map(slice, bounds, bounds[1:]))), end
    raw, _ = _cut(data, start, lens)
    try:
        return [r.decode("utf-8") for r in raw], end
    except UnicodeDecodeError as e:
        raise _fail(f"header key is not valid UTF-8: {e}") from e


def _read_short_str(mv: memoryview, pos: int, end: int, what: str) -> tuple[str, int]:
    if pos + 2 > end:
        raise _fail(f"{what} length runs past the end of its section")
    (ln,) = _U16_S.unpack_from(mv, pos)
    pos += 2
    if pos + ln > end:
        raise _fail(f"{what} ({ln} bytes) runs past the end of its section")
    try:
        return str(mv[pos : pos + ln], "utf-8"), pos + ln
    except UnicodeDecodeError as e:
        raise _fail(f"{what} is not valid UTF-8: {e}") from e


def _decode_events(raw: memoryview) -> EventBatch:
    doc = _loads(raw, "event batch")
    if not isinstance(doc, dict) or set(doc) != {"stream", "events"}:
        raise _fail("event batch must be a JSON object with exactly 'stream' and 'events'")
    stream, events = doc["stream"], doc["events"]
    if not isinstance(stream, str):
        raise _fail("event batch stream must be a string")
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise _fail("event batch events must be a list of JSON objects")
    return EventBatch(stream=stream, events=events)


def decode_body(data: bytes) -> Body:
    """Decode a whole body; raises SegmentFormatError (and nothing else) on any defect."""
    return decode_body_with(data, decode_sections)


# (body, first section byte) -> (batches, record count, min and max record timestamp)
SectionDecoder = Callable[
    [bytes, int], tuple[list[KafkaBatch | EventBatch], int, int | None, int | None]
]


def decode_body_with(data: bytes, sections: SectionDecoder) -> Body:
    """decode_body with another decoder of the sections (daemon.accel's compiled one);
    the manifest, the checks against it and the error contract stay here."""
    try:
        data = bytes(data)
        raw_manifest, pos = _split_manifest(data)
        manifest = _parse_manifest(raw_manifest)
        batches, count, lo, hi = sections(data, pos)
        _check_manifest(manifest, count, lo, hi)
        return Body(manifest=manifest, batches=batches)
    except SegmentFormatError:
        raise
    except (
        struct.error,
        ValueError,
        TypeError,
        IndexError,
        OverflowError,
        MemoryError,
        RecursionError,
    ) as e:
        raise _fail(f"malformed body: {type(e).__name__}: {e}") from e


def event_section(data: bytes, pos: int, end: int) -> tuple[EventBatch, int]:
    """The event section data[pos:end] and its number of events."""
    eb = _decode_events(memoryview(data)[pos:end])
    return eb, len(eb.events)


def decode_sections(
    data: bytes, pos: int
) -> tuple[list[KafkaBatch | EventBatch], int, int | None, int | None]:
    """The sections from byte `pos` to the end of the body, with their record count and
    timestamp bounds (None without Kafka records)."""
    mv = memoryview(data)
    size = len(data)
    batches: list[KafkaBatch | EventBatch] = []
    count = 0
    lo: int | None = None
    hi: int | None = None
    while pos < size:
        if pos + _SECTION_S.size > size:
            raise _fail(f"section header at byte {pos} runs past the end of the body")
        kind, plen = _SECTION_S.unpack_from(mv, pos)
        pos += _SECTION_S.size
        end = pos + plen
        if end > size:
            raise _fail(f"section at byte {pos} ({plen} bytes) runs past the end of the body")
        if kind == SECTION_KAFKA_BATCH:
            kb, ts = _decode_kafka(data, pos, end)
            batches.append(kb)
            if ts:
                bmin, bmax = min(ts), max(ts)
                lo = bmin if lo is None else min(lo, bmin)
                hi = bmax if hi is None else max(hi, bmax)
                count += len(kb.records)
        elif kind == SECTION_EVENT_BATCH:
            eb, n = event_section(data, pos, end)
            batches.append(eb)
            count += n
        else:
            raise _fail(f"unknown section type {kind} at byte {pos - _SECTION_S.size}")
        pos = end
    return batches, count, lo, hi


def update_record_digest(
    h: Any, timestamp: int, key: bytes | None, value: bytes | None,
    headers: list[tuple[str, bytes | None]],
) -> None:
    """Feed one record into a running hash, canonically (drills compare log and target)."""

    def field_(b: bytes | None) -> None:
        h.update(struct.pack("<q", -1 if b is None else len(b)))
        if b:
            h.update(b)

    h.update(struct.pack("<qI", timestamp, len(headers)))
    field_(key)
    field_(value)
    for name, hv in headers:
        field_(name.encode())
        field_(hv)
