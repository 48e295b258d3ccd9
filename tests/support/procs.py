"""`drstream` commands as processes of the test or benchmark, and waiting for things."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from tests.infra.procs import Proc, start_process

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "drstream.daemon.cli"]


def drstream(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run one `drstream` command to completion (stdout and stderr captured)."""
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def show(res: subprocess.CompletedProcess[str]) -> str:
    """A finished command's exit code and output tails, for failure messages."""
    return f"exit {res.returncode}\nstdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-4000:]}"


class Watched(Protocol):
    command: str

    def alive(self) -> bool: ...

    def describe(self, lines: int = 40) -> str: ...


def wait_for(check: Callable[[], bool], timeout: float, what: str,
             procs: Iterable[Watched] = (), interval: float = 0.2) -> None:
    """Poll `check` until true; fail on timeout or when one of `procs` exited."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        for p in procs:
            if not p.alive():
                raise AssertionError(f"{p.command} exited while waiting for {what}\n"
                                     f"{p.describe()}")
        if time.monotonic() >= deadline:
            tails = "\n".join(p.describe(30) for p in procs)
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
        time.sleep(interval)


READY_EVENT = {"ship": '"ship_started"', "apply": '"apply_started"'}


class DrstreamProcess:
    """`drstream ARGS` in its own process group, its output in a log file."""

    def __init__(self, args: list[str], log_path: Path, label: str = "", *,
                 env: dict[str, str] | None = None, cli: list[str] | None = None) -> None:
        self.command = args[0]
        self.log_path = log_path
        self.label = label
        self.started_at = time.monotonic()
        self.proc: Proc = start_process(
            f"drstream-{self.command}-{os.getpid()}", [*(cli or CLI), *args], log_path,
            env={"PYTHONUNBUFFERED": "1", **(env or {})}, cwd=ROOT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.popen.poll()

    def alive(self) -> bool:
        return self.proc.alive()

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def describe(self, lines: int = 40) -> str:
        rc = self.returncode
        state = "running" if rc is None else f"exit {rc}"
        return f"--- {self.command} {self.label} (pid {self.pid}, {state}) {self.log_path}:\n" \
               f"{self.tail(lines)}"

    def ready(self) -> bool:
        return READY_EVENT[self.command] in self.output()

    def wait_output(self, needle: str, timeout: float = 60) -> None:
        """Wait until the output contains `needle` (fail if the process exits first)."""
        wait_for(lambda: needle in self.output(), timeout,
                 f"{needle!r} in the {self.command} output", [self], interval=0.05)

    def wait_ready(self, timeout: float = 60) -> None:
        self.wait_output(READY_EVENT[self.command], timeout)

    def wait_exit(self, timeout: float) -> int | None:
        """The exit code, or None if it is still running after `timeout`."""
        try:
            rc = self.proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self.forget()
        return rc

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the drain to finish; the exit code (fails on a hang)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
        rc = self.wait_exit(timeout)
        if rc is None:
            text = self.describe()
            self.kill()
            raise AssertionError(f"{self.command} still running {timeout:.0f}s after SIGTERM\n"
                                 f"{text}")
        return rc

    def stop_ok(self, timeout: float = 60) -> None:
        """SIGTERM, wait for the drain, expect exit 0."""
        rc = self.terminate(timeout)
        assert rc == 0, f"{self.command} exited {rc} after SIGTERM (expected 0)\n" \
                        f"{self.describe()}"

    def kill(self) -> None:
        """kill -9 the whole process group (a crash)."""
        self.proc.kill()
        self.forget()

    def reap(self) -> None:
        """Kill it if it still runs, else collect its exit; forget its pid file."""
        if self.alive():
            self.kill()
        else:
            self.proc.popen.wait()
            self.forget()

    def forget(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.proc.pid_path.unlink()
