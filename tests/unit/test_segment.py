"""Segment format: round trip, header layout, and that every defect is detected."""

from __future__ import annotations

import hashlib
import os
import struct
from unittest import mock

import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drstream.daemon.codec import (
    Body,
    EventBatch,
    KafkaBatch,
    KafkaRecord,
    encode_body,
    make_manifest,
)
from drstream.daemon.errors import (
    ChainError,
    DrstreamError,
    SegmentAuthError,
    SegmentError,
    SegmentFormatError,
    UnknownKeyError,
)
from drstream.daemon.keyring import KeyRing, derive_segment_key
from drstream.daemon.segment import (
    MAX_BODY_SIZE,
    ZERO_DIGEST,
    SegmentHeader,
    _pack_header,
    decode_segment,
    decrypt_segment,
    encode_segment,
    parse_header,
    read_manifest,
    segment_digest,
    segment_object_key,
)

KEY1 = bytes(range(32))
KEY2 = bytes(range(1, 33))
RING = KeyRing({"k1": KEY1, "k2": KEY2}, "k1")


def small_body() -> Body:
    rec = KafkaRecord(41, 1_700_000_000_000, 1, b"user-1", b'{"n":1}', [("trace-id", b"ab")])
    batch = KafkaBatch("kafka:primary", "orders", 0, [rec])
    return Body(make_manifest({"kafka:primary": {"orders": {"0": 42}}}, [batch]), [batch])


def larger_body(n: int = 300) -> Body:
    records = [
        KafkaRecord(i, 1_700_000_000_000 + i, 1, b"k%d" % i, b"value %d " % i * 10, [("h", b"v")])
        for i in range(n)
    ]
    batches: list[KafkaBatch | EventBatch] = [
        KafkaBatch("kafka:primary", "t", 1, records),
        EventBatch("mlflow:primary", [{"type": "version_created", "model": "m", "version": 3}]),
    ]
    return Body(make_manifest({"kafka:primary": {"t": {"1": n}}}, batches), batches)


def encode(
    body: Body | None = None,
    *,
    seq: int = 1,
    log_id: str = "eu-1",
    prev: bytes | None = None,
    keyring: KeyRing = RING,
    created_at_ms: int | None = None,
    zstd_level: int = 1,
) -> bytes:
    if prev is None:
        prev = ZERO_DIGEST if seq == 1 else b"\x11" * 32
    return encode_segment(
        body or small_body(),
        log_id=log_id,
        seq=seq,
        prev_digest=prev,
        keyring=keyring,
        created_at_ms=created_at_ms,
        zstd_level=zstd_level,
    )


SMALL = encode(created_at_ms=1_700_000_000_123)
LARGER = encode(larger_body(), seq=7, log_id="us-west.2")


# --------------------------------------------------------------------------- round trip


def test_round_trip_and_header() -> None:
    header, body = decode_segment(SMALL, RING, expect_log_id="eu-1", expect_seq=1)
    assert body == small_body()
    assert header.log_id == "eu-1" and header.seq == 1 and header.key_id == "k1"
    assert header.created_at_ms == 1_700_000_000_123
    assert header.prev_digest == ZERO_DIGEST
    parsed, hlen = parse_header(SMALL)
    assert parsed == header
    assert hlen + header.body_len == len(SMALL)
    assert len(header.salt) == 16 and len(header.nonce) == 12


def test_round_trip_larger_and_manifest() -> None:
    header, body = decode_segment(LARGER, RING)
    assert body == larger_body()
    h2, manifest = read_manifest(LARGER, RING, expect_log_id="us-west.2", expect_seq=7)
    assert h2 == header and manifest == larger_body().manifest
    _, plaintext = decrypt_segment(LARGER, RING)
    assert plaintext == encode_body(larger_body())


def test_salt_and_nonce_are_fresh() -> None:
    a, b = encode(), encode()
    ha, _ = parse_header(a)
    hb, _ = parse_header(b)
    assert ha.salt != hb.salt and ha.nonce != hb.nonce and a != b


def test_created_at_defaults_to_now() -> None:
    import time

    before = time.time_ns() // 1_000_000
    header, _ = parse_header(encode())
    assert before <= header.created_at_ms <= time.time_ns() // 1_000_000


def test_zstd_levels() -> None:
    for level in (1, 3, 19):
        _, body = decode_segment(encode(larger_body(50), zstd_level=level), RING)
        assert body == larger_body(50)


