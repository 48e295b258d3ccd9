"""What to rebuild from the log: a replay plan (frozen) and the time arguments of the
replay, drill and prune commands."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from drstream.daemon.errors import ConfigFieldError

DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time_ms(text: str, field_name: str = "--until") -> int:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigFieldError(field_name, text, "expected an RFC 3339 time such as "
                               "2026-11-26T12:00:00Z") from None
    if dt.tzinfo is None:
        raise ConfigFieldError(field_name, text, "the time needs a zone (Z or +hh:mm)")
    return int(dt.timestamp() * 1000)


def parse_duration_s(text: str, field_name: str = "--older-than") -> float:
    m = DURATION_RE.match(text.strip())
    if not m:
        raise ConfigFieldError(field_name, text, "expected a duration like 90s, 30m, 12h, 7d")
    return float(m.group(1)) * DURATION_UNITS[m.group(2)]


@dataclass(frozen=True)
class ReplayPlan:
    stream: str
    until_ms: int | None = None
    until_seq: int | None = None
    name: str = "replay"
    parallel: int = 4
    # the stream kind's own options by flag ("--topics": "orders.*"); None: not given
    options: Mapping[str, str | None] = field(default_factory=dict)
    dry_run: bool = False  # count what would be written; write nothing
    digests: bool = False  # drills: hash every kept record per partition
    fold: bool = False  # drills: fold the kept changes into the expected state

    def option(self, flag: str, default: str | None = None) -> str | None:
        value = self.options.get(flag)
        return default if value is None else value
