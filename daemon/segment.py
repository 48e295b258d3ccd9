"""The segment format: a clear header, then one AES-256-GCM ciphertext of zstd(body).

Byte-by-byte description in docs/format.md. In short (header integers big-endian):

    "DRS1" | version u8 = 1 | flags u8 = 0 | u8 len + log_id | seq u64 | created_at_ms u64
    | u8 len + key_id | salt[16] | nonce[12] | prev_digest[32] | body_len u32
    | ciphertext[body_len] = AES-256-GCM(segment key, nonce, zstd(body), aad = whole header)

Segment key = HKDF-SHA256(master key[key_id], salt, "drstream/segment/v1" | log_id | seq),
see daemon.keyring.derive_segment_key. prev_digest = SHA-256 of the previous segment's full
bytes (32 zero bytes for seq 1), so the chain can be verified without any key.

Pure functions, no I/O. Decoding raises only SegmentError subclasses (SegmentFormatError,
SegmentAuthError, UnknownKeyError, ChainError), each naming the log and seq when known.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Callable
from typing import Final, TypeVar

import zstandard

from drstream.daemon.accel import decode_body, decode_produce  # compiled where built
from drstream.daemon.codec import Body, Manifest, decode_manifest, encode_body
from drstream.daemon.envelope import (
    NONCE_SIZE,
    SALT_SIZE,
    TAG_SIZE,
    fresh_salt_and_nonce,
    seal,
    unseal,
)
from drstream.daemon.errors import (
    ChainError,
    KeyRingError,
    SegmentAuthError,
    SegmentError,
    SegmentFormatError,
    UnknownKeyError,
)
from drstream.daemon.keyring import KEY_ID_RE, KeyRing, derive_segment_key
from drstream.daemon.layout import LOG_ID_RE, segment_key, with_prefix
from drstream.daemon.records import Header, SegmentHeader

__all__ = [
    "DIGEST_SIZE",
    "FORMAT_VERSION",
    "LOG_ID_RE",
    "MAGIC",
    "MAX_BODY_SIZE",
    "MAX_HEADER_SIZE",
    "MAX_SEGMENT_SIZE",
    "MIN_HEADER_SIZE",
    "NONCE_SIZE",
    "SALT_SIZE",
    "TAG_SIZE",
    "ZERO_DIGEST",
    "SegmentHeader",
    "chain_break",
    "decode_segment",
    "decrypt_segment",
    "encode_segment",
    "parse_header",
    "read_manifest",
    "segment_digest",
    "segment_object_key",
]

MAGIC: Final = b"DRS1"
FORMAT_VERSION: Final = 1
DIGEST_SIZE: Final = 32
ZERO_DIGEST: Final = bytes(DIGEST_SIZE)  # the prev_digest of seq 1: nothing before it
#: Largest decompressed body a reader accepts (and a writer produces): zstd bomb guard.
MAX_BODY_SIZE: Final = 512 * 1024 * 1024
_U64_MAX: Final = 2**64 - 1
_U32_MAX: Final = 2**32 - 1

_PRE_S = struct.Struct(">4sBBB")  # magic, version, flags, log_id length
_SEQ_TIME_KEYLEN_S = struct.Struct(">QQB")  # seq, created_at_ms, key_id length
_TAIL_S = struct.Struct(f">{SALT_SIZE}s{NONCE_SIZE}s{DIGEST_SIZE}sI")  # salt nonce prev len
#: Smallest possible header: 1-byte log id and key id.
MIN_HEADER_SIZE: Final = _PRE_S.size + 1 + _SEQ_TIME_KEYLEN_S.size + 1 + _TAIL_S.size
#: Largest possible header (255-byte ids): a range read of this many bytes holds it.
MAX_HEADER_SIZE: Final = _PRE_S.size + 255 + _SEQ_TIME_KEYLEN_S.size + 255 + _TAIL_S.size
#: Largest stored segment a reader downloads: the header, zstd's worst case for a
#: MAX_BODY_SIZE body (input + 1/128, a bound above ZSTD_compressBound) and the GCM tag.
MAX_SEGMENT_SIZE: Final = MAX_HEADER_SIZE + MAX_BODY_SIZE + MAX_BODY_SIZE // 128 + (64 << 10)


def segment_object_key(prefix: str, log_id: str, seq: int) -> str:
    """`<prefix>/logs/<log_id>/<seq:020d>.seg` (daemon.layout), the log id checked."""
    _check_log_id(log_id, seq)
    return with_prefix(prefix, segment_key(log_id, seq))


def segment_digest(data: bytes) -> bytes:
    """SHA-256 of a segment's full bytes: the prev_digest its successor must carry."""
    return hashlib.sha256(data).digest()


