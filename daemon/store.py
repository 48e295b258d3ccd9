"""The object-store interface every log store implements.

Keys are '/'-separated paths relative to the store's root (the store URL's prefix).
Stores follow the one lifecycle of daemon.lifecycle (idempotent start and close, `async
with` does both); the connector registry (daemon.plugins) builds one from its config.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from drstream.daemon.errors import StoreError


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows of one object without reading it."""

    size: int
    modified_ms: int  # when it was written (ms since the epoch)
    retain_until_ms: int | None = None  # Object Lock: no delete before this time


@runtime_checkable
class Store(Protocol):
    url: str

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` with `data` atomically; False (and nothing written) if it exists."""
        ...

    async def get(self, key: str, max_bytes: int | None = None) -> bytes | None:
        """The whole object, or None when it does not exist. Only a durable object is
        returned: readers act on what they get (apply applies it). An object over
        `max_bytes` raises ObjectTooLargeError before its body is read (a format's size
        limit)."""
        ...

    async def get_prefix(self, key: str, length: int) -> tuple[bytes, int] | None:
        """(up to `length` first bytes, the object's full size), None when absent: one
        ranged read (a segment's header without its body)."""
        ...

    async def head(self, key: str) -> ObjectInfo | None:
        """Size, write time and retention of `key`, None when absent."""
        ...

    async def exists(self, key: str) -> bool: ...

    def list(
        self, prefix: str, start_after: str | None = None, limit: int | None = None
    ) -> AsyncIterator[str]:
        """Keys under `prefix`, in lexicographic order, strictly after `start_after`."""
        ...

    def hidden(self, prefix: str, start_after: str | None = None) -> AsyncIterator[str]:
        """Keys under `prefix` (sorted, after `start_after`) that are deleted but whose
        bytes a versioned store still keeps behind a delete marker; none elsewhere."""
        ...

    async def delete(self, key: str) -> None:
        """Remove `key`; absent keys are not an error (a versioned store keeps the bytes
        behind a delete marker)."""
        ...

    async def purge(self, key: str) -> None:
        """Remove `key` and every stored version of it (refused under retention)."""
        ...

    async def check_create_if_absent(self, probe_key: str) -> None:
        """Prove that a second create of one key is refused (fencing rests on it): create
        `probe_key` twice, then remove it; StoreError when the second create succeeds."""
        ...

    async def start(self) -> object:
        """Connect (idempotent); `async with store:` starts and closes it."""
        ...

    async def close(self) -> None:
        """Release connections (idempotent)."""
        ...

    async def __aenter__(self) -> Store: ...

    async def __aexit__(self, *exc: object) -> None: ...


class ObjectTooLargeError(StoreError):
    """An object bigger than anything the format can hold: refused before reading it."""

    def __init__(self, store_url: str, key: str, size: int, limit: int) -> None:
        super().__init__(f"store {store_url}: object {key!r} is {size} bytes, over the "
                         f"{limit}-byte limit of what it can hold; not read", key=key)


async def probe_create_if_absent(store: Store, key: str,
                                 put: Callable[[str, bytes], Awaitable[bool]] | None = None
                                 ) -> None:
    """Create `key` twice with different bytes (through `put`, default put_if_absent) and
    remove it: the second create must be refused, or two writers of one log would
    overwrite each other silently (fencing rests on it)."""
    put = put or store.put_if_absent
    try:
        first = await put(key, b"probe 1")
        second = await put(key, b"probe 2")
    finally:
        await store.purge(key)
    if first and second:
        raise StoreError(
            f"store {store.url}: a second create of {key!r} was accepted: the endpoint does "
            "not honour create-if-absent (If-None-Match: *), so two writers of one log would "
            "overwrite each other silently; refusing to write", key=key)


# A key path segment may not start with this: the file store names its temp files so
# (beside their final name, which link(2) needs), and every store accepts the same keys.
RESERVED_PREFIX = ".drstmp-"


def check_key(key: str) -> str:
    """Reject keys that could escape the store root or that a file tree cannot hold.

    Every store checks keys with this, so they all accept exactly the same keys.
    """
    reason = None
    if not key:
        reason = "is empty"
    elif key.startswith("/"):
        reason = "starts with '/'"
    elif key.endswith("/"):
        reason = "ends with '/'"
    elif "\x00" in key:
        reason = "contains a NUL byte"
    elif ".." in key:
        reason = "contains '..'"
    else:
        parts = key.split("/")
        if any(p in ("", ".") for p in parts):
            reason = "has an empty or '.' path segment"
        elif any(p.startswith(RESERVED_PREFIX) for p in parts):
            reason = f"has a segment starting with the reserved {RESERVED_PREFIX!r}"
    if reason:
        raise StoreError(f"invalid object key {key!r}: {reason}", key=key)
    return key


def check_prefix(prefix: str) -> str:
    """A list prefix is a key head: '' or anything a key could start with."""
    if prefix.startswith("/") or ".." in prefix or "\x00" in prefix:
        raise StoreError(f"invalid list prefix {prefix!r}", key=prefix)
    return prefix
