"""Body codec: round trips of arbitrary content, the exact byte layout, strict decoding
(each decode checked against the compiled decoder, see tests/unit/both_decoders.py)."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drstream.daemon.codec import (
    SECTION_EVENT_BATCH,
    SECTION_KAFKA_BATCH,
    Body,
    EventBatch,
    KafkaBatch,
    KafkaRecord,
    Manifest,
    decode_manifest,
    encode_body,
    make_manifest,
)
from drstream.daemon.errors import SegmentFormatError

# Every decode here also runs the compiled decoder and requires the same result or error.
from tests.unit.both_decoders import decode_body

I64 = st.integers(-(2**63), 2**63 - 1)
SIZES = st.one_of(st.binary(max_size=40), st.binary(min_size=200, max_size=3000))
OPT_BYTES = st.none() | SIZES
HEADER_KEY = st.sampled_from(["", "a", "a", "trace-id", "ünï", "😀", "content-type"]) | st.text()
HEADERS = st.lists(st.tuples(HEADER_KEY, st.none() | st.binary(max_size=30)), max_size=5)
RECORD = st.builds(
    KafkaRecord,
    offset=I64,
    timestamp=I64,
    timestamp_type=st.integers(0, 2),
    key=OPT_BYTES,
    value=OPT_BYTES,
    headers=HEADERS,
)
KAFKA_BATCH = st.builds(
    KafkaBatch,
    stream=st.sampled_from(["kafka:primary", "kafka:other"]) | st.text(max_size=20),
    topic=st.text(max_size=30),
    partition=st.integers(-(2**31), 2**31 - 1),
    records=st.lists(RECORD, max_size=12),
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
JSON_OBJECT = st.dictionaries(st.text(max_size=10), JSON, max_size=5)
EVENT_BATCH = st.builds(
    EventBatch,
    stream=st.text(max_size=20),
    events=st.lists(JSON_OBJECT, max_size=4),
)
BATCHES = st.lists(KAFKA_BATCH | EVENT_BATCH, max_size=4)


@st.composite
def bodies(draw: st.DrawFn) -> Body:
    batches = draw(BATCHES)
    positions = draw(JSON_OBJECT)
    extra = draw(JSON_OBJECT)
    manifest = make_manifest(positions, batches, extra=extra)
    if manifest.min_timestamp_ms is not None and manifest.max_timestamp_ms is not None:
        # The manifest may widen the bounds (e.g. to cover event times), never narrow them.
        manifest.min_timestamp_ms -= draw(st.integers(0, 10))
        manifest.max_timestamp_ms += draw(st.integers(0, 10))
        manifest.min_timestamp_ms = max(manifest.min_timestamp_ms, -(2**63))
        manifest.max_timestamp_ms = min(manifest.max_timestamp_ms, 2**63 - 1)
    return Body(manifest=manifest, batches=batches)


def simple_body() -> Body:
    records = [
        KafkaRecord(10, 1_700_000_000_000, 1, b"k1", b"v1", [("h", b"x"), ("h", None)]),
        KafkaRecord(11, 1_700_000_000_005, 2, None, None, []),
        KafkaRecord(12, -1, 0, b"", b"", [("ü", b"")]),
    ]
    batches: list[KafkaBatch | EventBatch] = [
        KafkaBatch("kafka:primary", "orders", 3, records),
        EventBatch("mlflow:primary", [{"type": "model_created", "name": "m"}]),
    ]
    positions = {"kafka:primary": {"orders": {"3": 13}}, "mlflow:primary": {"cursor": 5}}
    return Body(make_manifest(positions, batches, extra={"groups": {}}), batches)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies())
def test_round_trip(body: Body) -> None:
    data = encode_body(body)
    assert decode_body(data) == body
    assert decode_manifest(data) == body.manifest


def test_round_trip_simple_and_types() -> None:
    body = simple_body()
    out = decode_body(encode_body(body))
    assert out == body
    kb = out.batches[0]
    assert isinstance(kb, KafkaBatch)
    assert kb.records[1].key is None and kb.records[1].value is None
    assert kb.records[2].key == b"" and kb.records[2].value == b""
    assert kb.records[0].headers == [("h", b"x"), ("h", None)]
    assert all(type(r.key) in (bytes, type(None)) for r in kb.records)
    assert out.manifest.record_count == 4
    assert (out.manifest.min_timestamp_ms, out.manifest.max_timestamp_ms) == (
        -1,
        1_700_000_000_005,
    )


def test_heartbeat_body() -> None:
    body = Body(make_manifest({"kafka:primary": {"t": {"0": 5}}}, []))
    assert body.manifest.kind == "heartbeat"
    assert body.manifest.min_timestamp_ms is None
    assert decode_body(encode_body(body)) == body


def test_exact_layout_little_endian() -> None:
    """Pin the byte layout documented in docs/format.md (little-endian columns)."""
    rec = KafkaRecord(5, 258, 1, b"K", None, [("h", b"V")])
    batch = KafkaBatch("s", "t", 2, [rec])
    manifest = make_manifest({}, [batch])
    data = encode_body(Body(manifest, [batch]))
    (mlen,) = struct.unpack_from("<I", data, 0)
    doc = json.loads(data[4 : 4 + mlen])
    assert list(doc) == [
        "kind",
        "record_count",
        "min_timestamp_ms",
        "max_timestamp_ms",
        "positions",
        "extra",
    ]
    assert doc["record_count"] == 1 and doc["min_timestamp_ms"] == 258
    section = data[4 + mlen :]
    expected_payload = b"".join(
        [
            b"\x01\x00s",  # stream: u16 length + UTF-8
            b"\x01\x00t",  # topic
            struct.pack("<iII", 2, 1, 1),  # partition, records, headers
            struct.pack("<q", 5),  # offsets
            struct.pack("<q", 258),  # timestamps
            struct.pack("<i", 1),  # key lengths
            struct.pack("<i", -1),  # value lengths (-1 = null)
            struct.pack("<I", 1),  # header counts
            struct.pack("<I", 1),  # header key lengths
            struct.pack("<i", 1),  # header value lengths
            b"\x01",  # timestamp types
            b"K",  # keys, then values (none), header keys, header values
            b"h",
            b"V",
        ]
    )
    assert section == struct.pack("<BQ", SECTION_KAFKA_BATCH, len(expected_payload)) + (
        expected_payload
    )


def test_event_section_layout() -> None:
    batch = EventBatch("mlflow:primary", [{"a": 1}])
    data = encode_body(Body(make_manifest({}, [batch]), [batch]))
    (mlen,) = struct.unpack_from("<I", data, 0)
    kind, plen = struct.unpack_from("<BQ", data, 4 + mlen)
    assert kind == SECTION_EVENT_BATCH
    payload = data[4 + mlen + 9 :]
    assert len(payload) == plen
    assert json.loads(payload) == {"stream": "mlflow:primary", "events": [{"a": 1}]}


# --------------------------------------------------------------------------- strictness


def _body_bytes() -> bytes:
    return encode_body(simple_body())


def _section_start(data: bytes) -> int:
    (mlen,) = struct.unpack_from("<I", data, 0)
    return 4 + mlen


def test_every_truncation_is_a_format_error() -> None:
    data = _body_bytes()
    # Including the cut exactly between manifest and sections: refused because the
    # manifest counts records that are not there.
    for n in range(len(data)):
        with pytest.raises(SegmentFormatError):
            decode_body(data[:n])


def test_trailing_bytes_are_a_format_error() -> None:
    data = _body_bytes()
    for extra in (b"\x00", b"\x01", b"\x01" + bytes(8), b"\x02" + bytes(8)):
        with pytest.raises(SegmentFormatError):
            decode_body(data + extra)


def test_unknown_section_type() -> None:
    body = Body(make_manifest({}, []))
    data = encode_body(body) + struct.pack("<BQ", 9, 0)
    with pytest.raises(SegmentFormatError, match="unknown section type 9"):
        decode_body(data)


def test_section_length_past_end() -> None:
    data = bytearray(_body_bytes())
    start = _section_start(bytes(data))
    struct.pack_into("<Q", data, start + 1, 2**40)
    with pytest.raises(SegmentFormatError, match="runs past the end"):
        decode_body(bytes(data))


def test_manifest_length_past_end() -> None:
    data = bytearray(_body_bytes())
    struct.pack_into("<I", data, 0, len(data))
    with pytest.raises(SegmentFormatError, match="manifest length"):
        decode_body(bytes(data))
    with pytest.raises(SegmentFormatError):
        decode_manifest(bytes(data))


def _kafka_body(rec: KafkaRecord) -> tuple[bytearray, int]:
    batch = KafkaBatch("s", "t", 0, [rec])
    data = bytearray(encode_body(Body(make_manifest({}, [batch]), [batch])))
    # payload starts after the section header; columns after "s", "t" and <iII>
    return data, _section_start(bytes(data)) + 9 + 3 + 3 + 12


def test_column_lengths_must_match_the_blob() -> None:
    data, cols = _kafka_body(KafkaRecord(1, 2, 1, b"key", b"value", []))
    key_len_at = cols + 16
    for bad in (-2, 2, 4, 2**31 - 1):
        broken = bytearray(data)
        struct.pack_into("<i", broken, key_len_at, bad)
        with pytest.raises(SegmentFormatError):
            decode_body(bytes(broken))


def test_compensating_negative_length_is_refused() -> None:
    data, cols = _kafka_body(KafkaRecord(1, 2, 1, b"key", b"value", []))
    broken = bytearray(data)
    struct.pack_into("<i", broken, cols + 16, -5)  # key: -5
    struct.pack_into("<i", broken, cols + 20, 5 + 3 + 5)  # value takes all the bytes
    with pytest.raises(SegmentFormatError, match="negative length"):
        decode_body(bytes(broken))


def test_timestamp_type_out_of_range() -> None:
    data, cols = _kafka_body(KafkaRecord(1, 2, 1, b"k", b"v", []))
    broken = bytearray(data)
    broken[cols + 8 + 8 + 4 + 4 + 4] = 3
    with pytest.raises(SegmentFormatError, match="timestamp type"):
        decode_body(bytes(broken))


def test_header_counts_must_sum() -> None:
    data, cols = _kafka_body(KafkaRecord(1, 2, 1, b"k", b"v", [("a", b"b")]))
    broken = bytearray(data)
    struct.pack_into("<I", broken, cols + 24, 2)
    with pytest.raises(SegmentFormatError, match="header counts"):
        decode_body(bytes(broken))


def test_invalid_utf8_header_key() -> None:
    data, _ = _kafka_body(KafkaRecord(1, 2, 1, b"k", b"v", [("\u00e9", b"b")]))
    i = bytes(data).rindex("\u00e9".encode())
    data[i] = 0xFF
    with pytest.raises(SegmentFormatError, match="UTF-8"):
        decode_body(bytes(data))


def test_manifest_must_match_records() -> None:
    body = simple_body()
    data = encode_body(body)
    start = _section_start(data)
    for change in (
        {"record_count": 3},
        {"record_count": -1},
        {"record_count": True},
        {"min_timestamp_ms": 0},
        {"max_timestamp_ms": None},
        {"kind": "heartbeat"},
        {"kind": "other"},
        {"positions": []},
        {"unknown": 1},
    ):
        doc = json.loads(data[4:start])
        doc.update(change)
        raw = json.dumps(doc).encode()
        with pytest.raises(SegmentFormatError):
            decode_body(struct.pack("<I", len(raw)) + raw + data[start:])


@pytest.mark.parametrize(
    "raw",
    [b"[]", b"{", b"\xff", b'{"kind": NaN}', b"[" * 100_000 + b"]" * 100_000],
)
def test_bad_manifest_json(raw: bytes) -> None:
    with pytest.raises(SegmentFormatError):
        decode_body(struct.pack("<I", len(raw)) + raw)
    with pytest.raises(SegmentFormatError):
        decode_manifest(struct.pack("<I", len(raw)) + raw)


@pytest.mark.parametrize(
    "doc",
    [
        {"stream": "s"},
        {"stream": 1, "events": []},
        {"stream": "s", "events": [1]},
        {"stream": "s", "events": {}},
        [],
    ],
)
def test_bad_event_sections(doc: Any) -> None:
    raw = json.dumps(doc).encode()
    base = encode_body(Body(make_manifest({}, [EventBatch("s", [])]), [EventBatch("s", [])]))
    start = _section_start(base)
    data = base[:start] + struct.pack("<BQ", SECTION_EVENT_BATCH, len(raw)) + raw
    with pytest.raises(SegmentFormatError):
        decode_body(data)


# --------------------------------------------------------------------------- encode errors


def _encode_one(rec: KafkaRecord) -> bytes:
    batch = KafkaBatch("s", "t", 0, [rec])
    return encode_body(Body(make_manifest({}, [batch]), [batch]))


@pytest.mark.parametrize(
    "rec",
    [
        KafkaRecord(2**63, 0, 1, None, None, []),
        KafkaRecord(0, -(2**63) - 1, 1, None, None, []),
        KafkaRecord(0, 0, 3, None, None, []),
        KafkaRecord(0, 0, -1, None, None, []),
        KafkaRecord(0, 0, 1, "str key", None, []),  # type: ignore[arg-type]
        KafkaRecord(0, 0, 1, None, 5, []),  # type: ignore[arg-type]
        KafkaRecord(0, 0, 1, None, None, [("\ud800", b"")]),
        KafkaRecord(0, 0, 1, None, None, [(b"bytes key", b"")]),  # type: ignore[list-item]
        KafkaRecord(0, 0, 1, None, None, [("k", "str value")]),  # type: ignore[list-item]
        KafkaRecord(0, 0, 1, None, None, [("k", b"v", b"x")]),  # type: ignore[list-item]
    ],
)
def test_unencodable_records(rec: KafkaRecord) -> None:
    with pytest.raises(SegmentFormatError):
        _encode_one(rec)


def test_unencodable_batches_and_manifests() -> None:
    rec = KafkaRecord(0, 5, 1, None, None, [])
    kb = KafkaBatch("s", "t", 0, [rec])
    good = make_manifest({}, [kb])
    bad_manifests = [
        Manifest({}, record_count=2, min_timestamp_ms=5, max_timestamp_ms=5),
        Manifest({}, record_count=1, min_timestamp_ms=6, max_timestamp_ms=6),
        Manifest({}, record_count=1, min_timestamp_ms=None, max_timestamp_ms=None),
        Manifest({}, record_count=1, min_timestamp_ms=5, max_timestamp_ms=None),
        Manifest({}, record_count=1, min_timestamp_ms=5, max_timestamp_ms=5, kind="heartbeat"),
        Manifest({}, record_count=1, min_timestamp_ms=5, max_timestamp_ms=5, kind="x"),  # type: ignore[arg-type]
        Manifest({"p": float("nan")}, 1, 5, 5),
        Manifest({"p": object()}, 1, 5, 5),
    ]
    for m in bad_manifests:
        with pytest.raises(SegmentFormatError):
            encode_body(Body(m, [kb]))
    with pytest.raises(SegmentFormatError):
        encode_body(Body(good, [KafkaBatch("s", "t", 2**31, [rec])]))
    with pytest.raises(SegmentFormatError):
        encode_body(Body(good, [KafkaBatch("s" * 70_000, "t", 0, [rec])]))
    eb = EventBatch("s", [1])  # type: ignore[list-item]
    with pytest.raises(SegmentFormatError):
        encode_body(Body(Manifest({}, 1), [eb]))
    with pytest.raises(SegmentFormatError):
        encode_body(Body(Manifest({}, 0), ["not a batch"]))  # type: ignore[list-item]
    with pytest.raises(SegmentFormatError):
        encode_body(Body(Manifest({}, 0, 1, 2), []))


def test_many_records_with_nulls_round_trip() -> None:
    records = [
        KafkaRecord(
            i,
            i * 7,
            1,
            None if i % 3 == 0 else b"k%d" % i,
            None if i % 5 == 0 else b"v" * (i % 17),
            [("a", None), ("a", b"%d" % i)] if i % 2 else [],
        )
        for i in range(2000)
    ]
    batch = KafkaBatch("kafka:primary", "t", 0, records)
    body = Body(make_manifest({}, [batch]), [batch])
    assert decode_body(encode_body(body)) == body
