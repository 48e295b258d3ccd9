"""The object-store interface every log store implements.

Keys are '/'-separated paths relative to the store's root (the store URL's prefix).
Stores follow the one lifecycle of daemon.lifecycle (idempotent start and close, `async
with` does both); the connector registry (daemon.plugins) builds one from its config.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from drstream.daemon.errors import StoreError


@runtime_checkable
class Store(Protocol):
    url: str

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` with `data` atomically; False (and nothing written) if it exists."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The whole object, or None when it does not exist. Only a durable object is
        returned: readers act on what they get (apply applies it)."""
        ...

    async def exists(self, key: str) -> bool: ...

    def list(
        self, prefix: str, start_after: str | None = None, limit: int | None = None
    ) -> AsyncIterator[str]:
        """Keys under `prefix`, in lexicographic order, strictly after `start_after`."""
        ...

    async def delete(self, key: str) -> None:
        """Remove `key`; absent keys are not an error."""
        ...

    async def start(self) -> object:
        """Connect (idempotent); `async with store:` starts and closes it."""
        ...

    async def close(self) -> None:
        """Release connections (idempotent)."""
        ...

    async def __aenter__(self) -> Store: ...

    async def __aexit__(self, *exc: object) -> None: ...


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
