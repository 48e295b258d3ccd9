"""What to rebuild from the log: a replay plan (frozen), and the command-line values of
the replay, drill and prune commands (times, durations, NAME=VALUE lists)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from drstream.daemon.errors import HIDDEN, ConfigFieldError

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


def parse_assignments(values: list[str] | tuple[str, ...] | None, option: str, *,
                      name_re: str = r".+", secret: bool = False) -> dict[str, str]:
    """`NAME=VALUE` arguments of a repeatable option, in order; a later NAME wins. With
    `secret`, a bad argument is never echoed (it may be a key pasted by mistake)."""
    out: dict[str, str] = {}
    for value in values or ():
        name, sep, rest = value.partition("=")
        if not sep or not re.fullmatch(name_re, name) or not rest:
            raise ConfigFieldError(option, HIDDEN if secret else value,
                                   f"expected NAME=VALUE with NAME matching {name_re}")
        out[name] = rest
    return out


@dataclass(frozen=True)
class ReplayPlan:
    stream: str
    until_ms: int | None = None
    until_seq: int | None = None
    name: str = "replay"
    parallel: int = 4
    # the stream kind's own options by flag ("--topics": "orders.*"; a repeatable one's
    # values as a tuple); None: not given
    options: Mapping[str, str | tuple[str, ...] | None] = field(default_factory=dict)
    dry_run: bool = False  # count what would be written; write nothing
    digests: bool = False  # drills: hash every kept record per partition
    fold: bool = False  # drills: fold the kept changes into the expected state

    def option(self, flag: str, default: str | None = None) -> str | None:
        value = self.options.get(flag)
        if isinstance(value, tuple):
            raise TypeError(f"{flag} is repeatable: read it with values()")
        return default if value is None else value

    def values(self, flag: str) -> tuple[str, ...]:
        """Every value of a repeatable option (none: not given)."""
        value = self.options.get(flag)
        return value if isinstance(value, tuple) else ()