def test_key_rotation_old_key_still_decrypts() -> None:
    old = encode(keyring=KeyRing({"k1": KEY1}, "k1"))
    rotated = KeyRing({"k1": KEY1, "k2": KEY2}, "k2")
    new = encode(keyring=rotated)
    assert parse_header(new)[0].key_id == "k2"
    assert decode_segment(old, rotated)[1] == small_body()
    assert decode_segment(new, rotated)[1] == small_body()


def test_heartbeat_segment() -> None:
    body = Body(make_manifest({"kafka:primary": {"t": {"0": 9}}}, []))
    data = encode(body, seq=3)
    assert decode_segment(data, RING)[1] == body
    assert read_manifest(data, RING)[1].kind == "heartbeat"


def test_digest_and_object_key() -> None:
    assert segment_digest(SMALL) == hashlib.sha256(SMALL).digest()
    assert segment_object_key("dr/prod", "eu-1", 42) == "dr/prod/logs/eu-1/00000000000000000042.seg"
    assert segment_object_key("", "eu-1", 1) == "logs/eu-1/00000000000000000001.seg"
    assert segment_object_key("/p/", "a", 2**64 - 1) == "p/logs/a/18446744073709551615.seg"
    with pytest.raises(SegmentFormatError):
        segment_object_key("p", "../x", 1)


def test_chain_of_segments() -> None:
    prev = ZERO_DIGEST
    segs = []
    for seq in range(1, 4):
        data = encode_segment(small_body(), log_id="a", seq=seq, prev_digest=prev, keyring=RING)
        segs.append(data)
        prev = segment_digest(data)
    for i in range(1, 3):
        assert parse_header(segs[i])[0].prev_digest == segment_digest(segs[i - 1])


# --------------------------------------------------------------------------- golden vector

# Also printed in docs/format.md ("Test vector"). Key k1 = bytes 0..31, salt 10..1f,
# nonce 20..2b, log "eu-1", seq 2, prev_digest aa*32, created_at_ms 1700000000123.
GOLDEN = bytes.fromhex(
    "4452533101000465752d3100000000000000020000018bcfe5687b026b3110111213141516171819"
    "1a1b1c1d1e1f202122232425262728292a2baaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    "aaaaaaaaaaaaaaaaaaaa000000c9fef366ba5a649eb779f0a8e5815f2db28f89d8ceee8d6e01eb37"
    "fa28707e604840d01bff4faa9f7575e6499979c83cada95b33ee10402eaeac264bbed6b01c6e2721"
    "ef1f1fbb5e10632bfb2abfe2a64ee65c35771267ef377cc7f10abe5f4d769a4f4ef0e326a1cce89d"
    "7fa9783d4993d1e46ef5fb78d2972a2481ab19e0ac9111fff0d3146d01b90c6bf089f1e2f862d1a1"
    "df700db9cb10e68c97bda850621b90d01670ac980827d64d38b51f266971afd0a1cf7a86955f213b"
    "9a7a6e6e49eb91f85bfe2379cd6390"
)
GOLDEN_PLAINTEXT = bytes.fromhex(
    "9f0000007b226b696e64223a2264617461222c227265636f72645f636f756e74223a312c226d696e"
    "5f74696d657374616d705f6d73223a313730303030303030303030302c226d61785f74696d657374"
    "616d705f6d73223a313730303030303030303030302c22706f736974696f6e73223a7b226b61666b"
    "613a7072696d617279223a7b226f7264657273223a7b2230223a34327d7d7d2c226578747261223a"
    "7b7d7d015f000000000000000d006b61666b613a7072696d61727906006f72646572730000000001"
    "0000000100000029000000000000000068e5cf8b0100000600000007000000010000000800000002"
    "00000001757365722d317b226e223a317d74726163652d69646162"
)


def test_golden_vector_decodes() -> None:
    ring = KeyRing({"k1": KEY1}, "k1")
    header, plaintext = decrypt_segment(GOLDEN, ring, expect_log_id="eu-1", expect_seq=2)
    assert header == SegmentHeader(
        log_id="eu-1",
        seq=2,
        created_at_ms=1_700_000_000_123,
        key_id="k1",
        salt=bytes(range(0x10, 0x20)),
        nonce=bytes(range(0x20, 0x2C)),
        prev_digest=b"\xaa" * 32,
        body_len=201,
    )
    assert plaintext == GOLDEN_PLAINTEXT == encode_body(small_body())
    assert decode_segment(GOLDEN, ring)[1] == small_body()


