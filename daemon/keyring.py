"""Master keys by id, how they are loaded, and the per-segment key derivation.

A key is 32 random bytes (AES-256). On disk and in environment variables it is one line:
the standard base64 (RFC 4648 section 4, with padding) of the 32 bytes, 44 characters,
optionally followed by a newline. Surrounding ASCII whitespace is ignored; anything else
(another line, internal spaces, URL-safe alphabet, wrong length) is refused.

Key references (config values, never the key itself), resolved by daemon.secrets:
  file:/path        a key file; refused if group or other may read or write it (mode & 0o077)
  env:NAME          the base64 key in environment variable NAME
  credential:NAME   a systemd credential: the file $CREDENTIALS_DIRECTORY/NAME
                    (LoadCredential=NAME:/path in the unit), refused like a key file

Key material never appears in a repr, str, log line or exception message: errors name the
reference (path, variable), never the content.

Per-segment key (docs/format.md section "Keys"):
    HKDF-SHA256(ikm = master key, salt = the 16-byte salt of the segment header,
                info = b"drstream/segment/v1" || u8 len(log_id) || log_id (UTF-8)
                       || u64 big-endian seq,
                length = 32)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import struct
from collections.abc import Iterator, Mapping
from typing import Final

from drstream.daemon import envelope
from drstream.daemon.envelope import KEY_SIZE
from drstream.daemon.errors import KeyRingError
from drstream.daemon.files import write_fsynced
from drstream.daemon.secrets import SCHEMES, SecretError, resolve

__all__ = [
    "HKDF_INFO_PREFIX",
    "KEY_ID_RE",
    "KEY_SIZE",
    "KeyRing",
    "check_key_id",
    "derive_segment_key",
    "generate_key_file",
    "hkdf_info",
    "load_key",
]

KEY_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
HKDF_INFO_PREFIX: Final = b"drstream/segment/v1"
_MAX_KEY_TEXT: Final = 4096  # a key line is 44 characters; anything this long is not a key
_SEQ_S = struct.Struct(">Q")


def check_key_id(key_id: object) -> str:
    """The key id itself if it is valid ([A-Za-z0-9._-]{1,64}), else KeyRingError."""
    if not isinstance(key_id, str) or not KEY_ID_RE.fullmatch(key_id):
        raise KeyRingError(f"invalid key id {key_id!r}: must match [A-Za-z0-9._-]{{1,64}}")
    return key_id


class KeyRing:
    """Several master keys by id: one active (encrypts), all usable to decrypt.

    The key bytes are private: no repr, str or error shows them.
    """

    __slots__ = ("__keys", "_active")

    def __init__(self, keys: Mapping[str, bytes], active: str) -> None:
        if not keys:
            raise KeyRingError("key ring is empty: at least one key is needed")
        checked: dict[str, bytes] = {}
        for key_id, key in keys.items():
            check_key_id(key_id)
            if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
                size = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
                raise KeyRingError(f"key {key_id!r} must be {KEY_SIZE} bytes (got {size})")
            checked[key_id] = bytes(key)
        if active not in checked:
            raise KeyRingError(
                f"active key id {active!r} is not in the key ring (ids: {sorted(checked)})"
            )
        self.__keys = checked
        self._active = active

    @classmethod
    def from_refs(cls, refs: Mapping[str, str], active: str) -> KeyRing:
        """Load every key of `refs` (key id -> reference such as "file:/etc/drstream/k1")."""
        return cls({key_id: load_key(ref) for key_id, ref in refs.items()}, active)

    @property
    def active(self) -> str:
        """The id of the key that encrypts new segments."""
        return self._active

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self.__keys)

    def __contains__(self, key_id: object) -> bool:
        return isinstance(key_id, str) and key_id in self.__keys

    def __len__(self) -> int:
        return len(self.__keys)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self.__keys))

    def key(self, key_id: str) -> bytes:
        """The master key `key_id`; KeyRingError if the ring does not hold it."""
        try:
            return self.__keys[key_id]
        except KeyError:
            raise KeyRingError(
                f"key id {key_id!r} is not in the key ring (ids: {sorted(self.__keys)})"
            ) from None

    def __repr__(self) -> str:
        return f"KeyRing(ids={sorted(self.__keys)!r}, active={self._active!r})"

    __str__ = __repr__


def hkdf_info(log_id: str, seq: int) -> bytes:
    """b"drstream/segment/v1" || u8 len(log_id) || log_id UTF-8 || u64 BE seq."""
    raw = log_id.encode("utf-8")
    if not 1 <= len(raw) <= 255:
        raise KeyRingError(f"log id must be 1..255 bytes for key derivation, got {len(raw)}")
    if not 0 <= seq < 2**64:
        raise KeyRingError(f"seq {seq} does not fit in 64 bits")
    return envelope.info(HKDF_INFO_PREFIX, log_id, _SEQ_S.pack(seq))


def derive_segment_key(master: bytes, salt: bytes, log_id: str, seq: int) -> bytes:
    """The AES-256 key of one segment: HKDF-SHA256(master, salt, hkdf_info(log_id, seq))."""
    if len(master) != KEY_SIZE:
        raise KeyRingError(f"master key must be {KEY_SIZE} bytes")
    if len(salt) != envelope.SALT_SIZE:
        raise KeyRingError(f"salt must be 16 bytes, got {len(salt)}")
    return envelope.derive(master, salt, hkdf_info(log_id, seq))


def _parse_key_text(text: bytes, ref: str) -> bytes:
    """One line of standard base64 encoding exactly 32 bytes."""
    stripped = text.strip(b" \t\r\n")
    if not stripped:
        raise KeyRingError(f"key {ref} is empty")
    try:
        key = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise KeyRingError(
            f"key {ref} is not one line of standard base64 (expected {KEY_SIZE} bytes "
            f"encoded as 44 characters)"
        ) from None
    if len(key) != KEY_SIZE:
        raise KeyRingError(f"key {ref} decodes to {len(key)} bytes, expected {KEY_SIZE}")
    return key


def load_key(ref: str) -> bytes:
    """The 32-byte key named by `ref` (file:/path, env:NAME or credential:NAME; resolved
    by daemon.secrets, which refuses files group or others may read)."""
    try:
        text = resolve(ref, max_bytes=_MAX_KEY_TEXT)
    except SecretError as e:
        # a value that is not a reference may be the key itself: never echo it
        shown = ref if isinstance(ref, str) and ref.startswith(SCHEMES) else "reference"
        raise KeyRingError(f"key {shown}: {e}") from None
    return _parse_key_text(text, ref)


def generate_key_file(path: str | os.PathLike[str]) -> None:
    """Write a fresh random key to `path` with mode 0600; never overwrites a file.

    The key is written to a temporary file in the same directory (O_CREAT|O_EXCL, mode
    0600), flushed to disk, then hard-linked to `path` (which fails if `path` exists), so
    `path` appears complete or not at all.
    """
    target = os.fspath(path)
    directory = os.path.dirname(target) or "."
    if os.path.lexists(target):
        raise KeyRingError(f"refusing to overwrite existing key file {target}")
    line = base64.b64encode(os.urandom(KEY_SIZE)) + b"\n"
    tmp = os.path.join(directory, f".{os.path.basename(target)}.{os.urandom(6).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o600)
    except OSError as e:
        raise KeyRingError(f"cannot create key file in {directory}: {e.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask may only remove bits; make it exact
            write_fsynced(fd, line)
        finally:
            os.close(fd)
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise KeyRingError(f"refusing to overwrite existing key file {target}") from None
        _fsync_dir(directory)
    except OSError as e:
        raise KeyRingError(f"cannot write key file {target}: {e.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - directories that cannot be opened (some platforms)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
