"""The authenticated envelope of everything drstream encrypts: segments and blobs.

    key        = HKDF-SHA256(master key, salt[16],
                             info = domain | u8 len(log_id) | log_id (UTF-8) | context)
    ciphertext = AES-256-GCM(key, nonce[12], plaintext, aad)   (16-byte tag at the end)

The domain string ("drstream/segment/v1", "drstream/blob/v1") keeps a key derived for one
kind of object useless for another; the context binds the key to one object (a segment's
seq, a blob's id). Byte layouts of the objects around it: docs/format.md.
"""

from __future__ import annotations

import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_SIZE: Final = 32  # AES-256
SALT_SIZE: Final = 16
NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16


def info(domain: bytes, log_id: str, context: bytes) -> bytes:
    """domain | u8 len(log_id) | log_id (UTF-8) | context."""
    raw = log_id.encode("utf-8")
    return domain + bytes((len(raw),)) + raw + context


def derive(master: bytes, salt: bytes, info: bytes) -> bytes:
    """The object key: HKDF-SHA256(master, salt, info), 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(master)


def fresh_salt_and_nonce() -> tuple[bytes, bytes]:
    return os.urandom(SALT_SIZE), os.urandom(NONCE_SIZE)


def seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, nonce: bytes, ciphertext: bytes | memoryview,
           aad: bytes | memoryview) -> bytes | None:
    """The plaintext, or None when authentication fails (tampered, moved, wrong key):
    the caller says which object failed."""
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        return None
