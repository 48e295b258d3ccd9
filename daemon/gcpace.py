"""Paced garbage collection for the long loops of ship and apply.

Both loops hold many small container objects for a short while: ship the header lists of
buffered records (up to buffer_max_bytes, ~64k records at 1 KiB), apply the decoded
records waiting in its prefetch queue. Python's automatic collector traced them again and
again: about a fifth of apply's CPU in a profile of a 0.5 GiB replay, and 16% of ship's
per-record CPU including zstd and AES in benchmarks/ship_gc.py (347 ms of collections per
200k records). These objects hold no reference cycles, so while a loop runs the automatic
collector is off and a full collection runs every GC_INTERVAL_S instead (60 ms of CPU
with ship's buffer full: about 1% of a core).

The objects alive when the first loop starts (imports, config, clients: ~70k) are frozen
out of those collections (gc.freeze): 60 -> 24 ms each. They are moved back when the last
loop ends; until then a reference cycle among them is not collected, which start-up
objects, alive for the whole process, do not form.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator

GC_INTERVAL_S = 5.0
_pause = {"count": 0, "was_enabled": True}  # loops running in this process


@contextlib.asynccontextmanager
async def paced_gc(interval_s: float = GC_INTERVAL_S) -> AsyncIterator[None]:
    """Automatic garbage collection off and what is alive now frozen; a full collection
    every `interval_s` instead. Nested uses (ship and apply, or several appliers, in one
    process) restore the collector once, when the last one ends."""
    if _pause["count"] == 0:
        _pause["was_enabled"] = gc.isenabled()
        gc.collect()  # garbage from start-up is freed, not frozen
        gc.freeze()
    _pause["count"] += 1
    gc.disable()

    async def collect() -> None:
        while True:
            await asyncio.sleep(interval_s)
            gc.collect()

    task = asyncio.create_task(collect())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        _pause["count"] -= 1
        if _pause["count"] == 0:
            gc.unfreeze()
            if _pause["was_enabled"]:
                gc.enable()