def chain_break(seq: int, header: SegmentHeader, prev: bytes | None) -> str | None:
    """The chain rule: why the segment found at `seq` does not link onto its predecessor,
    None when it does. Seq 1 links to ZERO_DIGEST; seq n > 1 to segment_digest() of seq
    n - 1, which is `prev` (None: not known, so nothing to check)."""
    if seq == 1:
        return None if header.prev_digest == ZERO_DIGEST else "first segment must link to zeros"
    if prev is not None and header.prev_digest != prev:
        return (f"prev_digest {header.prev_digest.hex()[:16]}… does not match segment "
                f"{seq - 1} ({prev.hex()[:16]}…)")
    return None


# --------------------------------------------------------------------------- helpers

_E = TypeVar("_E", bound=SegmentError)
_T = TypeVar("_T")


def _recontext(e: SegmentError, cls: type[_E], log_id: str | None, seq: int | None) -> _E:
    """The same error, now naming the log and seq (codec errors do not know them)."""
    message = str(e).removeprefix("segment: ")
    return cls(message, log_id=log_id, seq=seq, key=e.key)


def _check_log_id(log_id: object, seq: object) -> str:
    if not isinstance(log_id, str) or not LOG_ID_RE.fullmatch(log_id):
        raise SegmentFormatError(
            f"invalid log id {log_id!r}: must match [A-Za-z0-9._-]{{1,128}}",
            seq=seq if isinstance(seq, int) else None,
        )
    return log_id


def _check_seq(seq: object, log_id: str) -> int:
    if type(seq) is not int or not 1 <= seq <= _U64_MAX:
        raise SegmentFormatError(f"invalid seq {seq!r}: must be 1..2**64-1", log_id=log_id)
    return seq


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """One compressor per level per thread (the objects are not thread-safe)."""
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(
            level=level, write_content_size=True, write_checksum=False
        )
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


# --------------------------------------------------------------------------- encode


def _pack_header(h: SegmentHeader) -> bytes:
    log = h.log_id.encode("ascii")
    key = h.key_id.encode("ascii")
    return b"".join(
        (
            _PRE_S.pack(MAGIC, FORMAT_VERSION, 0, len(log)),
            log,
            _SEQ_TIME_KEYLEN_S.pack(h.seq, h.created_at_ms, len(key)),
            key,
            _TAIL_S.pack(h.salt, h.nonce, h.prev_digest, h.body_len),
        )
    )


