"""The embedded default log store: objects are files under one root directory.

Create-if-absent is `link(2)` of a fully written, fsynced temp file onto the final
name: link fails with EEXIST instead of replacing, so a second writer can never
overwrite a segment and a reader never sees a partial object under its final name.
All file I/O runs in worker threads so the event loop never blocks on the disk.

The link is visible before the writer's directory fsync makes it durable: a reader in
that window could act on an object that a power loss removes. So `get` fsyncs the
object's directory before it returns the object (fsync of a directory persists its
entries whichever process calls it; the file itself was fsynced before the link): what
a reader gets is durable, as on S3, where a visible object is. About 0.3 ms per GET
here (ext4), nothing against decrypting the segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import field_validator

from drstream.daemon.errors import ConfigFieldError, StoreError
from drstream.daemon.files import write_fsynced
from drstream.daemon.lifecycle import Starting
from drstream.daemon.plugins import ConnectorConfig
from drstream.daemon.store import RESERVED_PREFIX, check_key, check_prefix

# Temp files live beside their final name (link needs the same filesystem); keys never
# have a path segment with this prefix (daemon.store.check_key), so no key collides.
TMP_PREFIX = RESERVED_PREFIX

# Disk full / quota: an operator can fix these without restarting us, so retry.
_RETRIABLE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN}


class FileStoreConfig(ConnectorConfig):
    type: Literal["file"]
    path: str
    region: str | None = None  # where this disk is, for the allowed_regions guard

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("path must name a directory")
        return v


def file_config_from_url(url: str) -> FileStoreConfig:
    """`file:///abs/path` -> config; hosts and relative paths are refused."""
    parts = urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        raise ConfigFieldError("store", url, "expected file:///absolute/path")
    path = unquote(parts.path)
    if not path.startswith("/") or parts.query or parts.fragment:
        raise ConfigFieldError("store", url, "expected file:///absolute/path")
    return FileStoreConfig(type="file", path=path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path) -> None:
    """mkdir -p, fsyncing each new directory's parent so the new entry survives a crash."""
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue  # a concurrent writer created it (and fsyncs it)
        _fsync_dir(d.parent)


def _write_fsynced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        write_fsynced(fd, data)
    finally:
        os.close(fd)


def _scan_sorted(directory: Path) -> list[tuple[str, str, bool]]:
    """(sort key, name, is_dir) of a directory's entries, temp files left out.

    A directory sorts as 'name/': every key below it starts with that, so a depth-first
    walk in this order yields keys in plain lexicographic order ('a-b' < 'a/c').
    """
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for e in entries:
        if e.name.startswith(TMP_PREFIX):
            continue
        is_dir = e.is_dir(follow_symlinks=False)
        if is_dir or e.is_file(follow_symlinks=False):
            out.append((e.name + "/" if is_dir else e.name, e.name, is_dir))
    out.sort()
    return out


class FileStore(Starting):
    """A Store over a local (or mounted) directory."""

    def __init__(self, config: FileStoreConfig) -> None:
        self.config = config
        self.root = Path(config.path).expanduser().absolute()
        self.url = self.root.as_uri()
        self._started = False

    def __repr__(self) -> str:
        return f"FileStore({self.url})"

    async def start(self) -> None:
        """Check the root: a directory, or nothing yet. It is created (durably) with the
        first object written, so a reader given a mistyped path creates nothing."""
        if not self._started:
            await asyncio.to_thread(self._check_root)
            self._started = True

    async def close(self) -> None:
        self._started = False  # nothing is held open between calls

    def _check_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {self.url}: the root is not a directory")

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _fail(self, op: str, key: str, e: OSError) -> StoreError:
        return StoreError(
            f"store {self.url}: {op} {key!r} failed: {e}",
            key=key, retriable=e.errno in _RETRIABLE_ERRNOS,
        )

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        final = self._path(key)
        try:
            return await asyncio.to_thread(self._put_sync, key, final, bytes(data))
        except StoreError:
            raise
        except OSError as e:
            raise self._fail("put", key, e) from e

    def _put_sync(self, key: str, final: Path, data: bytes) -> bool:
        try:
            _makedirs_durable(final.parent)
        except (FileExistsError, NotADirectoryError) as e:
            raise StoreError(
                f"store {self.url}: key {key!r} cannot be created: a parent path is an "
                "object, not a directory", key=key,
            ) from e
        if final.is_dir():
            raise StoreError(
                f"store {self.url}: key {key!r} cannot be created: it is a directory of "
                "other keys", key=key,
            )
        tmp = final.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            _write_fsynced(tmp, data)
            os.link(tmp, final)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(final.parent)  # makes both the new link and the temp's removal durable
        return True

    async def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return await asyncio.to_thread(_read_durable, path)
        except OSError as e:
            raise self._fail("get", key, e) from e

    async def exists(self, key: str) -> bool:
        path = self._path(key)
        return await asyncio.to_thread(path.is_file)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(_unlink_durable, path)
        except OSError as e:
            raise self._fail("delete", key, e) from e

    async def list(
        self, prefix: str, start_after: str | None = None, limit: int | None = None
    ) -> AsyncIterator[str]:
        check_prefix(prefix)
        if limit is not None and limit <= 0:
            return
        # Start the walk at the deepest directory the prefix names instead of the root.
        base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        count = 0
        async for key in self._walk(base, prefix, start_after):
            yield key
            count += 1
            if limit is not None and count >= limit:
                return

    async def _walk(
        self, base: str, prefix: str, start_after: str | None
    ) -> AsyncIterator[str]:
        directory = self.root.joinpath(*base.split("/")) if base else self.root
        for sort_key, _name, is_dir in await asyncio.to_thread(_scan_sorted, directory):
            full = base + sort_key
            if not _may_match(full, prefix, is_dir) or _entirely_before(
                full, start_after, is_dir
            ):
                continue
            if is_dir:
                async for key in self._walk(full, prefix, start_after):
                    yield key
            else:
                yield full


def _may_match(full: str, prefix: str, is_dir: bool) -> bool:
    if full.startswith(prefix):
        return True
    return is_dir and prefix.startswith(full)  # the prefix continues below this dir


def _entirely_before(full: str, start_after: str | None, is_dir: bool) -> bool:
    """True when this key (or every key below this directory) is <= start_after."""
    if start_after is None:
        return False
    if not is_dir:
        return full <= start_after
    return full < start_after and not start_after.startswith(full)


def _read_durable(path: Path) -> bytes | None:
    """The object, once its directory entry is durable (see the module docstring)."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    _fsync_dir(path.parent)
    return data


def _unlink_durable(path: Path) -> None:
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return
    _fsync_dir(path.parent)