def test_golden_header_bytes_are_reproduced() -> None:
    randomness = iter([bytes(range(0x10, 0x20)), bytes(range(0x20, 0x2C))])
    with mock.patch("drstream.daemon.envelope.os.urandom", lambda n: next(randomness)):
        data = encode(
            seq=2,
            prev=b"\xaa" * 32,
            created_at_ms=1_700_000_000_123,
            keyring=KeyRing({"k1": KEY1}, "k1"),
        )
    _, hlen = parse_header(data)
    _, golden_hlen = parse_header(GOLDEN)
    assert hlen == golden_hlen == 94
    # The header up to body_len is fixed by the format; body_len depends on zstd's output.
    assert data[: hlen - 4] == GOLDEN[: hlen - 4]


# --------------------------------------------------------------------------- tampering


def assert_detected(data: bytes, ring: KeyRing = RING, **expect: object) -> SegmentError:
    """decode and read_manifest must raise a SegmentError subclass, nothing else."""
    with pytest.raises(SegmentError) as info:
        decode_segment(data, ring, **expect)  # type: ignore[arg-type]
    with pytest.raises(SegmentError):
        read_manifest(data, ring, **expect)  # type: ignore[arg-type]
    return info.value


def test_every_single_bit_flip_is_detected_exhaustively() -> None:
    data = SMALL
    for pos in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            err = assert_detected(bytes(flipped), expect_log_id="eu-1", expect_seq=1)
            assert isinstance(
                err, SegmentFormatError | SegmentAuthError | UnknownKeyError | ChainError
            )
        flipped = bytearray(data)
        flipped[pos] ^= 0xFF
        assert_detected(bytes(flipped))


def test_bit_flips_in_the_body_are_auth_errors() -> None:
    _, hlen = parse_header(SMALL)
    for pos in range(hlen, len(SMALL)):
        flipped = bytearray(SMALL)
        flipped[pos] ^= 0x80
        err = assert_detected(bytes(flipped))
        assert isinstance(err, SegmentAuthError)
        assert "authentication failed: tampered or wrong key" in str(err)
        assert err.log_id == "eu-1" and err.seq == 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pos=st.integers(0, len(LARGER) - 1), mask=st.integers(1, 255))
def test_any_byte_change_in_a_larger_segment_is_detected(pos: int, mask: int) -> None:
    flipped = bytearray(LARGER)
    flipped[pos] ^= mask
    assert_detected(bytes(flipped))


def test_every_truncation_is_detected() -> None:
    for n in range(len(SMALL)):
        err = assert_detected(SMALL[:n])
        assert isinstance(err, SegmentFormatError)
    _, hlen = parse_header(LARGER)
    for n in [*range(0, hlen + 20), *range(len(LARGER) - 40, len(LARGER))]:
        assert isinstance(assert_detected(LARGER[:n]), SegmentFormatError)


@pytest.mark.parametrize("extra", [b"\x00", b"garbage", SMALL])
def test_appended_bytes_are_detected(extra: bytes) -> None:
    err = assert_detected(SMALL + extra)
    assert isinstance(err, SegmentFormatError) and "trailing bytes" in str(err)
    with pytest.raises(SegmentFormatError, match="trailing"):
        parse_header(SMALL + extra)


def test_segment_moved_to_another_seq_or_log() -> None:
    err = assert_detected(SMALL, expect_log_id="eu-1", expect_seq=2)
    assert isinstance(err, ChainError)
    assert "seq 1" in str(err) and "seq 2" in str(err)
    assert err.log_id == "eu-1" and err.seq == 2
    err = assert_detected(SMALL, expect_log_id="eu-2", expect_seq=1)
    assert isinstance(err, ChainError)
    assert "eu-1" in str(err) and "eu-2" in str(err)
    # Rewriting the header to claim the new place breaks authentication instead.
    header, _ = parse_header(LARGER)
    moved = bytearray(LARGER)
    struct.pack_into(">Q", moved, 4 + 3 + len(header.log_id), 8)
    assert isinstance(assert_detected(bytes(moved), expect_seq=8), SegmentAuthError)


def test_unknown_key_id() -> None:
    err = assert_detected(SMALL, KeyRing({"k2": KEY2}, "k2"))
    assert isinstance(err, UnknownKeyError)
    assert "'k1'" in str(err) and err.log_id == "eu-1" and err.seq == 1
    assert "log eu-1" in str(err) and "seq 1" in str(err)


def test_wrong_key_same_id() -> None:
    err = assert_detected(SMALL, KeyRing({"k1": KEY2}, "k1"))
    assert isinstance(err, SegmentAuthError)
    assert "authentication failed: tampered or wrong key" in str(err)
    assert err.log_id == "eu-1" and err.seq == 1


