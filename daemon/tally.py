"""What a replay of an event stream (a registry, a bucket prefix) keeps count of: its
StreamFilter (daemon.plugins) reads count, bytes and the newest change from one tally."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar


@dataclass
class EventTally:
    """What a replay of an event stream (a registry, a bucket prefix) kept: events, bytes,
    and the write time of the newest kept segment carrying the stream's positions (the
    stream as its source last saw it: the RPO at a drill point)."""

    events: int = 0
    bytes: int = 0
    newest_ms: int | None = None

    def shipped_by(self, created_at_ms: int) -> None:
        """A kept segment carries the stream's positions: its source had shipped every
        change it saw up to the segment's write time."""
        self.newest_ms = created_at_ms if self.newest_ms is None \
            else max(self.newest_ms, created_at_ms)


T = TypeVar("T", bound=EventTally)


class EventFilter(Generic[T]):
    """The StreamFilter tallies (count, bytes, newest_ms) of an event stream, read from
    its `tally`."""

    tally: T

    @property
    def count(self) -> int:
        return self.tally.events

    @property
    def bytes(self) -> int:
        return self.tally.bytes

    @property
    def newest_ms(self) -> int | None:
        return self.tally.newest_ms
