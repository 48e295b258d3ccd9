"""Content-addressed, encrypted chunks beside the log (model artifacts, registry state).

A blob is one chunk of at most MAX_CHUNK bytes, named by the SHA-256 of its plaintext, so
a chunk that is already stored is not uploaded again (unchanged model files are shipped
once). Object key `blobs/<log_id>/<id[:2]>/<id>`, outside `logs/` so segment listings
never see blobs. Layout, all integers big-endian:

    magic "DRB1" | u8 version | u8 len(key_id) | key_id | salt[16] | nonce[12]
    | AES-256-GCM(HKDF-SHA256(master, salt, "drstream/blob/v1" | u8 len(log_id) | log_id
                               | id ASCII), nonce, zstd(plaintext), aad = header | id ASCII)

The id in the key and in the AAD binds the ciphertext to its name: a blob copied to
another name fails authentication. Segments name blobs; a blob is written (durably) before
any segment that names it, so a durable segment never points at a missing blob.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import struct
from typing import Final

import zstandard

from drstream.daemon import envelope
from drstream.daemon.errors import BlobError
from drstream.daemon.keyring import KeyRing
from drstream.daemon.layout import blob_key
from drstream.daemon.store import Store

MAGIC: Final = b"DRB1"
VERSION: Final = 1
MAX_CHUNK: Final = 16 << 20
# Largest stored blob a reader downloads: header (255-byte key id), zstd's worst case for
# a MAX_CHUNK chunk (input + 1/128, above ZSTD_compressBound) and the GCM tag.
MAX_STORED_BLOB: Final = 6 + 255 + 28 + MAX_CHUNK + MAX_CHUNK // 128 + (64 << 10)
HKDF_INFO_PREFIX: Final = b"drstream/blob/v1"
BLOB_ID_RE: Final = re.compile(r"[0-9a-f]{64}")
_PRE_S = struct.Struct(">4sBB")


def blob_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _derive(master: bytes, salt: bytes, log_id: str, bid: str) -> bytes:
    return envelope.derive(master, salt, envelope.info(HKDF_INFO_PREFIX, log_id,
                                                       bid.encode("ascii")))


def encode_blob(data: bytes, keyring: KeyRing, log_id: str, zstd_level: int = 1) -> bytes:
    if len(data) > MAX_CHUNK:
        raise BlobError(f"chunk of {len(data)} bytes is over the {MAX_CHUNK}-byte limit")
    bid = blob_id(data)
    key_id = keyring.active
    salt, nonce = envelope.fresh_salt_and_nonce()
    header = _PRE_S.pack(MAGIC, VERSION, len(key_id)) + key_id.encode() + salt + nonce
    key = _derive(keyring.key(key_id), salt, log_id, bid)
    compressed = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True).compress(data)
    return header + envelope.seal(key, nonce, compressed, header + bid.encode("ascii"))


def decode_blob(raw: bytes, keyring: KeyRing, log_id: str, bid: str) -> bytes:
    where = blob_key(log_id, bid)
    if len(raw) < _PRE_S.size:
        raise BlobError("truncated header", key=where)
    magic, version, klen = _PRE_S.unpack_from(raw)
    if magic != MAGIC or version != VERSION:
        raise BlobError(f"not a blob (magic {magic!r}, version {version})", key=where)
    pos = _PRE_S.size
    key_id = raw[pos:pos + klen].decode("ascii", "replace")
    pos += klen
    salt = raw[pos:pos + envelope.SALT_SIZE]
    pos += envelope.SALT_SIZE
    nonce = raw[pos:pos + envelope.NONCE_SIZE]
    pos += envelope.NONCE_SIZE
    if len(raw) < pos + envelope.TAG_SIZE:
        raise BlobError("truncated", key=where)
    if key_id not in keyring:
        raise BlobError(f"key id {key_id!r} is not in the key ring", key=where)
    key = _derive(keyring.key(key_id), salt, log_id, bid)
    compressed = envelope.unseal(key, nonce, raw[pos:], raw[:pos] + bid.encode("ascii"))
    if compressed is None:
        raise BlobError("authentication failed (tampered, moved, or wrong key)", key=where)
    try:
        declared = zstandard.frame_content_size(compressed)
        # max_output_size only binds frames that do not declare their size: check the
        # declaration first, so no frame decompresses past the chunk limit.
        if declared > MAX_CHUNK:
            raise BlobError(f"zstd frame declares {declared} bytes, over the {MAX_CHUNK}-byte "
                            "chunk limit", key=where)
        data = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=MAX_CHUNK)
    except zstandard.ZstdError as e:
        raise BlobError(f"zstd: {e}", key=where) from e
    if len(data) > MAX_CHUNK:
        raise BlobError(f"{len(data)} bytes, over the {MAX_CHUNK}-byte chunk limit", key=where)
    if blob_id(data) != bid:
        raise BlobError("content does not match its SHA-256 name", key=where)
    return data


class BlobStore:
    """Put and get blobs of one log in a store."""

    def __init__(self, store: Store, log_id: str, keyring: KeyRing, zstd_level: int = 1) -> None:
        self.store = store
        self.log_id = log_id
        self.keyring = keyring
        self.zstd_level = zstd_level
        self.uploaded = 0  # chunks written by this instance
        self.skipped = 0  # chunks found already stored

    def key(self, bid: str) -> str:
        return blob_key(self.log_id, bid)

    async def has(self, bid: str) -> bool:
        return await self.store.exists(self.key(bid))

    async def put(self, data: bytes) -> str:
        """Store one chunk (at most MAX_CHUNK bytes) unless already stored; its id."""
        bid = blob_id(data)
        if await self.has(bid):
            self.skipped += 1
            return bid
        raw = await asyncio.to_thread(encode_blob, data, self.keyring, self.log_id,
                                      self.zstd_level)
        # A concurrent writer of the same content stored identical plaintext: fine either way.
        await self.store.put_if_absent(self.key(bid), raw)
        self.uploaded += 1
        return bid

    async def get(self, bid: str) -> bytes:
        if not BLOB_ID_RE.fullmatch(bid):
            raise BlobError(f"malformed blob id {bid[:80]!r}")
        raw = await self.store.get(self.key(bid), max_bytes=MAX_STORED_BLOB)
        if raw is None:
            raise BlobError("missing from the store", key=self.key(bid))
        return await asyncio.to_thread(decode_blob, raw, self.keyring, self.log_id, bid)