def test_errors_name_log_and_seq() -> None:
    flipped = bytearray(LARGER)
    flipped[-1] ^= 1
    err = assert_detected(bytes(flipped))
    assert (err.log_id, err.seq) == ("us-west.2", 7)
    assert str(err).startswith(
        "segment log us-west.2 seq 7 object logs/us-west.2/00000000000000000007.seg: ")
    # Unparseable header: the caller's expectation is the best name there is.
    err = assert_detected(b"XXXX" + LARGER[4:], expect_log_id="us-west.2", expect_seq=7)
    assert (err.log_id, err.seq) == ("us-west.2", 7)


# --------------------------------------------------------------------------- parse_header


def header_bytes(**overrides: object) -> tuple[bytes, bytes]:
    """SMALL's header with fields replaced (and the matching body), no re-encryption."""
    header, hlen = parse_header(SMALL)
    fields = {
        "log_id": header.log_id,
        "seq": header.seq,
        "created_at_ms": header.created_at_ms,
        "key_id": header.key_id,
        "salt": header.salt,
        "nonce": header.nonce,
        "prev_digest": header.prev_digest,
        "body_len": header.body_len,
    }
    fields.update(overrides)
    return _pack_header(SegmentHeader(**fields)), SMALL[hlen:]  # type: ignore[arg-type]


def test_parse_header_layout() -> None:
    header, hlen = parse_header(SMALL)
    expected = (
        b"DRS1\x01\x00"
        + b"\x04eu-1"
        + struct.pack(">QQ", 1, 1_700_000_000_123)
        + b"\x02k1"
        + header.salt
        + header.nonce
        + ZERO_DIGEST
        + struct.pack(">I", header.body_len)
    )
    assert SMALL[:hlen] == expected


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: b"DRS2" + d[4:], "bad magic"),
        (lambda d: d[:4] + b"\x02" + d[5:], "unsupported format version 2"),
        (lambda d: d[:4] + b"\x00" + d[5:], "unsupported format version 0"),
        (lambda d: d[:5] + b"\x01" + d[6:], "reserved flags"),
        (lambda d: d[:6] + b"\x00" + d[7:], "invalid log id"),
        (lambda d: d[:7] + b"e/-1" + d[11:], "invalid log id"),
        (lambda d: d[:7] + b"\xc3\xa9-1" + d[11:], "invalid log id"),
        (lambda d: d[:11] + bytes(8) + d[19:], "seq 0"),
        (lambda d: d[:27] + b"\x00" + d[28:], "invalid key id"),
        (lambda d: d[:28] + b"k " + d[30:], "invalid key id"),
        (lambda d: d[:-1], "truncated"),
        (lambda d: d + b"\x00", "trailing"),
        (lambda d: b"", "truncated"),
        (lambda d: b"DRS", "truncated"),
    ],
)
def test_parse_header_strict(mutate: object, match: str) -> None:
    data = mutate(SMALL)  # type: ignore[operator]
    with pytest.raises(SegmentFormatError, match=match):
        parse_header(data)
    assert_detected(data)


def test_parse_header_prev_digest_rule() -> None:
    head, body = header_bytes(prev_digest=b"\x01" * 32)
    with pytest.raises(SegmentFormatError, match="zero bytes for seq 1"):
        parse_header(head + body)
    head, body = header_bytes(seq=5)
    with pytest.raises(SegmentFormatError, match="seq 5 has zero digest"):
        parse_header(head + body)


def test_parse_header_body_len_rules() -> None:
    head, _ = header_bytes(body_len=15)
    with pytest.raises(SegmentFormatError, match="shorter than the 16-byte GCM tag"):
        parse_header(head + bytes(15))
    head, body = header_bytes(body_len=2**32 - 1)
    with pytest.raises(SegmentFormatError, match="truncated"):
        parse_header(head + body)


def test_parse_header_max_ids() -> None:
    ring = KeyRing({"K" * 64: KEY1}, "K" * 64)
    data = encode(log_id="L" * 128, keyring=ring)
    header, _ = parse_header(data)
    assert header.log_id == "L" * 128 and header.key_id == "K" * 64
    assert decode_segment(data, ring)[1] == small_body()


def test_parse_header_accepts_only_bytes_like() -> None:
    with pytest.raises(SegmentFormatError):
        parse_header("DRS1" * 30)  # type: ignore[arg-type]
    assert parse_header(bytearray(SMALL))[0] == parse_header(SMALL)[0]  # type: ignore[arg-type]


