"""sd_notify over $NOTIFY_SOCKET, without systemd's Python bindings.

READY=1 after sources and stores connect, WATCHDOG=1 from the event loop itself (so a
stuck loop stops the pings and systemd restarts the service), STATUS= with a one-line lag
summary, RELOADING=1/READY=1 around SIGHUP, STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable

from drstream.daemon.logging import get_logger

log = get_logger("drstream.notify")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        self.watchdog_s = self._watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def _watchdog_interval(env: dict[str, str] | os._Environ[str]) -> float | None:
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        if not usec.isdigit() or int(usec) == 0:
            log.warning("watchdog_usec_ignored", value=usec)
            return None
        return int(usec) / 1_000_000

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> None:
        if not self.enabled:
            return
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            # never block the loop on a full queue: a dropped status line is harmless
            self._sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, self.address)
        except OSError as e:  # systemd gone or socket full: never fatal to the data path
            log.warning("sd_notify_failed", error=str(e))

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def start_watchdog(self, summary: Callable[[], str] | None = None) -> None:
        """Ping at half the watchdog interval from the loop (and refresh STATUS=)."""
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._pinger(summary), name="sd-watchdog")

    async def _pinger(self, summary: Callable[[], str] | None) -> None:
        interval = (self.watchdog_s or 10.0) / 2
        while True:
            lines = ["WATCHDOG=1"] if self.watchdog_s else []
            if summary is not None:
                lines.append(f"STATUS={summary()}")
            if lines:
                self.send(*lines)
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
