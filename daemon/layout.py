"""Where everything lives in a log store: the one place that spells an object key.

    logs/<log_id>/<seq:020d>.seg          segments, seq = 1, 2, 3 ... contiguous
    blobs/<log_id>/<id[:2]>/<id>          content-addressed encrypted chunks (blobs.py)
    audit/<time>-<action>-<log_id>-<random>.json   operator actions (drill, failover,
                                          prune, log truncate)
    replays/<log_id>/<name>/<seq:020d>.json  what a named replay still needs (prune keeps it)
    probe/<log_id>-<random>               a writer's create-if-absent probe, removed at once

Keys are relative to the store's root (a store URL's prefix, docs/format.md section 1).
Blobs and audit records stay outside `logs/`, so a segment listing never sees them.
"""

from __future__ import annotations

import os
import re
import time
from typing import Final

LOGS: Final = "logs/"
BLOBS: Final = "blobs/"
AUDIT: Final = "audit/"
REPLAYS: Final = "replays/"
PROBE: Final = "probe/"

LOG_ID_PATTERN: Final = r"[A-Za-z0-9._-]{1,128}"
LOG_ID_RE: Final = re.compile(LOG_ID_PATTERN)
SEGMENT_SUFFIX: Final = ".seg"
SEQ_DIGITS: Final = 20  # zero-padded, so keys sort in seq order


def segments_prefix(log_id: str) -> str:
    return f"{LOGS}{log_id}/"


def segment_key(log_id: str, seq: int) -> str:
    return f"{LOGS}{log_id}/{seq:0{SEQ_DIGITS}d}{SEGMENT_SUFFIX}"


def with_prefix(prefix: str, key: str) -> str:
    """`<prefix>/<key>`, the key seen from a bucket or URL root (no leading slash when the
    prefix is empty)."""
    prefix = prefix.strip("/")
    return f"{prefix}/{key}" if prefix else key


def seq_from_key(key: str) -> int | None:
    """The seq of a segment key, or None for any other object."""
    name = key.rsplit("/", 1)[-1]
    stem, dot, ext = name.partition(".")
    if f".{ext}" != SEGMENT_SUFFIX or not dot or len(stem) != SEQ_DIGITS or not stem.isdigit():
        return None
    return int(stem)


def log_id_of(key: str) -> str:
    """The log a key under `logs/` belongs to."""
    return key[len(LOGS):].split("/", 1)[0]


def after_log(log_id: str) -> str:
    """A list start that skips every key of `log_id` ('0' sorts right after '/')."""
    return f"{LOGS}{log_id}0"


def blobs_prefix(log_id: str) -> str:
    return f"{BLOBS}{log_id}/"


def blob_key(log_id: str, bid: str) -> str:
    return f"{BLOBS}{log_id}/{bid[:2]}/{bid}"


def audit_key(action: str, log_id: str) -> str:
    """A new audit record's key: UTC time, action, log, and randomness (never reused)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{AUDIT}{stamp}-{action}-{log_id}-{os.urandom(4).hex()}.json"


def audit_of(key: str, action: str, log_id: str) -> bool:
    """True when `key` is an audit record (audit_key) of `action` on log `log_id`."""
    name = key.rsplit("/", 1)[-1]
    head, _, rest = name.partition(f"-{action}-")
    return key.startswith(AUDIT) and bool(head) and rest.startswith(f"{log_id}-") and \
        len(rest) == len(log_id) + 1 + 8 + len(".json")


def replay_pins_prefix(log_id: str, name: str | None = None) -> str:
    return f"{REPLAYS}{log_id}/" + (f"{name}/" if name is not None else "")


def replay_pin_key(log_id: str, name: str, keep_from: int) -> str:
    """A named replay's pin: it still needs segments from `keep_from` on."""
    return f"{replay_pins_prefix(log_id, name)}{keep_from:0{SEQ_DIGITS}d}.json"


def probe_key(log_id: str) -> str:
    return f"{PROBE}{log_id}-{os.urandom(6).hex()}"
