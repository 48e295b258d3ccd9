"""Retry with back-off: the one loop that segment uploads, store requests and registry
calls retry through, each with its own numbers.

Delays grow exponentially from `base_s` to `max_s` with "equal jitter": at least half the
capped step (so back-off really grows) plus a random half, so callers that failed together
do not retry together.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# A polling source (a registry, a bucket listing) polls again this soon after a failed
# poll, doubling per failure up to its own cap or its poll interval, whichever is shorter.
POLL_RETRY_FIRST_S = 0.5


@dataclass(frozen=True)
class Backoff:
    base_s: float
    max_s: float
    attempts: int | None = None  # give up after this many attempts (None: no limit)
    deadline_s: float | None = None  # or once this long has passed since the first try

    def step(self, attempt: int) -> float:
        """The capped exponential step after failed attempt number `attempt` (from 1)."""
        return float(min(self.max_s, self.base_s * 2.0 ** (attempt - 1)))

    def delay(self, attempt: int) -> float:
        step = self.step(attempt)
        return step / 2 + random.uniform(0, step / 2)

    def exhausted(self, attempt: int, elapsed_s: float) -> bool:
        return (self.attempts is not None and attempt >= self.attempts) or (
            self.deadline_s is not None and elapsed_s > self.deadline_s)


def poll_retry_s(failures: int, interval_s: float, most_s: float) -> float:
    """How long a polling source waits after `failures` failed polls in a row."""
    return Backoff(POLL_RETRY_FIRST_S, min(most_s, interval_s)).step(failures)


async def retrying(call: Callable[[], Awaitable[T]], backoff: Backoff, *,
                   retriable: Callable[[Exception], bool],
                   on_retry: Callable[[Exception, int, float], None] | None = None) -> T:
    """`await call()` until it returns; an exception that is not `retriable`, or one that
    comes once `backoff` is exhausted, is raised. `on_retry(error, attempt, delay_s)` is
    told before each wait (to log it)."""
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except Exception as e:
            if not retriable(e) or backoff.exhausted(attempt, time.monotonic() - started):
                raise
            delay = backoff.delay(attempt)
            if on_retry is not None:
                on_retry(e, attempt, delay)
            await asyncio.sleep(delay)