def encode_segment(
    body: Body,
    *,
    log_id: str,
    seq: int,
    prev_digest: bytes,
    keyring: KeyRing,
    created_at_ms: int | None = None,
    zstd_level: int = 1,
) -> bytes:
    """The full bytes of segment `seq` of `log_id`, encrypted with the ring's active key.

    prev_digest is segment_digest() of segment seq-1 (ZERO_DIGEST for seq 1).
    Raises SegmentFormatError for arguments or a body that cannot make a valid segment.
    """
    _check_log_id(log_id, seq)
    _check_seq(seq, log_id)
    if not isinstance(prev_digest, bytes) or len(prev_digest) != DIGEST_SIZE:
        raise SegmentFormatError("prev_digest must be 32 bytes", log_id=log_id, seq=seq)
    if (seq == 1) != (prev_digest == ZERO_DIGEST):
        raise SegmentFormatError(
            "prev_digest must be 32 zero bytes for seq 1 and only for seq 1",
            log_id=log_id,
            seq=seq,
        )
    if created_at_ms is None:
        created_at_ms = time.time_ns() // 1_000_000
    if type(created_at_ms) is not int or not 0 <= created_at_ms <= _U64_MAX:
        raise SegmentFormatError(
            f"created_at_ms {created_at_ms!r} must be 0..2**64-1", log_id=log_id, seq=seq
        )
    key_id = keyring.active
    try:
        plaintext = encode_body(body)
    except SegmentFormatError as e:
        raise _recontext(e, SegmentFormatError, log_id, seq) from e
    if len(plaintext) > MAX_BODY_SIZE:
        raise SegmentFormatError(
            f"body of {len(plaintext)} bytes exceeds the {MAX_BODY_SIZE}-byte limit",
            log_id=log_id,
            seq=seq,
        )
    try:
        compressed = _compressor(zstd_level).compress(plaintext)
    except (zstandard.ZstdError, TypeError, ValueError, OverflowError) as e:
        raise SegmentFormatError(
            f"zstd level {zstd_level!r} failed: {e}", log_id=log_id, seq=seq
        ) from e
    body_len = len(compressed) + TAG_SIZE
    if body_len > _U32_MAX:  # pragma: no cover - impossible below MAX_BODY_SIZE
        raise SegmentFormatError("ciphertext exceeds 4 GiB", log_id=log_id, seq=seq)
    salt, nonce = fresh_salt_and_nonce()
    header = SegmentHeader(log_id, seq, created_at_ms, key_id, salt, nonce, prev_digest, body_len)
    aad = _pack_header(header)
    seg_key = derive_segment_key(keyring.key(key_id), header.salt, log_id, seq)
    return aad + seal(seg_key, header.nonce, compressed, aad)


# --------------------------------------------------------------------------- decode


def parse_header(data: bytes, *, expect_log_id: str | None = None,
                 expect_seq: int | None = None, size: int | None = None
                 ) -> tuple[SegmentHeader, int]:
    """The clear header and its length; no key needed (the chain verifier uses this).

    Strict: bad magic, unknown version, nonzero flags, invalid ids, seq 0, a prev_digest
    that is zero for seq > 1 (or not zero for seq 1), a body shorter than the GCM tag, a
    truncated segment and bytes after the body are all SegmentFormatError. Authenticity
    is NOT checked here (decrypt_segment does that).

    expect_log_id / expect_seq: where the caller found the segment, so an error about
    bytes too damaged to name themselves still names the object. `size`: the object's
    full size when `data` is only its first bytes (at least MAX_HEADER_SIZE of them, or
    all of it), read with a range request.
    """
    return _parse_header(data, expect_log_id, expect_seq, size)


