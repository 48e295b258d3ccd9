"""daemon.notify.Notifier against real AF_UNIX datagram sockets that the test owns.

No systemd involved: the test binds the socket that $NOTIFY_SOCKET names (a filesystem
path, or the abstract `@name` form) and reads what the Notifier sends, exactly as
systemd's manager would. Covers READY/STATUS/STOPPING/RELOADING, the watchdog pinger and
the parsing of WATCHDOG_USEC / WATCHDOG_PID.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from drstream.daemon.notify import Notifier


class Listener:
    """A bound AF_UNIX datagram socket: what systemd listens on."""

    def __init__(self, address: str) -> None:
        self.env_value = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def recv(self, timeout: float = 5.0) -> list[str]:
        self.sock.settimeout(timeout)
        return self.sock.recv(65536).decode().split("\n")

    def recv_all(self, timeout: float) -> list[tuple[float, list[str]]]:
        """Every datagram arriving within `timeout`, with its receive time."""
        out = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            out.append((time.monotonic(), data.decode().split("\n")))
        return out

    def nothing(self, timeout: float = 0.3) -> bool:
        self.sock.settimeout(timeout)
        try:
            self.sock.recv(65536)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_listener() -> Iterator[Listener]:
    # A short directory: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path may not be.
    with tempfile.TemporaryDirectory(prefix="drn-") as d:
        listener = Listener(str(Path(d) / "notify.sock"))
        try:
            yield listener
        finally:
            listener.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    listener = Listener(f"@drstream-test-notify-{uuid.uuid4().hex}")
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Listener:
    name = "path_listener" if request.param == "path" else "abstract_listener"
    result: Listener = request.getfixturevalue(name)
    return result


_open: list[Notifier] = []


@pytest.fixture(autouse=True)
def _close_notifiers() -> Iterator[None]:
    """Every Notifier a test made is closed (its socket), whatever the test did."""
    yield
    while _open:
        asyncio.run(_open.pop().close())


def make(environ: dict[str, str]) -> Notifier:
    n = Notifier(environ)
    _open.append(n)
    return n


def notifier_for(listener: Listener, **env: str) -> Notifier:
    return make({"NOTIFY_SOCKET": listener.env_value, **env})


# --------------------------------------------------------------------------- messages


def test_ready_with_status(listener: Listener) -> None:
    n = notifier_for(listener)
    assert n.enabled
    n.ready("ship: durable seq 0, next 1, lag 0.00s")
    assert listener.recv() == ["READY=1", "STATUS=ship: durable seq 0, next 1, lag 0.00s"]


def test_ready_without_status(listener: Listener) -> None:
    n = notifier_for(listener)
    n.ready()
    assert listener.recv() == ["READY=1"]


def test_status_stopping_reloading(listener: Listener) -> None:
    n = notifier_for(listener)
    n.status("apply: applied seq 7, lag 0.10s")
    assert listener.recv() == ["STATUS=apply: applied seq 7, lag 0.10s"]
    n.stopping()
    assert listener.recv() == ["STOPPING=1"]
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = listener.recv()
    assert lines[0] == "RELOADING=1"
    # systemd >= 253 requires MONOTONIC_USEC with RELOADING=1 (CLOCK_MONOTONIC, in us).
    assert len(lines) == 2 and lines[1].startswith("MONOTONIC_USEC="), lines
    usec = int(lines[1].removeprefix("MONOTONIC_USEC="))
    assert before <= usec <= after


def test_the_abstract_form_is_not_a_path(abstract_listener: Listener) -> None:
    n = notifier_for(abstract_listener)
    assert n.address.startswith("\0") and "@" not in n.address
    n.stopping()
    assert abstract_listener.recv() == ["STOPPING=1"]


def test_sends_reuse_one_socket(listener: Listener) -> None:
    n = notifier_for(listener)
    n.status("a")
    sock = n._sock
    n.status("b")
    assert n._sock is sock
    assert [listener.recv(), listener.recv()] == [["STATUS=a"], ["STATUS=b"]]
    asyncio.run(n.close())
    assert n._sock is None


def test_disabled_without_notify_socket(listener: Listener) -> None:
    n = make({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    n.ready("x")
    n.stopping()
    n.reloading()
    assert n._sock is None  # not even a socket is created
    assert listener.nothing()


def test_environment_is_read_by_default(listener: Listener,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier()
    _open.append(n)
    assert n.enabled and n.watchdog_s == 2.0
    n.ready()
    assert listener.recv() == ["READY=1"]


def test_a_vanished_socket_is_not_fatal() -> None:
    with tempfile.TemporaryDirectory(prefix="drn-") as d:
        path = str(Path(d) / "gone.sock")
        listener = Listener(path)
        n = make({"NOTIFY_SOCKET": path})
        n.ready()
        assert listener.recv() == ["READY=1"]
        listener.close()
        os.unlink(path)
        n.status("still running")  # ENOENT / ECONNREFUSED: logged, never raised
        n.stopping()
        asyncio.run(n.close())


# --------------------------------------------------------------------------- watchdog


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "1000000"}, 1.0),
    ({"WATCHDOG_USEC": "250000"}, 0.25),
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_PID": str(os.getpid())}, None),  # a pid alone enables nothing
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert Notifier({"NOTIFY_SOCKET": "@x", **env}).watchdog_s == expected


def test_watchdog_for_this_pid() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(env).watchdog_s == 4.0


def test_watchdog_of_another_process_is_ignored() -> None:
    """WATCHDOG_PID names the process the watchdog is for: a child that inherited the
    environment (another pid) must not ping on its parent's behalf."""
    other = subprocess.Popen([sys.executable, "-c", "pass"])
    other.wait()
    assert other.pid != os.getpid()
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(other.pid)}
    assert Notifier(env).watchdog_s is None


