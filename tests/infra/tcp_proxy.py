"""A TCP proxy owned by a test, to simulate a service outage without losing its state.

moto keeps its data in memory, so "S3 is down" cannot be a restart: the code under test
talks to the proxy, and the test switches it at runtime between
  pass       forward bytes both ways
  refuse     accept and reset every connection at once
  blackhole  accept, swallow requests, never answer
  delay      forward, but hold every chunk for `delay_s` first
  jitter     forward, holding every chunk a random 0..`delay_s` (connections overtake
             each other: uploads started in order complete out of order)
  flaky      forward, but reset the connection at a request chunk with probability
             `fail_p` (requests fail at random and are retried, in any order)
  mute       forward requests, drop every answer: the write lands, its reply is lost
In any forwarding mode `rewrite = (old, new)` replaces bytes in requests (an endpoint that
ignores a header: rename it on the way), and `answered` counts the bytes of answers.
Switching mode resets the connections that are open, as a network change would, so a
pooled keep-alive connection cannot slip past the new mode.

The proxy runs its own event loop in a daemon thread, so it works the same for sync
and async tests and never depends on the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from typing import Literal

Mode = Literal["pass", "refuse", "blackhole", "delay", "jitter", "flaky", "mute"]
_CHUNK = 65536


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) so the peer sees a reset, not a polite FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """`TcpProxy(upstream_port).start()`; point clients at `proxy.port`."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.mode: Mode = "pass"
        self.delay_s = 0.0
        self.accepted = 0  # connections accepted, in any mode (shows that clients retried)
        self.answered = 0  # bytes forwarded from the upstream to clients
        self.rewrite: tuple[bytes, bytes] | None = None  # applied to every request chunk
        self.fail_p = 0.0  # flaky: chance that a request chunk resets its connection
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"tcp-proxy->{upstream_port}")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- modes (callable from any thread) -----------------------------------------

    def set_mode(self, mode: Mode, delay_s: float = 0.0) -> None:
        self.mode, self.delay_s = mode, delay_s
        self._call(self._reset_all())

    def pass_through(self) -> None:
        self.set_mode("pass")

    def refuse(self) -> None:
        self.set_mode("refuse")

    def blackhole(self) -> None:
        self.set_mode("blackhole")

    def delay(self, seconds: float) -> None:
        self.set_mode("delay", seconds)

    def mute(self) -> None:
        self.set_mode("mute")

    def flaky(self, fail_p: float) -> None:
        self.fail_p = fail_p
        self.set_mode("flaky")

    # -- inside the proxy's loop ---------------------------------------------------

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)  # type: ignore[arg-type]

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _reset_all(self) -> None:
        for w in list(self._writers):
            _reset(w)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.accepted += 1
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            _reset(writer)
            return
        if self.mode == "blackhole":
            while await reader.read(_CHUNK):
                pass  # swallow the request; the client waits for its read timeout
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(writer)
            return
        self._writers.add(up_writer)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer, answers=True),
                return_exceptions=True,  # one side failing must not orphan the other
            )
        finally:
            self._writers.discard(up_writer)
            up_writer.transport.abort()

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, answers: bool = False
    ) -> None:
        try:
            while data := await src.read(_CHUNK):
                if self.mode == "delay":
                    await asyncio.sleep(self.delay_s)
                elif self.mode == "jitter":
                    await asyncio.sleep(random.uniform(0, self.delay_s))
                elif self.mode == "flaky" and not answers and random.random() < self.fail_p:
                    _reset(dst)
                    return
                if answers and self.mode == "mute":
                    continue
                if answers:
                    self.answered += len(data)
                elif self.rewrite is not None:
                    data = data.replace(*self.rewrite)
                dst.write(data)
                await dst.drain()
        finally:
            # Half-close so HTTP keep-alive and request/response framing behave.
            with contextlib.suppress(OSError, RuntimeError):
                if dst.can_write_eof() and not dst.transport.is_closing():
                    dst.write_eof()
