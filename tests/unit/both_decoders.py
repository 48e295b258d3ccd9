"""Both body decoders on every input: the pure-Python reference (daemon/codec.py) and the
compiled one (daemon/_ccodec.c). They must agree: equal results, or the same exception
class, message and cause class. The codec and fuzz tests decode through `decode_body`
here, so each of their inputs, valid or corrupted, is a comparison of the two."""

from __future__ import annotations

from typing import Any

from drstream.daemon.accel import ProduceBatch, produce_batch
from drstream.daemon.codec import (
    Body,
    EventBatch,
    KafkaBatch,
    KafkaRecord,
    decode_body_with,
    event_section,
)
from drstream.daemon.codec import decode_body as reference
from drstream.daemon.errors import SegmentFormatError

try:
    from drstream.daemon import _ccodec
except ImportError as e:  # the tests need it; the product falls back (test_accel.py)
    raise ImportError(
        "the compiled decoder daemon._ccodec is not built: install a C compiler and "
        "Python headers, then `make install`"
    ) from e

# The sink's headers as produce() gets them (connectors/kafka/common.py names).
TAIL = (("drstream.origin", b"primary"),)
OFFSET_HEADER = "drstream.offset"

_ccodec.configure(KafkaRecord, KafkaBatch, ProduceBatch, SegmentFormatError)


def compiled(data: bytes) -> Body:
    return decode_body_with(data, lambda raw, pos: _ccodec.decode_sections(
        raw, pos, event_section))


def compiled_produce(data: bytes, tail: tuple[tuple[str, bytes | None], ...] = TAIL,
                     offset_header: str | None = OFFSET_HEADER) -> list[Any]:
    return decode_body_with(data, lambda raw, pos: _ccodec.decode_produce(
        raw, pos, event_section, tail, offset_header)).batches


def reference_produce(body: Body, tail: tuple[tuple[str, bytes | None], ...] = TAIL,
                      offset_header: str | None = OFFSET_HEADER) -> list[Any]:
    return [produce_batch(b, tail, offset_header) if isinstance(b, KafkaBatch) else b
            for b in body.batches]


def outcome(fn: Any, data: bytes) -> tuple[Any, ...]:
    """("ok", result) or ("error", class, message, class of the cause)."""
    try:
        return "ok", fn(data)
    except Exception as e:  # compared, never swallowed: the caller asserts equality
        return "error", type(e), str(e), type(e.__cause__)


def decode_body(data: bytes) -> Body:
    """The reference's result or error, once the compiled decoder was shown to agree in
    both of its forms (records, and produce() arguments)."""
    ref = outcome(reference, data)
    assert outcome(compiled, data) == ref, "compiled decoder disagrees with the reference"
    produce = outcome(compiled_produce, data)
    expected = ref if ref[0] == "error" else ("ok", reference_produce(ref[1]))
    assert produce == expected, "compiled produce form disagrees with the reference"
    return reference(data)  # raises the reference's own error


__all__ = ["OFFSET_HEADER", "TAIL", "EventBatch", "compiled", "compiled_produce",
           "decode_body", "outcome", "reference", "reference_produce"]