def _parse_header(
    data: bytes, hint_log: str | None, hint_seq: int | None, size: int | None = None
) -> tuple[SegmentHeader, int]:
    log_id, seq = hint_log, hint_seq

    def fail(message: str) -> SegmentFormatError:
        return SegmentFormatError(message, log_id=log_id, seq=seq)

    try:
        mv = memoryview(data)
    except TypeError:
        raise fail(f"segment must be bytes, got {type(data).__name__}") from None
    total = len(mv) if size is None else size
    if len(mv) < min(total, MAX_HEADER_SIZE):
        raise fail(f"only {len(mv)} of the object's first bytes given to read its header")
    if total < _PRE_S.size:
        raise fail(f"truncated: {total} bytes is shorter than any segment header")
    magic, version, flags, log_len = _PRE_S.unpack_from(mv, 0)
    if magic != MAGIC:
        raise fail(f"bad magic {bytes(magic)!r} (expected {MAGIC!r}): not a drstream segment")
    if version != FORMAT_VERSION:
        raise fail(f"unsupported format version {version} (this build reads {FORMAT_VERSION})")
    if flags != 0:
        raise fail(f"reserved flags are {flags:#04x}, must be 0")
    pos = _PRE_S.size
    if pos + log_len + _SEQ_TIME_KEYLEN_S.size > total:
        raise fail(f"truncated header ({total} bytes)")
    raw_log = bytes(mv[pos : pos + log_len])
    if not raw_log.isascii() or not LOG_ID_RE.fullmatch(parsed_log := raw_log.decode("ascii")):
        raise fail(f"invalid log id {raw_log!r} in header")
    log_id = parsed_log
    pos += log_len
    parsed_seq, created_at_ms, key_len = _SEQ_TIME_KEYLEN_S.unpack_from(mv, pos)
    pos += _SEQ_TIME_KEYLEN_S.size
    if parsed_seq < 1:
        raise fail("seq 0 in header: seqs start at 1")
    seq = parsed_seq
    if pos + key_len + _TAIL_S.size > total:
        raise fail(f"truncated header ({total} bytes)")
    raw_key = bytes(mv[pos : pos + key_len])
    if not raw_key.isascii() or not KEY_ID_RE.fullmatch(key_id := raw_key.decode("ascii")):
        raise fail(f"invalid key id {raw_key!r} in header")
    pos += key_len
    salt, nonce, prev_digest, body_len = _TAIL_S.unpack_from(mv, pos)
    pos += _TAIL_S.size
    if (seq == 1) != (prev_digest == ZERO_DIGEST):
        raise fail(
            "prev_digest must be 32 zero bytes for seq 1 and only for seq 1"
            f" (seq {seq} has {'zero' if prev_digest == ZERO_DIGEST else 'nonzero'} digest)"
        )
    if body_len < TAG_SIZE:
        raise fail(f"body_len {body_len} is shorter than the {TAG_SIZE}-byte GCM tag")
    if pos + body_len > total:
        raise fail(f"truncated: header says {pos + body_len} bytes, have {total}")
    if pos + body_len < total:
        raise fail(f"{total - pos - body_len} trailing bytes after the body")
    header = SegmentHeader(log_id, seq, created_at_ms, key_id, salt, nonce, prev_digest, body_len)
    return header, pos


def _open(
    data: bytes,
    keyring: KeyRing,
    expect_log_id: str | None,
    expect_seq: int | None,
) -> tuple[SegmentHeader, bytes]:
    """Parse, check placement, authenticate and decrypt: (header, zstd frame)."""
    header, hlen = _parse_header(data, expect_log_id, expect_seq)
    log_id, seq = header.log_id, header.seq
    if (expect_log_id is not None and log_id != expect_log_id) or (
        expect_seq is not None and seq != expect_seq
    ):
        raise ChainError(
            f"misplaced segment: its header says log {log_id} seq {seq}, but it was read as "
            f"log {expect_log_id if expect_log_id is not None else log_id} seq "
            f"{expect_seq if expect_seq is not None else seq} (moved or copied)",
            log_id=expect_log_id if expect_log_id is not None else log_id,
            seq=expect_seq if expect_seq is not None else seq,
        )
    if header.key_id not in keyring:
        raise UnknownKeyError(
            f"encrypted with key id {header.key_id!r}, which the key ring does not hold "
            f"(ids: {sorted(keyring.ids)})",
            log_id=log_id,
            seq=seq,
        )
    try:
        seg_key = derive_segment_key(keyring.key(header.key_id), header.salt, log_id, seq)
    except KeyRingError as e:  # pragma: no cover - ids and sizes were checked above
        raise SegmentFormatError(str(e), log_id=log_id, seq=seq) from e
    mv = memoryview(data)
    plaintext = unseal(seg_key, header.nonce, mv[hlen:], mv[:hlen])
    if plaintext is None:
        raise SegmentAuthError("authentication failed: tampered or wrong key", log_id=log_id,
                               seq=seq)
    return header, plaintext


def _content_size(frame: bytes, log_id: str, seq: int) -> int:
    """The declared decompressed size of the zstd frame (bomb guard)."""
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise SegmentFormatError(f"bad zstd frame: {e}", log_id=log_id, seq=seq) from e
    if size < 0:
        raise SegmentFormatError(
            "zstd frame does not declare its content size", log_id=log_id, seq=seq
        )
    if size > MAX_BODY_SIZE:
        raise SegmentFormatError(
            f"zstd frame declares {size} bytes, over the {MAX_BODY_SIZE}-byte limit",
            log_id=log_id,
            seq=seq,
        )
    return int(size)


