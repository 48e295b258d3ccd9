"""Shards: a log set of N ordinary logs, one per ship/apply pair (docs/shards.md).

A stable hash of (topic, partition) picks the shard that ships a Kafka partition; each
shard writes its own log `<log_id>-s<k>of<N>` (own chain, own fencing, own blobs), and
apply shard k applies that log with its own transactional id and checkpoint. Sources
and sinks that are not partitioned (the model registry) belong to shard 0.

The hash is SHA-256 of `topic NUL partition`: the same in every process, host and Python
version (`hash()` is salted per process), and spread evenly whatever the topic names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

MAX_SHARDS = 256
# Manifest `extra` keys of a shard count change (daemon/reshard.py): an old log's last
# segment (no ship writes after it) and a new log's first (where it takes over from).
SEALED = "drstream.sealed"
HANDOVER = "drstream.handover"
# What a shard appends to the set's log_id: "-s12of256" is at most 9 characters.
SUFFIX_MAX = len(f"-s{MAX_SHARDS - 1}of{MAX_SHARDS}")


def shard_of(topic: str, partition: int, count: int) -> int:
    """The shard (0 .. count-1) that owns a partition."""
    if count == 1:
        return 0
    digest = hashlib.sha256(f"{topic}\0{partition}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


def shard_log_id(base: str, index: int, count: int) -> str:
    """The log of shard `index` of a set of `count`; a set of one is the plain log."""
    return base if count == 1 else f"{base}-s{index}of{count}"


@dataclass(frozen=True)
class Shard:
    """One shard of a set: which partitions it ships, how it is named."""

    index: int
    count: int

    def owns(self, topic: str, partition: int) -> bool:
        return shard_of(topic, partition, self.count) == self.index

    @property
    def label(self) -> str:
        """How messages name it: `shard 1/3`."""
        return f"shard {self.index}/{self.count}"


def parse_shard(value: str) -> tuple[int, int | None]:
    """`K` or `K/N` (the command line's --shard; a systemd instance, a pod ordinal)."""
    index, sep, count = value.partition("/")
    if not index.isdigit() or (sep and not count.isdigit()):
        raise ValueError("must be K or K/N with whole numbers, e.g. 1 or 1/3")
    n = int(count) if sep else None
    if n is not None and not 1 <= n <= MAX_SHARDS:
        raise ValueError(f"the shard count N must be 1 to {MAX_SHARDS}")
    if n is not None and int(index) >= n:
        raise ValueError("the shard index K must be below the count N (shards are 0 .. N-1)")
    return int(index), n
