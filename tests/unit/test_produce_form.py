"""The produce form of a decoded segment (what the Kafka sink writes, decoded on its own
thread) against the records form: replay's filter keeps the same records either way,
and selecting records of a ProduceBatch keeps their source offsets."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from drstream.connectors.kafka.common import ORIGIN_HEADER, SOURCE_OFFSET_HEADER
from drstream.connectors.kafka.replay import TOPICS, KafkaFilter
from drstream.daemon.accel import decode_produce, produce_batch
from drstream.daemon.codec import Body, KafkaBatch, decode_body, encode_body
from drstream.daemon.plan import ReplayPlan
from drstream.daemon.records import ProduceBatch
from tests.unit.test_codec import bodies

TAIL = ((ORIGIN_HEADER, b"primary"),)
STREAM = "kafka:primary"


@settings(max_examples=300, deadline=None)
@given(bodies(), st.none() | st.integers(0, 2**63 - 1) | st.integers(0, 20),
       st.sampled_from([None, ".*", "", "[a-m].*"]))
def test_replay_filter_keeps_the_same_records_in_both_forms(
        body: Body, until: int | None, topics: str | None) -> None:
    data = encode_body(body)
    plan = ReplayPlan(stream=STREAM, until_ms=until, options={TOPICS: topics})
    by_records, by_columns = KafkaFilter(plan), KafkaFilter(plan)
    assert by_columns.produce_form
    kept = by_records(1, decode_body(data), 0)
    manifest, batches = decode_produce(data, TAIL, SOURCE_OFFSET_HEADER)
    kept_columns = by_columns(1, Body(manifest, batches), 0)
    assert kept_columns.batches == [produce_batch(b, TAIL, SOURCE_OFFSET_HEADER)
                                    for b in kept.batches if isinstance(b, KafkaBatch)]
    assert (by_columns.count, by_columns.bytes) == (by_records.count, by_records.bytes)
    assert kept_columns.manifest.record_count == kept.manifest.record_count


def test_a_drill_needs_the_records_form() -> None:
    assert not KafkaFilter(ReplayPlan(stream=STREAM, digests=True)).produce_form
    assert not KafkaFilter(ReplayPlan(stream=STREAM, until_ms=-5)).produce_form


def test_select_keeps_the_source_offset_of_the_last_record_kept() -> None:
    b = ProduceBatch(STREAM, "t", 0, 12, [5, 9, 7], [b"a", b"b", b"c"], [None, b"y", b"z"],
                     [[(SOURCE_OFFSET_HEADER, b"%d" % o)] for o in (10, 11, 12)])
    assert b.select([0, 2], SOURCE_OFFSET_HEADER).last_offset == 12
    picked = b.select([0, 1], SOURCE_OFFSET_HEADER)
    assert (picked.last_offset, picked.keys, picked.timestamps) == (11, [b"a", b"b"], [5, 9])
    assert b.select([], SOURCE_OFFSET_HEADER).last_offset is None
