"""Prometheus metrics and the health endpoints, served on loopback by default.

One registry per process (not the global one) so tests and embedded use stay isolated.
`/metrics` (Prometheus text), `/healthz` (the loop answers), `/readyz` (connected and the
main loop ticked recently).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from drstream.daemon.errors import DrstreamError
from drstream.daemon.logging import get_logger
from drstream.daemon.tip import TIP_PATH, TipSource, serve_tip, tip_refusal

log = get_logger("drstream.metrics")

DEFAULT_STALL_AFTER_S = 60.0

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

RECORDS = Counter("drstream_records", "Records shipped or applied", ["role", "stream"],
                  registry=REGISTRY)
BYTES = Counter("drstream_bytes", "Bytes per stage: raw (records), encrypted (segments "
                "stored), applied", ["stage"], registry=REGISTRY)
SEGMENTS = Counter("drstream_segments", "Segments written or applied", ["role", "kind"],
                   registry=REGISTRY)
UPLOAD_SECONDS = Histogram("drstream_segment_upload_seconds", "Segment upload latency",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                           registry=REGISTRY)
DURABLE_HEAD = Gauge("drstream_durable_head_seq", "Highest seq with every seq below it stored",
                     registry=REGISTRY)
SHIP_LAG = Gauge("drstream_ship_lag_seconds", "Age of the oldest consumed record not yet "
                 "durable in the log (0 when all are): the RPO right now", ["stream"],
                 registry=REGISTRY)
APPLIED_SEQ = Gauge("drstream_applied_seq", "Last segment applied to every sink",
                    registry=REGISTRY)
APPLY_LAG = Gauge("drstream_apply_lag_seconds", "Time from a segment's write to its apply, "
                  "for the last segment applied", registry=REGISTRY)
APPLIED_SEGMENT_TIME = Gauge("drstream_applied_segment_timestamp_seconds", "Write time "
                             "(Unix seconds) of the last segment applied: with heartbeat "
                             "segments, now minus this is how stale the standby is",
                             registry=REGISTRY)
ERRORS = Counter("drstream_errors", "Errors by kind", ["kind"], registry=REGISTRY)
SOURCE_UP = Gauge("drstream_source_up", "1 when the source answered its last read, 0 while "
                  "it is unreachable", ["stream"], registry=REGISTRY)
STORE_UP = Gauge("drstream_store_up", "1 while the log store answers, 0 while ship or apply "
                 "ride out an outage (retrying within service.outage_budget_s)",
                 registry=REGISTRY)
# Which log a process serves, so alerts can name it and two ships of one log_id (split
# brain) show up as two series with the same log_id.
INFO = Gauge("drstream_info", "Always 1; labels name the role and the log",
             ["role", "log_id", "version"], registry=REGISTRY)
READY = Gauge("drstream_ready", "1 while /readyz answers 200 (connected, loop ticking)",
              registry=REGISTRY)


class Health:
    """Readiness: connected (set once) and the main loop ticked within `stall_after_s`."""

    def __init__(self, stall_after_s: float = DEFAULT_STALL_AFTER_S) -> None:
        self.stall_after_s = stall_after_s
        self.connected = False
        self.last_tick = time.monotonic()
        self.reason = "starting"
        # Parts that can make the service unready (a source whose registry is down):
        # each returns (ok, reason).
        self.checks: list[Callable[[], tuple[bool, str]]] = []

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def ready(self) -> tuple[bool, str]:
        if not self.connected:
            return False, self.reason
        idle = time.monotonic() - self.last_tick
        if idle > self.stall_after_s:
            return False, f"main loop stalled for {idle:.0f}s"
        for check in self.checks:
            ok, why = check()
            if not ok:
                return False, why
        return True, "ready"


class MetricsServer:
    """A minimal HTTP/1.0 server on the event loop: /metrics, /healthz, /readyz, and for
    ship the durable-tip stream /tip (daemon/tip.py) once `tip` is set."""

    def __init__(self, listen: str, health: Health) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.health = health
        self.tip: TipSource | None = None
        self._server: asyncio.Server | None = None
        self._streams: dict[asyncio.Future[None], asyncio.Task[object]] = {}  # -> handler
        READY.set_function(lambda: float(self.health.ready()[0]))

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as e:
            raise DrstreamError(f"cannot listen for metrics on {self.host}:{self.port} "
                                f"(service.*_metrics_listen): {e.strerror or e}") from e
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics_listening", address=f"{self.host}:{self.port}")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            target = line.decode(errors="replace").split(" ")[1] if b" " in line else "/"
            path, _, query = target.partition("?")
            if path == TIP_PATH and tip_refusal(query, self.tip) is None:
                assert self.tip is not None
                await self._stream(reader, serve_tip(writer, self.tip))
                return
            status, ctype, body = self._route(path, query)
            head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _stream(self, reader: asyncio.StreamReader, stream: Coroutine[Any, Any, None]
                      ) -> None:
        """Run a response that streams until the client hangs up or the server closes."""
        task = asyncio.ensure_future(stream)
        hangup = asyncio.ensure_future(reader.read())  # returns at the client's EOF
        handler = asyncio.current_task()
        assert handler is not None
        self._streams[task] = handler
        try:
            await asyncio.wait({task, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            del self._streams[task]
            for t in (task, hangup):
                t.cancel()
            await asyncio.gather(task, hangup, return_exceptions=True)

    def _route(self, path: str, query: str = "") -> tuple[str, str, bytes]:
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            ok, why = self.health.ready()
            status = "200 OK" if ok else "503 Service Unavailable"
            return status, "text/plain", (why + "\n").encode()
        if path == TIP_PATH:
            status = tip_refusal(query, self.tip) or "404 Not Found"
            return status, "text/plain", b"no durable tip of that log here\n"
        return "404 Not Found", "text/plain", b"not found\n"

    async def close(self) -> None:
        # End the streams first and let their handlers return: a handler task still
        # running when the loop stops is cancelled, and asyncio prints that as an error.
        handlers = list(self._streams.values())
        for task in list(self._streams):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