def test_watchdog_of_another_process_in_a_child(listener: Listener) -> None:
    """The same seen from the child's side: the parent's pid in WATCHDOG_PID."""
    code = (
        "import asyncio\n"
        "from daemon.notify import Notifier\n"
        "n = Notifier()\n"
        "print(n.watchdog_s)\n"
    )
    env = {**os.environ, "NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "1000000",
           "WATCHDOG_PID": str(os.getpid())}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True, cwd=Path(__file__).resolve().parents[2])
    assert res.stdout.strip() == "None"


async def test_watchdog_pings_from_the_loop(listener: Listener) -> None:
    """WATCHDOG=1 (with a fresh STATUS=) every WATCHDOG_USEC / 2."""
    n = notifier_for(listener, WATCHDOG_USEC="200000")
    calls = 0

    def summary() -> str:
        nonlocal calls
        calls += 1
        return f"ship: lag {calls}"

    n.start_watchdog(summary)
    n.start_watchdog(summary)  # idempotent: one pinger only
    got = await asyncio.to_thread(listener.recv_all, 1.05)
    await n.close()
    assert n._task is None and n._sock is None
    assert 4 <= len(got) <= 14, got  # 0.1 s apart over ~1 s (one pinger, not two)
    for i, (_, lines) in enumerate(got):
        assert lines == ["WATCHDOG=1", f"STATUS=ship: lag {i + 1}"]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(got)]
    assert all(0.05 < g < 0.5 for g in gaps), gaps
    assert listener.nothing(0.3), "pings went on after close()"


async def test_watchdog_stops_when_the_loop_is_blocked(abstract_listener: Listener) -> None:
    """The pinger runs on the event loop: a blocked loop sends nothing (so systemd sees
    the hang), and pings resume when it unblocks."""
    n = notifier_for(abstract_listener, WATCHDOG_USEC="200000")
    receiving = asyncio.create_task(asyncio.to_thread(abstract_listener.recv_all, 1.9))
    n.start_watchdog()
    await asyncio.sleep(0.35)
    time.sleep(1.0)  # block the loop
    await asyncio.sleep(0.35)
    await n.close()
    got = await receiving
    assert got and all(lines == ["WATCHDOG=1"] for _, lines in got), got
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(got)]
    assert max(gaps) >= 0.9, gaps
    assert sum(1 for g in gaps if g < 0.5) >= 2, gaps  # regular before and after


async def test_without_watchdog_only_status_is_refreshed(listener: Listener) -> None:
    """NOTIFY_SOCKET but no WATCHDOG_USEC: no WATCHDOG=1, STATUS= still refreshed."""
    n = notifier_for(listener)
    n.start_watchdog(lambda: "apply: applied seq 3, lag 0.00s")
    lines = await asyncio.to_thread(listener.recv, 5.0)
    await n.close()
    assert lines == ["STATUS=apply: applied seq 3, lag 0.00s"]


async def test_watchdog_not_started_when_disabled() -> None:
    n = Notifier({"WATCHDOG_USEC": "200000"})
    n.start_watchdog(lambda: "x")
    assert n._task is None
    await n.close()
