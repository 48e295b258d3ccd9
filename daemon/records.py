"""The data types a segment carries, in one place: the clear header, the manifest, the
body's batches and records, and a sink's checkpoint of what it applied.

Their bytes: docs/format.md (daemon/segment.py encodes the container, daemon/codec.py the
body). Types only: no I/O, no encoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

ManifestKind = Literal["data", "heartbeat"]


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    log_id: str
    seq: int
    created_at_ms: int
    key_id: str
    salt: bytes
    nonce: bytes
    prev_digest: bytes
    body_len: int  # ciphertext length including the 16-byte GCM tag


@dataclass(slots=True)
class KafkaRecord:
    """One Kafka record as consumed: every field needed to reproduce it on another cluster."""

    offset: int
    timestamp: int  # milliseconds since the epoch; -1 when timestamp_type is 0
    timestamp_type: int  # 0 none, 1 CreateTime, 2 LogAppendTime (confluent_kafka values)
    key: bytes | None
    value: bytes | None  # None is a tombstone
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)


@dataclass(slots=True)
class KafkaBatch:
    """Consecutive records of one partition, in offset order, from one source stream."""

    stream: str  # e.g. "kafka:primary"
    topic: str
    partition: int
    records: list[KafkaRecord]


@dataclass(slots=True)
class KafkaColumns:
    """Consecutive records of one partition, column by column: what ship takes from the
    consumer without an object per record. Encodes to the bytes of the KafkaBatch of the
    same records (decoding gives that KafkaBatch). A record without headers may have an
    empty tuple in `headers`."""

    stream: str
    topic: str
    partition: int
    offsets: list[int] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)
    timestamp_types: list[int] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)
    headers: list[Sequence[tuple[str, bytes | None]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets)

    def extend(self, other: KafkaColumns) -> None:
        """Append the records of `other` (the same partition, later offsets)."""
        self.offsets += other.offsets
        self.timestamps += other.timestamps
        self.timestamp_types += other.timestamp_types
        self.keys += other.keys
        self.values += other.values
        self.headers += other.headers

    @classmethod
    def of(cls, b: KafkaBatch) -> KafkaColumns:
        recs = b.records
        return cls(b.stream, b.topic, b.partition, [r.offset for r in recs],
                   [r.timestamp for r in recs], [r.timestamp_type for r in recs],
                   [r.key for r in recs], [r.value for r in recs], [r.headers for r in recs])

    def batch(self) -> KafkaBatch:
        """The same records as a KafkaBatch (what decoding the encoded columns gives)."""
        return KafkaBatch(self.stream, self.topic, self.partition, [
            KafkaRecord(o, t, tt, k, v, list(h)) for o, t, tt, k, v, h in zip(
                self.offsets, self.timestamps, self.timestamp_types, self.keys, self.values,
                self.headers, strict=True)])


@dataclass(slots=True)
class EventBatch:
    """Registry events (small typed JSON documents: str keys, JSON-native values)."""

    stream: str  # e.g. "mlflow:primary"
    events: list[dict[str, Any]]


Header = tuple[str, bytes | None]


@dataclass(slots=True)
class ProduceBatch:
    """The records of one Kafka batch as produce() arguments, one list per argument."""

    stream: str
    topic: str
    partition: int
    last_offset: int | None  # source offset of the last record; None for an empty batch
    timestamps: list[int]  # produce(timestamp=): CreateTime, or 0 where the record had none
    keys: list[bytes | None]
    values: list[bytes | None]
    headers: list[list[Header]]  # the record's headers, then tail, then the offset header

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, keep: list[int], offset_header: str | None) -> ProduceBatch:
        """The records at the indexes `keep` (in order); the last one's source offset is
        read from its offset header (the last header) when there is one."""
        last = self.last_offset if keep and keep[-1] == len(self) - 1 else None
        if keep and last is None and offset_header is not None:
            name, value = self.headers[keep[-1]][-1]
            last = int(value) if name == offset_header and value is not None else None
        return ProduceBatch(self.stream, self.topic, self.partition, last,
                            [self.timestamps[i] for i in keep], [self.keys[i] for i in keep],
                            [self.values[i] for i in keep], [self.headers[i] for i in keep])


# Decoded bodies hold KafkaBatch (or, decoded for a Kafka sink, ProduceBatch) and
# EventBatch; ship encodes KafkaColumns.
Batch = KafkaBatch | KafkaColumns | ProduceBatch | EventBatch


@dataclass(slots=True)
class Manifest:
    """What a segment says about the whole shipper: read first, without decoding records.

    positions: the FULL position map of every stream the shipper tracks (not only the
    streams present in this segment), e.g. {"kafka:primary": {"orders": {"0": 124}}}.
    record_count: Kafka records plus events in the body.
    min/max_timestamp_ms: bounds of the record timestamps (None when there are none).
    """

    positions: dict[str, Any]
    record_count: int = 0
    min_timestamp_ms: int | None = None
    max_timestamp_ms: int | None = None
    kind: ManifestKind = "data"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Body:
    manifest: Manifest
    batches: Sequence[Batch] = field(default_factory=list)


@dataclass
class Checkpoint:
    seq: int = 0  # last applied segment (0: nothing yet)
    digest: bytes = b""  # SHA-256 of that segment, so a rewritten log is noticed
    created_at_ms: int = 0  # that segment's write time
    max_record_ms: int | None = None  # newest record timestamp applied so far
    positions: dict[str, Any] = field(default_factory=dict)  # the segment's manifest positions
    offsets: dict[str, Any] = field(default_factory=dict)  # sink-specific (Kafka: src->tgt)


@dataclass
class AppliedSegment:
    """A checked, decoded segment on its way to the sinks."""

    seq: int
    digest: bytes
    created_at_ms: int
    body: Body
    nbytes: int  # stored size


@dataclass
class SealedSegment:
    """A fetched segment still as stored (encrypted, chain link unchecked), queued to be
    opened straight into a sink's produce() form (daemon/sink.py, produce_form)."""

    seq: int
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)

