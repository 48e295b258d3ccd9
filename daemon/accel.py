"""The compiled body decoder (daemon/_ccodec.c) behind the pure-Python codec's interface.

daemon/codec.py is the reference and the fallback: the compiled decoder reads the same
bytes into equal objects and raises the same SegmentFormatError, with the same message,
for every defect (tests/unit/test_accel.py, on generated and on corrupted bodies). It is
built by `pip install` where a C compiler is present (setup.py, an optional extension);
without it, or with DRSTREAM_NO_ACCEL=1 in the environment, the same functions run the
pure-Python code. benchmarks/codec.py measures both.

Two forms of a decoded body:
- decode_body: the Body that codec.decode_body returns (KafkaBatch of KafkaRecord);
- decode_produce: per Kafka batch only what Producer.produce() takes, column by column
  (ProduceBatch): no record object, each record's header list already ending with the
  headers the sink adds (its origin, the source offset), timestamps >= 0.
"""

from __future__ import annotations

import os
from typing import Any, Final, cast

from drstream.daemon.codec import decode_body as decode_body_py
from drstream.daemon.codec import decode_body_with, event_section
from drstream.daemon.errors import SegmentFormatError
from drstream.daemon.records import (
    Body,
    EventBatch,
    Header,
    KafkaBatch,
    KafkaRecord,
    Manifest,
    ProduceBatch,
)

__all__ = ["COMPILED", "NO_ACCEL_ENV", "ProduceBatch", "decode_body", "decode_produce",
           "produce_batch"]

NO_ACCEL_ENV: Final = "DRSTREAM_NO_ACCEL"


def _load() -> Any:
    if os.environ.get(NO_ACCEL_ENV, "") not in ("", "0"):
        return None
    try:
        from drstream.daemon import _ccodec
    except ImportError:  # not built: no compiler where it was installed
        return None
    _ccodec.configure(KafkaRecord, KafkaBatch, ProduceBatch, SegmentFormatError)
    return _ccodec


_ccodec = _load()
#: True when the compiled decoder is in use.
COMPILED: Final = _ccodec is not None


def _sections(data: bytes, pos: int) -> Any:
    return _ccodec.decode_sections(data, pos, event_section)


def decode_body(data: bytes) -> Body:
    """codec.decode_body, compiled where available."""
    if _ccodec is None:
        return decode_body_py(data)
    return decode_body_with(data, _sections)


def produce_batch(b: KafkaBatch, tail: tuple[Header, ...],
                  offset_header: str | None) -> ProduceBatch:
    """A decoded KafkaBatch as produce() arguments (the reference of the compiled form)."""
    recs = b.records

    def headers(r: KafkaRecord) -> list[Header]:
        out = [*r.headers, *tail]
        if offset_header is not None:
            out.append((offset_header, b"%d" % r.offset))
        return out

    return ProduceBatch(
        b.stream, b.topic, b.partition, recs[-1].offset if recs else None,
        [r.timestamp if r.timestamp >= 0 else 0 for r in recs],
        [r.key for r in recs], [r.value for r in recs], [headers(r) for r in recs],
    )


def decode_produce(data: bytes, tail: tuple[Header, ...] = (),
                   offset_header: str | None = None
                   ) -> tuple[Manifest, list[ProduceBatch | EventBatch]]:
    """The manifest and the batches of a body, each Kafka batch as produce() arguments:
    every record's header list ends with `tail` and, unless offset_header is None,
    (offset_header, b"<source offset>"). Errors: exactly decode_body's."""
    if _ccodec is None:
        body = decode_body_py(data)
        return body.manifest, [produce_batch(b, tail, offset_header)
                               if isinstance(b, KafkaBatch) else cast(EventBatch, b)
                               for b in body.batches]

    def sections(raw: bytes, pos: int) -> Any:
        return _ccodec.decode_produce(raw, pos, event_section, tail, offset_header)

    body = decode_body_with(data, sections)
    return body.manifest, cast("list[ProduceBatch | EventBatch]", body.batches)