def decrypt_segment(data: bytes, keyring: KeyRing, *, expect_log_id: str | None = None,
                    expect_seq: int | None = None) -> tuple[SegmentHeader, bytes]:
    """Authenticate, decrypt and decompress: (header, plaintext body bytes).

    expect_log_id / expect_seq: where the caller found the segment; a header naming
    another log or seq raises ChainError (a segment moved or copied into the wrong place).
    """
    header, frame = _open(data, keyring, expect_log_id, expect_seq)
    log_id, seq = header.log_id, header.seq
    size = _content_size(frame, log_id, seq)
    try:
        plaintext = _decompressor().decompress(frame, allow_extra_data=False)
    except (zstandard.ZstdError, ValueError, MemoryError) as e:
        raise SegmentFormatError(f"zstd: {e}", log_id=log_id, seq=seq) from e
    if len(plaintext) != size:
        raise SegmentFormatError(
            f"zstd frame declared {size} bytes but holds {len(plaintext)}",
            log_id=log_id,
            seq=seq,
        )
    return header, plaintext


def _decode_with(data: bytes, keyring: KeyRing, expect_log_id: str | None,
                 expect_seq: int | None, decode: Callable[[bytes], _T]
                 ) -> tuple[SegmentHeader, _T]:
    """decrypt_segment, then `decode` the body; a codec error now names the segment."""
    header, plaintext = decrypt_segment(
        data, keyring, expect_log_id=expect_log_id, expect_seq=expect_seq
    )
    try:
        return header, decode(plaintext)
    except SegmentFormatError as e:
        raise _recontext(e, SegmentFormatError, header.log_id, header.seq) from e


def decode_segment(data: bytes, keyring: KeyRing, *, expect_log_id: str | None = None,
                   expect_seq: int | None = None) -> tuple[SegmentHeader, Body]:
    """decrypt_segment, then decode the body (manifest and every record)."""
    return _decode_with(data, keyring, expect_log_id, expect_seq, decode_body)


def decode_segment_produce(
    data: bytes,
    keyring: KeyRing,
    tail: tuple[Header, ...],
    offset_header: str | None,
    *,
    expect_log_id: str | None = None,
    expect_seq: int | None = None,
) -> tuple[SegmentHeader, Body]:
    """decode_segment with each Kafka batch as produce() arguments (accel.decode_produce:
    every record's headers end with `tail` and the source-offset header): what a Kafka
    sink writes, without a record object. Errors: decode_segment's."""
    return _decode_with(data, keyring, expect_log_id, expect_seq,
                        lambda plaintext: Body(*decode_produce(plaintext, tail, offset_header)))


def read_manifest(data: bytes, keyring: KeyRing, *, expect_log_id: str | None = None,
                  expect_seq: int | None = None) -> tuple[SegmentHeader, Manifest]:
    """Authenticate the whole segment, but decompress and decode only the manifest."""
    header, frame = _open(data, keyring, expect_log_id, expect_seq)
    log_id, seq = header.log_id, header.seq
    size = _content_size(frame, log_id, seq)
    try:
        with _decompressor().stream_reader(frame) as reader:
            prefix = _read_exactly(reader, min(4, size))
            if len(prefix) == 4:
                mlen = int.from_bytes(prefix, "little")
                prefix += _read_exactly(reader, min(mlen, size - 4))
        return header, decode_manifest(prefix)
    except SegmentFormatError as e:
        raise _recontext(e, SegmentFormatError, log_id, seq) from e
    except (zstandard.ZstdError, ValueError, MemoryError, OSError) as e:
        raise SegmentFormatError(f"zstd: {e}", log_id=log_id, seq=seq) from e


def _read_exactly(reader: zstandard.ZstdDecompressionReader, n: int) -> bytes:
    parts = []
    while n > 0:
        chunk = reader.read(n)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)
