"""Durable local writes, for whatever must survive a crash once written (key files, the
file store's objects)."""

from __future__ import annotations

import os


def write_fsynced(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` and fsync it (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)
