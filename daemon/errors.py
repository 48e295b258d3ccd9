"""One root exception for everything drstream raises on purpose.

`retriable` tells a caller whether the same operation may succeed if tried again
(a store that is down, a broker restarting) or never will (bad config, a tampered
segment, a fenced writer). Library errors are wrapped at the connector edge with
`raise ... from e` so the cause stays visible.
"""

from __future__ import annotations

from drstream.daemon.layout import segment_key

# Exit codes of every drstream command: problems found (verify, drill), bad usage or
# config (the message names the field and value), a runtime failure (names the object).
EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_FAILURE = 0, 1, 2, 3


class DrstreamError(Exception):
    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


MISSING = object()
HIDDEN = object()


class ConfigFieldError(DrstreamError):
    """One bad field: where it is, what was there, what is wrong.

    `value` may be MISSING (nothing to show) or HIDDEN (a would-be secret: never echoed).
    """

    def __init__(self, path: str, value: object, reason: str) -> None:
        self.path = path
        self.value = value
        self.reason = reason
        if value is MISSING:
            shown = ""
        elif value is HIDDEN:
            shown = " (value hidden: it may be a secret)"
        else:
            shown = f" (got {value!r})"
        super().__init__(f"{path}: {reason}{shown}")


class ConfigError(DrstreamError):
    """A config that cannot be used; carries every field error found."""

    def __init__(self, source: str, errors: list[ConfigFieldError]) -> None:
        self.source = source
        self.errors = errors
        if len(errors) == 1:  # one mistake, one line
            super().__init__(f"invalid config {source}: {errors[0]}")
            return
        lines = "\n".join(f"  {e}" for e in errors)
        super().__init__(f"invalid config {source}:\n{lines}")


class KeyRingError(DrstreamError):
    """A key that cannot be loaded or used (missing, unsafe file mode, wrong size)."""


class StoreError(DrstreamError):
    """A store operation failed; `key` names the object when there is one."""

    def __init__(
        self, message: str, *, key: str | None = None, retriable: bool | None = None
    ) -> None:
        self.key = key
        super().__init__(message, retriable=retriable)


class StoreUnavailableError(StoreError):
    """The store did not answer (connection refused, timeout, 5xx) after retries."""

    retriable = True


class FencedError(StoreError):
    """Another writer already created this object with other bytes: split brain."""


class SegmentError(DrstreamError):
    """A segment that cannot be trusted: names the log and seq (and object key if known)."""

    def __init__(
        self,
        message: str,
        *,
        log_id: str | None = None,
        seq: int | None = None,
        key: str | None = None,
    ) -> None:
        if key is None and log_id is not None and seq is not None:
            key = segment_key(log_id, seq)  # every damaged-segment error names its object
        self.log_id = log_id
        self.seq = seq
        self.key = key
        where = []
        if log_id is not None:
            where.append(f"log {log_id}")
        if seq is not None:
            where.append(f"seq {seq}")
        if key is not None:
            where.append(f"object {key}")
        prefix = f"segment {' '.join(where)}: " if where else "segment: "
        super().__init__(prefix + message)


class SegmentFormatError(SegmentError):
    """Bytes that do not parse as a segment (bad magic, truncated, trailing bytes)."""


class SegmentAuthError(SegmentError):
    """AES-GCM authentication failed: tampered bytes or the wrong key."""


class UnknownKeyError(SegmentError):
    """The segment names a key id that the key ring does not hold."""


class ChainError(SegmentError):
    """The hash chain is broken: wrong predecessor digest, a gap, or a moved segment."""


class LogGapError(ChainError):
    """Segments are missing from the middle or the start of a log (later ones are stored
    and prove them durable once): the log is damaged, not shorter. Names the missing seqs
    and the segment that proves it."""

    def __init__(self, log_id: str, missing: list[int], evidence: str) -> None:
        self.missing = missing
        where = "at the start" if missing[0] == 1 else "from the middle"
        super().__init__(f"{describe_seqs(missing)} missing {where} of the log "
                         f"({evidence}); restore them, or truncate the log with "
                         "`drstream log truncate`", log_id=log_id, seq=missing[0])


class LogStateError(DrstreamError):
    """The store holds something a writer must not clean up on its own (a hole further
    back than its own crash can leave, a segment that fails authentication, a foreign
    chain, hidden versions): it changes nothing and waits for an operator."""


def describe_seqs(seqs: list[int]) -> str:
    """'seq 7', 'seqs 7..9', 'seqs 3, 7..9' for a sorted list."""
    runs: list[str] = []
    start = prev = None
    for s in [*seqs, None]:
        if s is not None and prev is not None and s == prev + 1:
            prev = s
            continue
        if start is not None:
            runs.append(str(start) if start == prev else f"{start}..{prev}")
        start = prev = s
    return ("seq " if len(seqs) == 1 else "seqs ") + ", ".join(runs)


class BlobError(DrstreamError):
    """A stored blob (artifact chunk, registry state) that is missing or cannot be trusted;
    the message names its object key."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(f"blob {key}: {message}" if key else f"blob: {message}")
        self.key = key


class SourceError(DrstreamError):
    """A source (Kafka cluster, registry) failed; the message names the cluster."""


class SourceUnavailableError(SourceError):
    """The source cannot be reached (yet); the shipper may retry or fail readiness."""

    retriable = True


class SinkError(DrstreamError):
    """A sink (standby cluster, registry) failed; the message names the cluster and seq."""


class SinkFencedError(SinkError):
    """Another apply with the same transactional identity took over; this one stops."""
