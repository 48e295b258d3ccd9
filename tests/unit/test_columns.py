"""The columnar ship path writes the bytes the record path writes.

KafkaColumns (what ship builds from consumed messages, column by column) must encode to
exactly the bytes of the KafkaBatch of the same records, and message_columns must turn any
consumed message list (several partitions, interleaved, errors, replicated records,
records without headers) into the records the per-record path kept, in the same order.
"""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drstream.connectors.kafka.common import ORIGIN_HEADER
from drstream.connectors.kafka.source import RECORD_OVERHEAD_BYTES, message_columns
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
from drstream.daemon.errors import SegmentFormatError
from drstream.daemon.pipeline import OpenSegment
from drstream.daemon.source import Delivery
from tests.unit.test_codec import EVENT_BATCH, KAFKA_BATCH, RECORD

PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
SKIP = ("dc-b",)  # origins whose records a source leaves out (skip_origins)


def body_of(batches: list[Any]) -> Body:
    manifest = make_manifest({"kafka:primary": {"t": {"0": 1}}}, batches, extra={"x": 1})
    return Body(manifest, batches)


@PROPERTY
@given(st.lists(KAFKA_BATCH | EVENT_BATCH, max_size=4), st.data())
def test_columns_encode_to_the_record_bytes(batches: list[Any], data: st.DataObject) -> None:
    columns = []
    for b in batches:
        if isinstance(b, KafkaBatch):
            c = KafkaColumns.of(b)
            # a record without headers may come as an empty tuple, as the source gives it
            c.headers = [h if h or not data.draw(st.booleans()) else () for h in c.headers]
            columns.append(c)
        else:
            columns.append(b)
    reference = encode_body(body_of(batches))
    assert encode_body(body_of(columns)) == reference
    assert decode_body(reference).batches == [
        c.batch() if isinstance(c, KafkaColumns) else c for c in columns]


def test_columns_refuse_what_records_refuse() -> None:
    for bad in (KafkaColumns("s", "t", 0, [0], [0], [3], [None], [None], [()]),
                KafkaColumns("s", "t", 0, [0], [0], [1], ["str"], [None], [()]),
                KafkaColumns("s", "t", 0, [0], [0], [1], [None], [None], [[("k", "v")]]),
                KafkaColumns("s", "t", 0, [0, 1], [0], [1], [None], [None], [()])):
        with pytest.raises(SegmentFormatError):
            encode_body(Body(make_manifest({}, [bad]), [bad]))


# --------------------------------------------------------------------------- messages


@st.composite
def consumed(draw: st.DrawFn) -> list[Any]:
    """A list as Consumer.consume returns it: runs of partitions (a partition may come
    back later), rare error messages, some records replicated from another cluster."""
    msgs: list[Any] = []
    next_offset: dict[tuple[str, int], int] = {}
    for _ in range(draw(st.integers(0, 6))):
        tp = (draw(st.sampled_from(["a", "b"])), draw(st.integers(0, 2)))
        for rec in draw(st.lists(RECORD, max_size=8)):
            kind = draw(st.sampled_from(["plain"] * 8 + ["none", "error", "origin"]))
            offset = next_offset.get(tp, 0)
            if kind == "error":
                msgs.append(Message(error=KafkaError(KafkaError._TRANSPORT)))
                continue
            headers: Any = rec.headers
            if kind == "none":
                headers = None
            elif kind == "origin":
                origin = draw(st.sampled_from([*SKIP, "dc-c"])).encode()
                headers = [*rec.headers, (ORIGIN_HEADER, origin)]
            msgs.append(Message(topic=tp[0], partition=tp[1], offset=offset, key=rec.key,
                                value=rec.value, headers=headers,
                                timestamp=(rec.timestamp_type, rec.timestamp)))
            next_offset[tp] = offset + 1
    return msgs


def per_record(msgs: list[Any]) -> tuple[list[KafkaBatch], int]:
    """The records the per-record source path kept (its logic before the columnar one)."""
    runs: dict[tuple[str, int], list[KafkaRecord]] = {}
    nbytes = 0
    for m in msgs:
        if m.error() is not None:
            continue
        headers = m.headers() or []
        if replicated(headers):
            continue
        ts_type, ts = m.timestamp()
        rec = KafkaRecord(m.offset(), ts, ts_type, m.key(), m.value(), headers)
        runs.setdefault((m.topic(), m.partition()), []).append(rec)
        nbytes += RECORD_OVERHEAD_BYTES + len(m.key() or b"") + len(m.value() or b"")
    return [KafkaBatch("kafka:primary", t, p, r) for (t, p), r in runs.items()], nbytes


def replicated(headers: list[tuple[str, bytes | None]]) -> bool:
    """KafkaSource._replicated with skip_origins = SKIP: the first origin header decides,
    and a value that is not UTF-8 is compared as decoded with replacement characters."""
    origins = [v for k, v in headers if k == ORIGIN_HEADER]
    return bool(origins) and (origins[0] or b"").decode(errors="replace") in SKIP


def keep(m: Any) -> bool:
    """The source's filter (KafkaSource._keep with skip_origins = SKIP)."""
    return m.error() is None and not replicated(m.headers() or [])


@PROPERTY
@given(consumed())
def test_messages_become_the_records_the_per_record_path_kept(msgs: list[Any]) -> None:
    expected, expected_bytes = per_record(msgs)
    columns, nbytes = message_columns("kafka:primary", msgs, keep)
    assert [c.batch() for c in columns] == expected
    assert nbytes == expected_bytes
    if expected:
        assert encode_body(body_of(columns)) == encode_body(body_of(expected))


@settings(PROPERTY, max_examples=150)
@given(st.lists(consumed(), min_size=1, max_size=4))
def test_open_segment_of_columns_writes_the_record_bytes(deliveries: list[list[Any]]) -> None:
    """Several deliveries merged in the open segment, as ship cuts them."""
    seg = OpenSegment()
    merged: dict[tuple[str, int], list[KafkaRecord]] = {}
    firsts = []  # the open segment's age: the first record of each delivered batch
    for msgs in deliveries:
        columns, nbytes = message_columns("kafka:primary", msgs, keep)
        seg.add(0, "kafka:primary", Delivery(columns, {}, nbytes=nbytes))
        for b in per_record(msgs)[0]:
            merged.setdefault((b.topic, b.partition), []).extend(b.records)
            firsts.append(b.records[0].timestamp)
    expected = [KafkaBatch("kafka:primary", t, p, r) for (t, p), r in merged.items()]
    assert seg.records == sum(map(len, merged.values()))
    if expected:
        got = list(seg.batches.values())
        assert encode_body(body_of(got)) == encode_body(body_of(expected))
        assert seg.min_ts == min(firsts)


def test_events_pass_through_unchanged() -> None:
    batches: list[Any] = [EventBatch("mlflow:primary", [{"type": "model.deleted", "name": "m"}])]
    assert decode_body(encode_body(body_of(batches))).batches == batches