# --------------------------------------------------------------------------- encode args


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_id": "a/b"}, "invalid log id"),
        ({"log_id": ""}, "invalid log id"),
        ({"log_id": "x" * 129}, "invalid log id"),
        ({"seq": 0}, "invalid seq"),
        ({"seq": 2**64}, "invalid seq"),
        ({"seq": 2, "prev_digest": ZERO_DIGEST}, "zero bytes for seq 1"),
        ({"seq": 1, "prev_digest": b"\x01" * 32}, "zero bytes for seq 1"),
        ({"prev_digest": b"short"}, "32 bytes"),
        ({"created_at_ms": -1}, "created_at_ms"),
        ({"zstd_level": 1000}, "zstd level"),
    ],
)
def test_encode_argument_errors(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "log_id": "eu-1",
        "seq": 1,
        "prev_digest": ZERO_DIGEST,
        "keyring": RING,
    }
    args.update(kwargs)
    with pytest.raises(SegmentFormatError, match=match):
        encode_segment(small_body(), **args)  # type: ignore[arg-type]


def test_encode_body_errors_carry_log_and_seq() -> None:
    bad = KafkaBatch("s", "t", 0, [KafkaRecord(0, 0, 7, None, None, [])])
    with pytest.raises(SegmentFormatError) as info:
        encode(Body(make_manifest({}, [bad]), [bad]), seq=3, log_id="eu-9")
    assert (info.value.log_id, info.value.seq) == ("eu-9", 3)
    assert str(info.value).startswith(
        "segment log eu-9 seq 3 object logs/eu-9/00000000000000000003.seg: timestamp_type")


# --------------------------------------------------------------------------- zstd guard


def seal(frame: bytes, *, seq: int = 1, log_id: str = "eu-1") -> bytes:
    """A correctly encrypted segment around an arbitrary (possibly hostile) zstd frame."""
    salt, nonce = os.urandom(16), os.urandom(12)
    header = SegmentHeader(
        log_id=log_id,
        seq=seq,
        created_at_ms=0,
        key_id="k1",
        salt=salt,
        nonce=nonce,
        prev_digest=ZERO_DIGEST if seq == 1 else b"\x01" * 32,
        body_len=len(frame) + 16,
    )
    aad = _pack_header(header)
    key = derive_segment_key(KEY1, salt, log_id, seq)
    return aad + AESGCM(key).encrypt(nonce, frame, aad)


def test_sealed_helper_matches_encoder() -> None:
    frame = zstandard.ZstdCompressor(level=1).compress(encode_body(small_body()))
    assert decode_segment(seal(frame), RING)[1] == small_body()


def test_zstd_frame_without_content_size_is_refused() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(encode_body(small_body()))
    with pytest.raises(SegmentFormatError, match="does not declare its content size"):
        decode_segment(seal(frame), RING)
    with pytest.raises(SegmentFormatError, match="does not declare"):
        read_manifest(seal(frame), RING)


def test_zstd_bomb_is_refused_before_decompressing() -> None:
    cctx = zstandard.ZstdCompressor(level=1)
    chunker = cctx.compressobj(size=MAX_BODY_SIZE + 1)
    frame = chunker.compress(bytes(1 << 20))  # only the start: the size is what matters
    frame += chunker.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    with pytest.raises(SegmentFormatError, match=r"over the .*limit") as info:
        decode_segment(seal(frame, seq=4), RING)
    assert info.value.seq == 4
    with pytest.raises(SegmentFormatError, match="limit"):
        read_manifest(seal(frame), RING)


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"not zstd at all",
        zstandard.ZstdCompressor().compress(b"x" * 100)[:-3],  # truncated frame
        zstandard.ZstdCompressor().compress(b"abc") + b"extra",  # data after the frame
        zstandard.ZstdCompressor().compress(b"abc") * 2,  # two frames
    ],
)
def test_bad_zstd_frames(frame: bytes) -> None:
    err = assert_detected(seal(frame))
    assert isinstance(err, SegmentFormatError)
    assert err.log_id == "eu-1" and err.seq == 1


def test_authentic_but_undecodable_body() -> None:
    frame = zstandard.ZstdCompressor().compress(b"\x05\x00\x00\x00{}")
    err = assert_detected(seal(frame, seq=9, log_id="x"))
    assert isinstance(err, SegmentFormatError) and (err.log_id, err.seq) == ("x", 9)
    assert str(err).startswith("segment log x seq 9 object logs/x/00000000000000000009.seg: ")


def test_only_project_errors_escape() -> None:
    for data in (b"", b"\x00" * 200, SMALL[:50] + b"\xff" * 300):
        with pytest.raises(DrstreamError):
            decode_segment(data, RING)
