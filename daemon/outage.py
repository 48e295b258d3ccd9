"""Riding out a store outage: the services (ship, apply) keep running through one.

A store retries a failed request a few times on its own (the S3 store: `max_attempts`,
about 5 s). A longer outage (a region's network, a restarting endpoint) then surfaces as
a retriable StoreError; `PatientStore` retries every operation through it with the one
back-off policy of daemon.retry, for as long as the outage budget allows
(`service.outage_budget_s`, minutes), while `drstream_store_up` is 0 and /readyz says
why. Only what a retry cannot fix (a missing bucket, refused credentials, fencing, a
damaged object) and an outage longer than the budget reach the caller.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, TypeVar

from drstream.daemon.errors import StoreError
from drstream.daemon.lifecycle import Starting
from drstream.daemon.logging import get_logger
from drstream.daemon.metrics import ERRORS, STORE_UP
from drstream.daemon.retry import Backoff, retrying
from drstream.daemon.store import ObjectInfo, Store

log = get_logger("drstream.outage")
T = TypeVar("T")

DEFAULT_OUTAGE_BUDGET_S: Final = 900.0
# Between the store's own quick retries: 0.5-1 s at first, doubling up to 15-30 s, so an
# endpoint that comes back is used again within half a minute.
OUTAGE_BACKOFF: Final = Backoff(base_s=1.0, max_s=30.0)


def _retriable(e: Exception) -> bool:
    return isinstance(e, StoreError) and e.retriable


class PatientStore(Starting):
    """A Store that retries retriable failures of `inner` for up to `budget_s` seconds."""

    def __init__(self, inner: Store, budget_s: float = DEFAULT_OUTAGE_BUDGET_S) -> None:
        self.inner = inner
        self.url = inner.url
        self.budget_s = budget_s
        self.down_since: float | None = None  # monotonic start of the current outage
        self._error = ""
        STORE_UP.set(1)

    def __repr__(self) -> str:
        return f"PatientStore({self.inner!r}, budget {self.budget_s:g}s)"

    def health(self) -> tuple[bool, str]:
        """Readiness: not ready while store requests are failing."""
        if self.down_since is None:
            return True, "ready"
        return False, (f"store {self.url} unavailable for "
                       f"{time.monotonic() - self.down_since:.0f}s: {self._error}")

    def _failed(self, e: Exception, attempt: int, delay: float) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.error("store_outage", store=self.url, error=str(e), budget_s=self.budget_s)
        self._error = str(e)
        ERRORS.labels(type(e).__name__).inc()  # each failed attempt, as uploads count them
        STORE_UP.set(0)
        log.warning("store_outage_retry", store=self.url, attempt=attempt,
                    retry_in_s=round(delay, 2), error=str(e))

    def _answered(self) -> None:
        if self.down_since is not None:
            log.info("store_back", store=self.url,
                     outage_s=round(time.monotonic() - self.down_since, 1))
            self.down_since = None
            STORE_UP.set(1)

    async def _patiently(self, call: Callable[[], Awaitable[T]]) -> T:
        backoff = Backoff(OUTAGE_BACKOFF.base_s, OUTAGE_BACKOFF.max_s,
                          deadline_s=self.budget_s)
        result = await retrying(call, backoff, retriable=_retriable, on_retry=self._failed)
        self._answered()
        return result

    async def _iterate(self, open_: Callable[[str | None, int | None], AsyncIterator[str]],
                       start_after: str | None, limit: int | None = None
                       ) -> AsyncIterator[str]:
        """A sorted listing (of up to `limit` keys), resumed after the last key it yielded
        when a page fails."""
        last = start_after
        started = time.monotonic()
        attempt = count = 0
        while True:
            try:
                async for key in open_(last, None if limit is None else limit - count):
                    last, count = key, count + 1
                    yield key
                self._answered()
                return
            except StoreError as e:
                attempt += 1
                if not e.retriable or time.monotonic() - started > self.budget_s:
                    raise
                delay = OUTAGE_BACKOFF.delay(attempt)
                self._failed(e, attempt, delay)
                await asyncio.sleep(delay)

    # -- the Store interface ----------------------------------------------------------

    async def start(self) -> object:
        return await self._patiently(self.inner.start)

    async def close(self) -> None:
        await self.inner.close()

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        return await self._patiently(lambda: self.inner.put_if_absent(key, data))

    async def get(self, key: str, max_bytes: int | None = None) -> bytes | None:
        return await self._patiently(lambda: self.inner.get(key, max_bytes))

    async def get_prefix(self, key: str, length: int) -> tuple[bytes, int] | None:
        return await self._patiently(lambda: self.inner.get_prefix(key, length))

    async def head(self, key: str) -> ObjectInfo | None:
        return await self._patiently(lambda: self.inner.head(key))

    async def exists(self, key: str) -> bool:
        return await self._patiently(lambda: self.inner.exists(key))

    async def delete(self, key: str) -> None:
        await self._patiently(lambda: self.inner.delete(key))

    async def purge(self, key: str) -> None:
        await self._patiently(lambda: self.inner.purge(key))

    async def check_create_if_absent(self, probe_key: str) -> None:
        await self._patiently(lambda: self.inner.check_create_if_absent(probe_key))

    def list(self, prefix: str, start_after: str | None = None,
             limit: int | None = None) -> AsyncIterator[str]:
        return self._iterate(lambda after, left: self.inner.list(prefix, after, left),
                             start_after, limit)

    def hidden(self, prefix: str, start_after: str | None = None) -> AsyncIterator[str]:
        return self._iterate(lambda after, _: self.inner.hidden(prefix, after), start_after)
