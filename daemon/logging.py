"""structlog set-up: readable lines on a terminal, JSON lines otherwise (journald, files).

Event names are static strings ("segment_uploaded"), values go in fields. Nothing here
or anywhere else logs key material or record payloads.

Libraries that log through the standard `logging` module (librdkafka, through the
`logger` property of its clients) are routed through structlog too, so in JSON mode every
line on stderr is JSON (`journalctl -o cat | jq` works). A library that repeats one line
while a broker is down (librdkafka: a connect failure every 50 ms, about 60 lines in 3 s)
is logged once per REPEAT_WINDOW_S, with the count of the repeats left out.

The command line's `--log-level` / `--log-format` are pinned: they win over the config's
`logging` section, at start and at every reload.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Literal

import structlog

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]

REPEAT_WINDOW_S = 10.0
_pinned: dict[str, str] = {}
_state = {"json": False}


def pin(level: str | None, fmt: str | None) -> None:
    """What the command line said (None: not given): it wins over any config."""
    _pinned.clear()
    if level is not None:
        _pinned["level"] = level
    if fmt is not None:
        _pinned["format"] = fmt


def json_mode() -> bool:
    """True when log lines (and the command's final error line) are JSON."""
    return _state["json"]


class _Stderr:
    """Whatever sys.stderr is when a line is written (not when logging was configured),
    so a process that replaces sys.stderr never logs to a closed stream."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    level = _pinned.get("level", level)
    fmt = _pinned.get("format", fmt)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    _state["json"] = use_json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger


class _ToStructlog(logging.Handler):
    """Stdlib log records of a library as structlog events named after the library;
    a line repeated within REPEAT_WINDOW_S is counted instead of logged again."""

    def __init__(self, event: str) -> None:
        super().__init__(logging.DEBUG)
        self.event = event
        self._seen: dict[str, tuple[float, int]] = {}  # line -> (last logged, repeats since)
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        fields = _library_fields(record)
        key = "|".join(str(v) for v in fields.values())
        now = time.monotonic()
        with self._lock:
            last, repeats = self._seen.get(key, (0.0, 0))
            if last and now - last < REPEAT_WINDOW_S:
                self._seen[key] = (last, repeats + 1)
                return
            self._seen[key] = (now, 0)
            if len(self._seen) > 1000:  # bounded: old lines are forgotten
                self._seen = {k: v for k, v in self._seen.items()
                              if now - v[0] < REPEAT_WINDOW_S}
        if repeats:
            fields["repeated"] = repeats
        name = logging.getLevelName(record.levelno).lower()
        level = name if name in ("debug", "info", "warning", "error") else "error"
        getattr(get_logger(self.event), level)(self.event, **fields)


def _library_fields(record: logging.LogRecord) -> dict[str, object]:
    # confluent-kafka logs (facility, client name, message) with "%s [%s] %s"
    args = record.args if isinstance(record.args, tuple) else ()
    if len(args) == 3:
        return {"facility": args[0], "client": args[1], "message": str(args[2])}
    return {"message": record.getMessage()}


def library_logger(event: str) -> logging.Logger:
    """A stdlib logger for a library (e.g. `librdkafka`): its records become structlog
    events named `event`, at the level the library gave them."""
    logger = logging.getLogger(f"drstream.library.{event}")
    if not logger.handlers:
        logger.addHandler(_ToStructlog(event))
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
    return logger
