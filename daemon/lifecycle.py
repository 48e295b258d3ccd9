"""One lifecycle for everything that holds a connection, a thread or a task: stores,
sources, sinks, the log writer, the shipper and the applier.

- `start(...)` connects; it is idempotent (a second call returns what the first did).
- `close()` releases everything; it is idempotent and safe before (or without) start.
- `async with x:` closes x on the way out; entering starts x where start takes no
  arguments (a store, the writer, the shipper, the applier). A source starts at the
  positions the log gives it and a sink may be only peeked at (status), so entering
  one does not start it.
"""

from __future__ import annotations

from typing import Self


class Closing:
    """`async with` support for a class with an idempotent `close()`."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Starting(Closing):
    """`async with` starts on entry (for classes whose `start()` takes no arguments)."""

    async def start(self) -> object:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()  # what started before the failure is released too
            raise
        return self
