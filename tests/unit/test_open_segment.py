"""The ship pipeline's open segment: records and registry events gathered for one segment."""

from __future__ import annotations

from drstream.daemon.codec import EventBatch, KafkaBatch, KafkaRecord, make_manifest
from drstream.daemon.pipeline import OpenSegment, gate_group_offsets
from drstream.daemon.source import Delivery


def rec(offset: int, ts: int) -> KafkaRecord:
    return KafkaRecord(offset=offset, timestamp=ts, timestamp_type=1, key=b"k", value=b"v")


def test_events_are_kept_in_order_per_stream_and_counted() -> None:
    seg = OpenSegment()
    seg.add(0, "mlflow:primary", Delivery([], {"state_blob": "a"},
                                          events=[EventBatch("mlflow:primary", [{"n": 1}])]))
    seg.add(0, "mlflow:primary", Delivery([], {"state_blob": "b"},
                                          events=[EventBatch("mlflow:primary", [{"n": 2}])]))
    seg.add(1, "kafka:primary", Delivery([KafkaBatch("kafka:primary", "t", 0, [rec(5, 100)])],
                                         {"t": {"0": 6}}, nbytes=10))
    assert seg.records == 3
    assert seg.first_at is not None
    assert [e["n"] for e in seg.events["mlflow:primary"].events] == [1, 2]
    manifest = make_manifest({}, [*seg.batches.values(), *seg.events.values()])
    assert manifest.record_count == 3
    assert manifest.min_timestamp_ms == 100


def test_positions_only_delivery_does_not_open_a_segment() -> None:
    seg = OpenSegment()
    seg.add(0, "mlflow:primary", Delivery([], {"state_blob": "a"}))
    assert seg.records == 0 and seg.first_at is None


def test_group_offsets_wait_for_the_records_below_them() -> None:
    ready, waiting = gate_group_offsets({"g": {"t": {"0": 5, "1": 9}}}, {"t": {"0": 5, "1": 8}})
    assert ready == {"g": {"t": {"0": 5}}}
    assert waiting == {"g": {"t": {"1": 9}}}
