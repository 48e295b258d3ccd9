"""Service processes for tests and benchmarks: free loopback ports, log files, stop by pid.

Every process a launcher starts is recorded in a pid file under the run directory, so
a crashed test session can be cleaned up (`python -m tests.infra stop-all`) and the
suite can prove it left nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import pytest

CACHE_DIR = Path(os.environ.get("DRSTREAM_CACHE", Path.home() / ".cache" / "drstream"))
RUN_DIR = Path(os.environ.get("DRSTREAM_RUN_DIR", "/tmp/drstream-test-services"))


class ServiceStartError(RuntimeError):
    """A test service did not come up; the message names it and where its log is."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@dataclass
class Proc:
    """One started service process, its log file and the pid file that records it."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    pid_path: Path
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the process group at once (crash simulation)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, wait, then SIGKILL; always removes the pid file."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.popen.wait(timeout=30)
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()


def start_process(
    name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """Start `argv` in its own process group, stdout+stderr to `log_path`, pid recorded."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it after fork
    try:
        popen = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
        )
    finally:
        log.close()
    pid_path = RUN_DIR / f"{name}.{popen.pid}.pid"
    pid_path.write_text(f"{popen.pid}\n{' '.join(argv)}\n")
    return Proc(name=name, popen=popen, log_path=log_path, pid_path=pid_path)


def wait_until(check, timeout: float, proc: Proc, what: str, interval: float = 0.2) -> None:  # type: ignore[no-untyped-def]
    """Poll `check()` until true; fail naming the service and its log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ServiceStartError(
                f"{proc.name} exited with {proc.popen.returncode} before {what}; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(interval)
    proc.stop()
    raise ServiceStartError(
        f"{proc.name} did not reach '{what}' in {timeout:.0f}s; log {proc.log_path}:\n"
        f"{proc.log_tail()}"
    )


def recorded_pids() -> list[int]:
    """Pids of service processes started by launchers and not yet stopped."""
    pids = []
    for p in RUN_DIR.glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pids.append(int(p.read_text().split()[0]))
    return pids


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def stop_all_recorded() -> list[int]:
    """Kill every recorded service process group (cleanup after a crashed run)."""
    killed = []
    for p in RUN_DIR.glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(p.read_text().split()[0])
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                killed.append(pid)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return killed


def stop_recorded(pid: int, timeout: float = 20.0) -> bool:
    """Stop one recorded service by pid from any process (not only the one that started it):
    SIGTERM its group, wait, then SIGKILL; removes its pid file. False if it was not running.
    A pid without a pid file is left alone: never signal a process a launcher did not start."""
    pid_files = list(RUN_DIR.glob(f"*.{pid}.pid"))
    was_alive = bool(pid_files) and pid_alive(pid)
    if was_alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            while pid_alive(pid) and time.monotonic() < deadline + 10:
                time.sleep(0.1)
    for p in pid_files:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return was_alive


def unique_test_name(node_name: str, limit: int) -> str:
    """A name (topic, model) derived from a test's name that no other test uses: the
    services live for the whole session."""
    import re
    import uuid

    base = re.sub(r"[^a-zA-Z0-9._-]+", "-", node_name)[:limit].strip("-")
    return f"{base}-{uuid.uuid4().hex[:8]}"


class LoggedService(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def log_path(self) -> Path: ...

    def log_tail(self, lines: int) -> str: ...


def attach_log_tails(report: pytest.TestReport, item: pytest.Item, fixtures: set[str],
                     services: Sequence[LoggedService], kind: str) -> None:
    """On a failed test that used one of `fixtures`, add the tail of each service's log
    to its report."""
    if report.failed and fixtures & set(getattr(item, "fixturenames", ())):
        for s in services:
            report.sections.append(
                (f"{kind} {s.name} {s.log_path} (last 40 lines)", s.log_tail(40)))
