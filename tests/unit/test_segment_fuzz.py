"""Fuzz-style properties: hostile bytes reach the parsers and only project errors escape.

Three layers are attacked:
- parse_header / decode_segment / read_manifest with arbitrary bytes and with mutated
  valid segments (these mostly stop at the header or at GCM);
- decode_body / decode_manifest with arbitrary bytes and mutated valid bodies, where the
  compiled decoder must give the reference's result or error (tests/unit/both_decoders.py);
- decode_segment with mutated bodies that are correctly compressed and encrypted, so the
  mutations get past authentication and reach the body decoder through the full path.
"""

from __future__ import annotations

import contextlib
import os

import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drstream.daemon.codec import (
    Body,
    EventBatch,
    KafkaBatch,
    KafkaRecord,
    decode_manifest,
    encode_body,
    make_manifest,
)
from drstream.daemon.errors import DrstreamError, SegmentError
from drstream.daemon.keyring import KeyRing, derive_segment_key
from drstream.daemon.segment import (
    ZERO_DIGEST,
    SegmentHeader,
    _pack_header,
    decode_segment,
    encode_segment,
    parse_header,
    read_manifest,
)

# Each body decode also runs the compiled decoder and requires the same result or error.
from tests.unit.both_decoders import decode_body

# DRSTREAM_FUZZ_EXAMPLES=20000 for a long local or nightly run; the default keeps it fast.
EXAMPLES = int(os.environ.get("DRSTREAM_FUZZ_EXAMPLES", "1000"))
KEY = bytes(range(32))
RING = KeyRing({"k1": KEY}, "k1")
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _body() -> Body:
    records = [
        KafkaRecord(
            i, 1000 + i, 1, b"k%d" % i if i % 3 else None, b"v" * i, [("h", b"x")] * (i % 3)
        )
        for i in range(6)
    ]
    batches: list[KafkaBatch | EventBatch] = [
        KafkaBatch("kafka:primary", "t", 0, records),
        EventBatch("mlflow:primary", [{"type": "model_created", "name": "m"}]),
    ]
    return Body(make_manifest({"kafka:primary": {"t": {"0": 6}}}, batches), batches)


BODY = encode_body(_body())
SEGMENT = encode_segment(_body(), log_id="fz", seq=1, prev_digest=ZERO_DIGEST, keyring=RING)


def _seal(plaintext: bytes, *, declare_size: bool = True) -> bytes:
    """Compress and encrypt arbitrary plaintext exactly like encode_segment does."""
    frame = zstandard.ZstdCompressor(level=1, write_content_size=declare_size).compress(plaintext)
    salt, nonce = os.urandom(16), os.urandom(12)
    header = SegmentHeader("fz", 1, 0, "k1", salt, nonce, ZERO_DIGEST, len(frame) + 16)
    aad = _pack_header(header)
    return aad + AESGCM(derive_segment_key(KEY, salt, "fz", 1)).encrypt(nonce, frame, aad)


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """base with a few random edits: byte changes, insertions, deletions, splices."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "xor", "insert", "delete", "truncate", "dup"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "xor" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        elif op == "dup" and data:
            end = min(len(data), pos + draw(st.integers(1, 16)))
            data[pos:pos] = data[pos:end]
    return bytes(data)


def _only_segment_errors(data: bytes) -> None:
    for call in (
        lambda: parse_header(data),
        lambda: decode_segment(data, RING),
        lambda: decode_segment(data, RING, expect_log_id="fz", expect_seq=1),
        lambda: read_manifest(data, RING),
    ):
        with contextlib.suppress(SegmentError):
            call()


def _only_drstream_errors_from_body(data: bytes) -> None:
    for call in (lambda: decode_body(data), lambda: decode_manifest(data)):
        with contextlib.suppress(DrstreamError):
            call()


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes_as_segment(data: bytes) -> None:
    _only_segment_errors(data)
    _only_segment_errors(b"DRS1\x01\x00" + data)


@FUZZ
@given(mutated(SEGMENT))
def test_mutated_segments(data: bytes) -> None:
    _only_segment_errors(data)


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes_as_body(data: bytes) -> None:
    _only_drstream_errors_from_body(data)
    manifest = BODY[: 4 + int.from_bytes(BODY[:4], "little")]
    _only_drstream_errors_from_body(manifest + data)


@FUZZ
@given(mutated(BODY))
def test_mutated_bodies(data: bytes) -> None:
    _only_drstream_errors_from_body(data)


@settings(
    max_examples=max(EXAMPLES // 2, 1),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated(BODY), st.booleans())
def test_mutated_bodies_past_authentication(plaintext: bytes, declare_size: bool) -> None:
    """Authentic segments whose body is damaged: the body decoder is the last line."""
    _only_segment_errors(_seal(plaintext, declare_size=declare_size))


def test_sealed_valid_body_decodes() -> None:
    assert decode_segment(_seal(BODY), RING)[1] == _body()
