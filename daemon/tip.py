"""The durable-tip channel: ship tells apply its durable seq as it advances.

Without it apply finds new segments by probing seq+1 with back-off: a GET per probe while
caught up, and a segment waits for the next probe (up to apply.poll_max_s). With it, ship
answers `GET /tip?log_id=L&after=N` on its HTTP port (service.ship_metrics_listen) with
one line per advance of its durable seq (the first line at once) and an empty keep-alive
line every TIP_KEEPALIVE_S, on one connection that stays open. Apply fetches only up to
the tip it heard, so it never asks for a segment that is not there and never sees one
before its writer finished making it durable.

The store stays the source of truth: the tip only says when to look. Apply checks every
segment it fetches as before, and while the channel is down (ship stopped or killed, a
network in between, a ship of another log on that address) it probes like before and
tries the channel again every TIP_RETRY_S. A channel that stays silent for
TIP_SILENCE_S counts as down, so a black-holed connection cannot stall apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final, Protocol, runtime_checkable
from urllib.parse import parse_qs, quote

from drstream.daemon.errors import DrstreamError
from drstream.daemon.logging import get_logger
from drstream.daemon.segment import parse_header

log = get_logger("drstream.tip")

TIP_PATH: Final = "/tip"
TIP_KEEPALIVE_S: Final = 1.0
# three keep-alives missed: the connection or the ship is gone
TIP_SILENCE_S: Final = 3.0
TIP_CONNECT_TIMEOUT_S: Final = 2.0
TIP_RETRY_S: Final = 1.0
# an address that announced another log's tip is left alone this long
TIP_DISTRUST_S: Final = 60.0


@runtime_checkable
class TipSource(Protocol):
    """What ship's HTTP server reads the tip from (the shipper, over its LogWriter)."""

    @property
    def log_id(self) -> str: ...

    @property
    def tip_ready(self) -> bool:
        """The log is open: durable_seq is the head, not a start value."""
        ...

    async def durable_after(self, seq: int, timeout_s: float) -> tuple[int, bytes]:
        """(durable seq, GCM nonce of that segment) once the seq passes `seq`, or after
        `timeout_s` as it is."""
        ...


class TipRefused(Exception):
    """Ship answered, but not with a tip for our log (another log, not ready)."""


def tip_refusal(query: str, source: TipSource | None) -> str | None:
    """The status line refusing a /tip request with this query string, or None."""
    if source is None:
        return "404 Not Found"
    if parse_qs(query).get("log_id", [""])[0] != source.log_id:
        return "409 Conflict"  # a ship of another log listens here
    if not source.tip_ready:
        return "503 Service Unavailable"
    return None


async def serve_tip(writer: asyncio.StreamWriter, source: TipSource) -> None:
    """Stream the durable seq to one follower until it hangs up (or ship stops): the
    current one at once, then each advance, and an empty line each TIP_KEEPALIVE_S."""
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nCache-Control: no-store\r\n"
                 b"Connection: close\r\n\r\n")
    sent = -1
    while True:
        seq, nonce = await source.durable_after(sent, 0 if sent < 0 else TIP_KEEPALIVE_S)
        if seq > sent:
            writer.write(b"%d %s\n" % (seq, nonce.hex().encode()))
            sent = seq
        else:
            writer.write(b"\n")
        await writer.drain()


class TipChannel:
    """Apply's end: follows ship's tip and says whether the channel is up."""

    def __init__(self, address: str, log_id: str) -> None:
        host, _, port = address.rpartition(":")
        self.host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(
            host, host.strip("[]"))
        self.port = int(port)
        self.log_id = log_id
        self.seq = 0  # the newest durable seq heard (valid while up)
        self.nonce = ""  # hex GCM nonce of segment `seq`, as ship announced it
        self.up = False
        self._changed = asyncio.Event()
        self._reported_down = False
        self._distrusted_until = 0.0
        self._conn: asyncio.StreamWriter | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def wait(self, beyond: int, timeout_s: float, stop: asyncio.Event | None = None
                   ) -> bool:
        """Until the tip passes `beyond`, the channel goes up or down, `stop`, or
        `timeout_s`; False only when the time ran out."""
        if self.up and self.seq > beyond:
            return True
        changed = self._changed
        waits = [asyncio.ensure_future(changed.wait())]
        if stop is not None:
            waits.append(asyncio.ensure_future(stop.wait()))
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return bool(done)

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _heard(self, line: bytes) -> None:
        fields = line.split()
        changed = not self.up
        if changed:
            self.up = True
            self._reported_down = False
            log.info("tip_channel_up", address=self.address,
                     durable_seq=int(fields[0]) if fields else None)
        if fields and int(fields[0]) > self.seq:
            self.seq = int(fields[0])
            self.nonce = fields[1].decode() if len(fields) > 1 else ""
            changed = True
        if changed:  # a keep-alive alone wakes nobody
            self._pulse()

    def vouch(self, seq: int, data: bytes) -> None:
        """Check a segment read from the store against what the channel announced: a tip
        behind what was read, or another nonce for the tip's seq, means the address serves
        another log of the same name (or another store): stop trusting it for a while."""
        if not self.up:
            return
        why = None
        if self.seq < seq - 1:
            why = f"it announces seq {self.seq}, but seq {seq - 1} was read from the store"
        elif seq == self.seq and self.nonce:
            with contextlib.suppress(DrstreamError):  # a bad segment fails where it is applied
                if parse_header(data)[0].nonce.hex() != self.nonce:
                    why = f"its seq {seq} is not the segment the store holds"
        if why is not None:
            log.warning("tip_channel_mismatch", address=self.address, error=why,
                        retry_in_s=TIP_DISTRUST_S, fallback="probing the store")
            self._distrusted_until = time.monotonic() + TIP_DISTRUST_S
            self._reported_down = True
            self.up = False
            self._pulse()
            if self._conn is not None:
                self._conn.close()

    def _down(self, why: str) -> None:
        if self.up or not self._reported_down:
            log.warning("tip_channel_down", address=self.address, error=why,
                        fallback="probing the store")
            self._reported_down = True
        if self.up:
            self.up = False
            self._pulse()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Follow the tip until cancelled (or `stop`), reconnecting every TIP_RETRY_S."""
        while stop is None or not stop.is_set():
            try:
                await self._follow()
                why = "ship closed the connection"
            except TipRefused as e:
                why = str(e)
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as e:
                why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            self._down(why)
            pause = max(TIP_RETRY_S, self._distrusted_until - time.monotonic())
            if stop is None:
                await asyncio.sleep(pause)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)

    async def _follow(self) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), TIP_CONNECT_TIMEOUT_S)
        self._conn = writer
        try:
            query = f"log_id={quote(self.log_id)}"
            writer.write(f"GET {TIP_PATH}?{query} HTTP/1.0\r\nHost: {self.address}\r\n\r\n"
                         .encode())
            await writer.drain()
            status = await self._line(reader)
            while (await self._line(reader)).strip():  # headers
                pass
            if not status.startswith(b"HTTP/1.0 200") and not status.startswith(b"HTTP/1.1 200"):
                raise TipRefused(f"{self.address} answered "
                                 f"{status.decode(errors='replace').strip()!r}")
            while True:
                line = await self._line(reader)
                if not line or writer.is_closing():
                    return
                self._heard(line)
        finally:
            self._conn = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    @staticmethod
    async def _line(reader: asyncio.StreamReader) -> bytes:
        return await asyncio.wait_for(reader.readline(), TIP_SILENCE_S)

