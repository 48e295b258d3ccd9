"""The object source's wake hint (daemon/objsource.py), whatever the store: a prefix held
in memory behind the BucketReader protocol, and a hint the test fires by hand. The SQS
hint of the s3 source over real services: tests/integration/test_objects_notify.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from drstream.daemon.errors import SourceError
from drstream.daemon.objlisting import Entry, key_order
from drstream.daemon.objsource import ObjectRead, ObjectSource, ObjectSourceFields, past
from drstream.daemon.source import Delivery
from tests.contract.conftest import log_context

DAY_S = 86400  # an interval_s no test waits for: only the hint starts a scan


class MemoryConfig(ObjectSourceFields):
    KIND = "memory"


class MemoryReader:
    """A prefix of keys -> bytes, unversioned; `broken` makes every listing fail."""

    url = "memory://bucket/data"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.broken = False

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def versioned(self) -> bool:
        return False

    async def listing(self, versioned: bool, after: str | None
                      ) -> AsyncIterator[tuple[str, list[Entry]]]:
        if self.broken:
            raise SourceError(f"{self.url}: listing refused", retriable=True)
        for key in sorted(self.objects, key=key_order):
            if past(key, after):
                yield key, [self._entry(key)]

    def _entry(self, key: str) -> Entry:
        data = self.objects[key]
        return Entry(key, "", hashlib.sha256(data).hexdigest(), len(data), 1000)

    @contextlib.asynccontextmanager
    async def read(self, key: str, version_id: str) -> AsyncIterator[ObjectRead | None]:
        if key not in self.objects:
            yield None
            return
        data = self.objects[key]

        async def pieces() -> AsyncIterator[bytes]:
            yield data

        yield ObjectRead(etag=self._entry(key).etag, length=len(data), last_modified_ms=1000,
                         content_type=None, metadata={}, headers={}, pieces=pieces())


class HandHint:
    """A WakeHint fired by the test: `fire()` calls what the source gave `start`."""

    def __init__(self) -> None:
        self.wake: Callable[[], None] | None = None
        self.starts = 0
        self.closes = 0

    async def start(self, wake: Callable[[], None]) -> None:
        self.starts += 1
        self.wake = wake

    async def close(self) -> None:
        self.closes += 1

    def fire(self) -> None:
        assert self.wake is not None, "the source did not start its hint"
        self.wake()


def _keys(d: Delivery | None) -> list[str]:
    assert d is not None, "no delivery"
    return [e["key"] for b in d.events for e in b.events]


async def test_the_hint_starts_the_next_scan_before_interval_s(tmp_path: Path) -> None:
    reader, hint = MemoryReader(), HandHint()
    reader.objects["a"] = b"first"
    async with log_context(tmp_path, "hint") as ctx:
        src = ObjectSource(MemoryConfig(interval_s=DAY_S), ctx, reader, hint)
        await src.start(None)
        assert hint.starts == 1
        assert _keys(await src.read(1)) == ["a"]  # the scan every start does
        assert await src.read(0) is None and src.scans == 1  # ...ends; next one in a day

        reader.objects["b"] = b"second"
        assert await src.read(0) is None and src.scans == 1  # not due, not woken
        waiting = asyncio.create_task(src.read(30))
        await asyncio.sleep(0.05)  # read() is in its wait for the next scan
        assert not waiting.done()
        hint.fire()
        # the wake cuts read()'s 30 s wait short (it takes milliseconds): a read that
        # sat out its timeout would still scan at its end, so that is what fails here
        assert _keys(await asyncio.wait_for(waiting, 10)) == ["b"] and src.scans == 2
        assert await src.read(0) is None

        for _ in range(3):  # several wakes before a scan make one scan
            hint.fire()
        assert await src.read(0) is None and src.scans == 3  # nothing changed: no delivery
        assert await src.read(0) is None and src.scans == 3

        reader.objects["c"] = b"third"  # a wake during a scan calls for one more after it
        hint.fire()
        assert _keys(await src.read(0)) == ["c"] and src.scans == 4
        hint.fire()
        assert await src.read(0) is None and src.scans == 4  # scan 4 ends
        assert await src.read(0) is None and src.scans == 5

        await src.close()
        await src.close()
        assert (hint.starts, hint.closes) == (1, 1)


async def test_a_failed_scan_backs_off_whatever_the_hint_says(tmp_path: Path) -> None:
    reader, hint = MemoryReader(), HandHint()
    reader.objects["a"] = b"first"
    reader.broken = True
    async with log_context(tmp_path, "hint") as ctx, \
            ObjectSource(MemoryConfig(interval_s=DAY_S), ctx, reader, hint) as src:
        await src.start(None)
        assert await src.read(0) is None and src.scans == 1  # failed: retry in 0.5 s
        reader.broken = False
        hint.fire()
        assert await src.read(0) is None and src.scans == 1  # still backing off
        assert _keys(await src.read(30)) == ["a"] and src.scans == 2  # after the back-off


async def test_a_probe_of_a_stopped_source_leaves_the_hint_alone(tmp_path: Path) -> None:
    reader, hint = MemoryReader(), HandHint()
    reader.objects["a"] = b"first"
    async with log_context(tmp_path, "hint") as ctx:
        src = ObjectSource(MemoryConfig(), ctx, reader, hint)
        probe = await src.probe({})
        assert probe.reachable and probe.pending_records == 1
        assert (hint.starts, hint.closes) == (0, 0)
