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

Symbolic links below the root are refused everywhere: every path is opened one component
at a time with O_NOFOLLOW, so a link can neither redirect a read nor show a reader other
bytes than the listing names (a link is listed, and reading it is an error naming it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import unquote, urlsplit

from pydantic import field_validator

from drstream.daemon.errors import ConfigFieldError, StoreError
from drstream.daemon.files import write_fsynced
from drstream.daemon.lifecycle import Starting
from drstream.daemon.plugins import Connector, ConnectorConfig, StoreType
from drstream.daemon.store import (
    RESERVED_PREFIX,
    ObjectInfo,
    ObjectTooLargeError,
    check_key,
    check_prefix,
    probe_create_if_absent,
)

# Temp files live beside their final name (link needs the same filesystem); keys never
# have a path segment with this prefix (daemon.store.check_key), so no key collides.
TMP_PREFIX = RESERVED_PREFIX

T = TypeVar("T")

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
    """mkdir -p of the root, fsyncing each new directory's parent so it survives a crash."""
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


def _open_dirs(root: Path, parts: list[str]) -> int:
    """The directory root/parts..., created (durably) where missing, never through a link."""
    return _open_below(root, parts, os.O_RDONLY | os.O_DIRECTORY, make_dirs=True)


def _exists_as(dir_fd: int, name: str, kind: Callable[[int], bool]) -> bool:
    try:
        return kind(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _scan_sorted(directory: Path) -> list[tuple[str, str, bool]]:
    """(sort key, name, is_dir) of a directory's entries, temp files left out.

    A directory sorts as 'name/': every key below it starts with that, so a depth-first
    walk in this order yields keys in plain lexicographic order ('a-b' < 'a/c'). A
    symbolic link is listed as a key, never followed: reading it is refused, so a reader
    and the listing never disagree about what is stored.
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
        if is_dir or e.is_file(follow_symlinks=False) or e.is_symlink():
            out.append((e.name + "/" if is_dir else e.name, e.name, is_dir))
    out.sort()
    return out


class _Link(OSError):
    """A path component below the root is a symbolic link."""


def _open_below(root: Path, parts: list[str], flags: int, make_dirs: bool = False) -> int:
    """Open root/parts[0]/.../parts[-1] one component at a time, never following a link
    (O_NOFOLLOW on each): a link anywhere below the root raises _Link. With `make_dirs`
    every component is a directory, created (durably) where missing."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            want = flags if last else os.O_RDONLY | os.O_DIRECTORY
            if make_dirs:
                _mkdir_at(fd, part)
            try:
                nxt = os.open(part, want | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                if _exists_as(fd, part, stat.S_ISLNK):
                    raise _Link(errno.ELOOP, "is a symbolic link", "/".join(parts[: i + 1])
                                ) from None
                if make_dirs:
                    raise NotADirectoryError(e.errno, e.strerror, part) from e
                raise
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _mkdir_at(dir_fd: int, name: str) -> None:
    try:
        os.mkdir(name, dir_fd=dir_fd)
        os.fsync(dir_fd)  # the new entry survives a crash
    except FileExistsError:
        pass  # there already (or made by a concurrent writer, which fsyncs it)


_ABSENT = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


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

    def _fail(self, op: str, key: str, e: OSError) -> StoreError:
        return StoreError(
            f"store {self.url}: {op} {key!r} failed: {e}",
            key=key, retriable=e.errno in _RETRIABLE_ERRNOS,
        )

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        parts = self._parts(key)
        return await self._run("put", key, lambda: self._put_sync(key, parts, bytes(data)))

    def _put_sync(self, key: str, parts: list[str], data: bytes) -> bool:
        try:
            _makedirs_durable(self.root)  # made with the first object (start creates nothing)
            fd = _open_dirs(self.root, parts[:-1])
        except (FileExistsError, NotADirectoryError) as e:
            raise StoreError(
                f"store {self.url}: key {key!r} cannot be created: a parent path is an "
                "object, not a directory", key=key,
            ) from e
        try:
            return self._link_new(fd, key, parts[-1], data)
        finally:
            os.close(fd)

    def _link_new(self, dir_fd: int, key: str, name: str, data: bytes) -> bool:
        """Write a temp file beside `name`, fsync it, link(2) it to `name` (EEXIST: not
        created), and fsync the directory: the new link and the temp's removal."""
        if _exists_as(dir_fd, name, stat.S_ISDIR):
            raise StoreError(
                f"store {self.url}: key {key!r} cannot be created: it is a directory of "
                "other keys", key=key,
            )
        tmp = f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
            try:
                write_fsynced(fd, data)
            finally:
                os.close(fd)
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
        os.fsync(dir_fd)
        return True

    def _refused(self, op: str, key: str, e: _Link) -> StoreError:
        return StoreError(f"store {self.url}: {op} {key!r} refused: {e.filename} is a "
                          "symbolic link (the file store never follows links)", key=key)

    async def _run(self, op: str, key: str, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except _Link as e:
            raise self._refused(op, key, e) from None
        except OSError as e:
            raise self._fail(op, key, e) from e

    def _parts(self, key: str) -> list[str]:
        return check_key(key).split("/")

    async def get(self, key: str, max_bytes: int | None = None) -> bytes | None:
        parts = self._parts(key)

        def read() -> bytes | None:
            data = self._read(parts, None, max_bytes, key)
            if data is None:
                return None
            self._fsync_parent(parts)  # what a reader acts on is durable (module docstring)
            return data[0]

        return await self._run("get", key, read)

    def _fsync_parent(self, parts: list[str]) -> None:
        fd = _open_below(self.root, parts[:-1], os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def get_prefix(self, key: str, length: int) -> tuple[bytes, int] | None:
        parts = self._parts(key)
        return await self._run("get", key, lambda: self._read(parts, length, None, key))

    def _open_regular(self, parts: list[str]) -> tuple[int, os.stat_result] | None:
        """(fd, stat) of the regular file at `parts`, None when absent or not a file."""
        try:
            fd = _open_below(self.root, parts, os.O_RDONLY | os.O_NONBLOCK)
        except _ABSENT:
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        if stat.S_ISREG(st.st_mode):
            return fd, st
        os.close(fd)
        return None

    def _stat(self, parts: list[str]) -> os.stat_result | None:
        opened = self._open_regular(parts)
        if opened is None:
            return None
        os.close(opened[0])
        return opened[1]

    def _read(self, parts: list[str], length: int | None, max_bytes: int | None,
              key: str) -> tuple[bytes, int] | None:
        opened = self._open_regular(parts)
        if opened is None:
            return None
        fd, st = opened
        try:
            if max_bytes is not None and st.st_size > max_bytes:
                raise ObjectTooLargeError(self.url, key, st.st_size, max_bytes)
            want = st.st_size if length is None else min(length, st.st_size)
            chunks, got = [], 0
            while got < want:
                chunk = os.read(fd, want - got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks), st.st_size
        finally:
            os.close(fd)

    async def head(self, key: str) -> ObjectInfo | None:
        parts = self._parts(key)

        def stat_() -> ObjectInfo | None:
            st = self._stat(parts)
            if st is None:
                return None
            return ObjectInfo(size=st.st_size, modified_ms=st.st_mtime_ns // 1_000_000)

        return await self._run("head", key, stat_)

    async def exists(self, key: str) -> bool:
        return await self.head(key) is not None

    async def delete(self, key: str) -> None:
        parts = self._parts(key)
        await self._run("delete", key, lambda: self._unlink(parts))

    async def purge(self, key: str) -> None:
        await self.delete(key)  # no versions: a deleted file is gone

    def _unlink(self, parts: list[str]) -> None:
        try:
            fd = _open_below(self.root, parts[:-1], os.O_RDONLY | os.O_DIRECTORY)
        except _ABSENT:
            return
        try:
            try:
                os.unlink(parts[-1], dir_fd=fd)
            except _ABSENT:
                return
            os.fsync(fd)
        finally:
            os.close(fd)

    async def hidden(self, prefix: str, start_after: str | None = None) -> AsyncIterator[str]:
        """A directory keeps no versions: nothing is ever hidden."""
        check_prefix(prefix)
        nothing: tuple[str, ...] = ()
        for key in nothing:
            yield key

    async def check_create_if_absent(self, probe_key: str) -> None:
        await probe_create_if_absent(self, probe_key)

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


CONNECTOR = Connector(
    name="file",
    store=StoreType("file", FileStoreConfig, FileStore, file_config_from_url, ("file",)),
)
