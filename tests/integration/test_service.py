"""`drstream ship` / `drstream apply` as services: what systemd sees and what an operator does.

The real `drstream` console script (what the units' ExecStart= runs) is started as a
subprocess with NOTIFY_SOCKET naming an abstract AF_UNIX datagram socket that the test
owns and WATCHDOG_USEC=1000000 (WATCHDOG_PID unset: the child's pid is known only after
the spawn), so the test stands where systemd would:

- READY=1 (with STATUS=) once connected, WATCHDOG=1 every 0.5 s from the event loop,
  STOPPING=1 on SIGTERM, exit 0;
- with the test hook (DRSTREAM_TEST_HOOKS=1), SIGUSR2 blocks the event loop and the
  WATCHDOG=1 pings stop for that long, then resume;
- SIGTERM of ship and apply under a continuous load, then a restart: the standby equals
  the primary record by record, and the log holds every record exactly once;
- SIGHUP: a widened topic selection is shipped without a restart; an invalid config or a
  change of an identity key is rejected and logged, and the old config keeps shipping;
- /metrics (parsed with prometheus_client), /healthz, /readyz.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.infra.kafka import KafkaCluster
from tests.infra.procs import free_port
from tests.integration.applylib import (
    DrProcess,
    DrSetup,
    ProcessPool,
    as_source,
    checkpoint_watch,
    compare_replica,
    count,
    create_topics,
    next_offsets,
    process_pool,
    read_topics,
    unique,
    write_dr_config,
)
from tests.integration.shiplib import (
    DeliveryCheck,
    LoadProducer,
    compare_records,
    flush,
    log_head,
    positions_reached,
    producer,
    read_log,
    read_primary,
)
from tests.support.procs import DrstreamProcess, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).parent / "drstream"
# The console script the systemd units run (python -m drstream.daemon.cli when not installed).
DRSTREAM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "drstream.daemon.cli"]
WATCHDOG_USEC = 1_000_000  # pings every 0.5 s
STREAM = "kafka:primary"


# --------------------------------------------------------------------------- notify socket


@dataclass
class Message:
    at: float  # monotonic receive time
    lines: list[str]

    def has(self, line: str) -> bool:
        return line in self.lines

    def field(self, name: str) -> str | None:
        prefix = name + "="
        return next((x[len(prefix):] for x in self.lines if x.startswith(prefix)), None)


class NotifyListener:
    """The socket systemd would listen on: abstract AF_UNIX datagrams, read by a thread
    as they arrive (the kernel queue is short; an unread socket would block the sender)."""

    def __init__(self, label: str) -> None:
        self.address = f"@drstream-itest-{label}-{uuid.uuid4().hex[:12]}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.address[1:])
        self._sock.settimeout(0.1)
        self._messages: list[Message] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"notify-{label}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._messages.append(Message(time.monotonic(), data.decode().split("\n")))

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}

    def messages(self, since: int = 0) -> list[Message]:
        with self._lock:
            return list(self._messages[since:])

    def count(self) -> int:
        with self._lock:
            return len(self._messages)

    def find(self, line: str, since: int = 0) -> tuple[int, Message] | None:
        for i, m in enumerate(self.messages(since), start=since):
            if m.has(line):
                return i, m
        return None

    def wait(self, line: str, proc: DrProcess, since: int = 0, timeout: float = 60
             ) -> tuple[int, Message]:
        """The first message at index >= `since` with `line` (fails if `proc` exits)."""
        found: list[tuple[int, Message]] = []

        def seen() -> bool:
            hit = self.find(line, since)
            if hit is not None:
                found.append(hit)
            return hit is not None

        wait_for(seen, timeout, f"{line} on the notify socket", [proc], interval=0.05)
        return found[0]

    def watchdog_times(self, since: int = 0) -> list[float]:
        return [m.at for m in self.messages(since) if m.has("WATCHDOG=1")]

    def wait_pings(self, n: int, proc: DrProcess, since: int = 0, timeout: float = 30
                   ) -> list[float]:
        wait_for(lambda: len(self.watchdog_times(since)) >= n, timeout,
                 f"{n} WATCHDOG=1 pings", [proc], interval=0.05)
        return self.watchdog_times(since)

    def dump(self) -> str:
        return "\n".join(f"  {m.at:.3f} {m.lines}" for m in self.messages())

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self._sock.close()


# --------------------------------------------------------------------------- processes


class ServiceProcess(DrProcess):
    """`drstream ship|apply` via the console script, with a service environment."""

    def __init__(self, command: str, setup: DrSetup, log_path: Path, label: str,
                 env: dict[str, str]) -> None:
        DrstreamProcess.__init__(self, [command, "--config", str(setup.path)], log_path, label,
                                 env=env, cli=DRSTREAM)
        self.setup = setup

    def signal(self, sig: signal.Signals) -> None:
        """Signal the main process only, as systemd's ExecReload=/bin/kill -HUP $MAINPID."""
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 60) -> int:
        rc = super().wait_exit(timeout)
        if rc is None:
            text = self.describe()
            self.kill()
            raise AssertionError(f"{self.command} still running after {timeout:.0f}s\n{text}")
        return rc

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines (logging.format: json) as dicts."""
        out = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def event(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == name]


class Harness:
    """Processes and notify sockets of one test; everything is closed at teardown."""

    def __init__(self, pool: ProcessPool) -> None:
        self.pool = pool
        self.listeners: list[NotifyListener] = []

    def listener(self, label: str) -> NotifyListener:
        listener = NotifyListener(label)
        self.listeners.append(listener)
        return listener

    def start(self, command: str, setup: DrSetup, label: str,
              listener: NotifyListener | None = None, **env: str) -> ServiceProcess:
        full = {**(listener.env() if listener else {}), **env}
        proc = ServiceProcess(command, setup, self.pool.dir / f"{command}-{label}.log", label,
                              full)
        self.pool.started.append(proc)
        return proc

    def close(self) -> None:
        for listener in self.listeners:
            with contextlib.suppress(Exception):
                print(f"--- notify socket {listener.address}:\n{listener.dump()[-4000:]}")
            listener.close()


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    # A test run under systemd must not hand its own watchdog/notify settings down.
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "DRSTREAM_TEST_HOOKS"):
        monkeypatch.delenv(name, raising=False)
    with process_pool(tmp_path) as pool:
        h = Harness(pool)
        try:
            yield h
        finally:
            h.close()


def flow(tmp_path: Path, primary: KafkaCluster, standby: KafkaCluster, include: list[str],
         label: str, *, ship_metrics: bool = False, apply_metrics: bool = False,
         ship: dict[str, Any] | None = None) -> DrSetup:
    """A ship+apply config over a file store; metrics endpoints on free ports or off."""
    setup = write_dr_config(
        tmp_path, store={"type": "file", "path": str(tmp_path / f"store-{label}")},
        source_bootstrap=primary.bootstrap_servers, sink_bootstrap=standby.bootstrap_servers,
        include=include, log_id=unique(label), ship=ship)
    setup.rewrite(service={
        "ship_metrics_listen": f"127.0.0.1:{free_port()}" if ship_metrics else None,
        "apply_metrics_listen": f"127.0.0.1:{free_port()}" if apply_metrics else None,
    })
    return setup


def metrics_port(setup: DrSetup, role: str) -> int:
    return int(setup.raw["service"][f"{role}_metrics_listen"].rpartition(":")[2])


def produce(bootstrap: str, topic: str, n: int, partitions: int = 1, tag: str = "") -> None:
    check = DeliveryCheck()
    p = producer(bootstrap, **{"enable.idempotence": True})
    for i in range(n):
        p.produce(topic, f"{tag}{i}".encode(), f"k{i % 7}".encode(), partition=i % partitions,
                  on_delivery=check)
        p.poll(0)
    flush(p)
    check.check()


def wait_logged(setup: DrSetup, targets: dict[tuple[str, int], int], proc: DrProcess,
                timeout: float = 60) -> None:
    """Until the log's durable head covers `targets` (topic, partition) -> next offset."""
    behind: list[str] = []

    def reached() -> bool:
        nonlocal behind
        head, manifest = log_head(setup.raw["store"], setup.log_id, setup.keyring)
        behind = positions_reached(manifest, targets)
        return head is not None and not behind

    try:
        wait_for(reached, timeout, "the log to cover the primary", [proc], interval=0.25)
    except AssertionError as e:
        raise AssertionError(f"{e}\nbehind: {behind[:8]}") from None


def logged_topics(setup: DrSetup) -> set[str]:
    """Topics with records in the log or a position in its head manifest."""
    records = read_log(setup.raw["store"], setup.log_id, setup.keyring)
    _, manifest = log_head(setup.raw["store"], setup.log_id, setup.keyring)
    positions = manifest.positions.get(STREAM, {}) if manifest else {}
    return {t for (t, _), recs in records.items() if recs} | set(positions)


# --------------------------------------------------------------------------- HTTP


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return int(e.code), e.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed by prometheus_client: (sample name, sorted labels) -> value."""
    status, text = http_get(port, "/metrics")
    assert status == 200, f"/metrics answered {status}: {text[:200]}"
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def answers(port: int, path: str, status: int) -> Callable[[], bool]:
    def check() -> bool:
        with contextlib.suppress(OSError):
            return http_get(port, path)[0] == status
        return False

    return check


# --------------------------------------------------------------------------- tests


def check_lifecycle(proc: ServiceProcess, listener: NotifyListener, role: str) -> None:
    """READY=1 + STATUS, then regular WATCHDOG=1 + STATUS from the loop."""
    ready_at, ready = listener.wait("READY=1", proc)
    status = ready.field("STATUS")
    assert status is not None and status.startswith(f"{role}:"), ready.lines
    before = [m for m in listener.messages()[:ready_at] if m.has("WATCHDOG=1")]
    assert not before, "WATCHDOG=1 before READY=1"
    listener.wait_pings(5, proc, since=ready_at)
    pings = [m for m in listener.messages(ready_at) if m.has("WATCHDOG=1")]
    gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
    # WATCHDOG_USEC / 2 apart; a loaded machine may stretch one, never the median.
    assert 0.3 <= statistics.median(gaps) <= 0.9, gaps
    assert all((m.field("STATUS") or "").startswith(f"{role}:") for m in pings), \
        [m.lines for m in pings]


def test_notify_ready_watchdog_status_stopping(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path, harness: Harness,
) -> None:
    topic = unique("svc-life")
    create_topics(primary_kafka.bootstrap_servers, {topic: 1})
    produce(primary_kafka.bootstrap_servers, topic, 20)
    setup = flow(tmp_path, primary_kafka, standby_kafka, [re.escape(topic)], "svc-life")
    ship_sock, apply_sock = harness.listener("ship"), harness.listener("apply")
    ship = harness.start("ship", setup, "ship", ship_sock)
    apply = harness.start("apply", setup, "apply", apply_sock)
    check_lifecycle(ship, ship_sock, "ship")
    check_lifecycle(apply, apply_sock, "apply")
    assert ship.event("service_ready") and apply.event("service_ready")

    for proc, sock in ((ship, ship_sock), (apply, apply_sock)):
        mark = sock.count()
        proc.signal(signal.SIGTERM)
        rc = proc.wait_exit(60)
        assert rc == 0, f"{proc.command} exited {rc} after SIGTERM\n{proc.describe()}"
        after = sock.messages(mark)
        assert any(m.has("STOPPING=1") for m in after), \
            f"{proc.command}: no STOPPING=1 after SIGTERM:\n{sock.dump()}"
        assert not any(m.has("READY=1") for m in after), sock.dump()
        assert proc.event("stop_requested"), proc.describe()
    assert ship.event("ship_stopped"), ship.describe()


def test_watchdog_pings_stop_while_the_loop_is_blocked(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path, harness: Harness,
) -> None:
    block_s = 4.0
    topic = unique("svc-wd")
    create_topics(primary_kafka.bootstrap_servers, {topic: 1})
    setup = flow(tmp_path, primary_kafka, standby_kafka, [re.escape(topic)], "svc-wd")
    sock = harness.listener("ship")
    ship = harness.start("ship", setup, "ship", sock, DRSTREAM_TEST_HOOKS="1",
                         DRSTREAM_TEST_BLOCK_S=f"{block_s:g}")
    ready_at, _ = sock.wait("READY=1", ship)
    baseline = sock.wait_pings(4, ship, since=ready_at)
    assert max(b - a for a, b in itertools.pairwise(baseline)) < 2.5, baseline

    mark = sock.count()
    signalled = time.monotonic()
    ship.signal(signal.SIGUSR2)
    wait_for(lambda: bool(ship.event("test_hook_blocking_loop")), 30, "the loop to block",
             [ship], interval=0.05)
    # Pings after the signal: the blocked stretch, then at least 4 regular ones.
    wait_for(lambda: any(t - signalled > block_s for t in sock.watchdog_times(mark)) and
             len([t for t in sock.watchdog_times(mark) if t - signalled > block_s]) >= 4,
             60, "WATCHDOG=1 to resume after the block", [ship], interval=0.1)
    last_before = max(t for t in sock.watchdog_times(ready_at) if t < signalled)
    times = [last_before, *sock.watchdog_times(mark)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    longest = max(gaps)
    assert longest > block_s - 1.0, f"no gap of ~{block_s:g}s in the pings: {gaps}"
    assert longest < block_s + 8.0, f"pings stopped for {longest:.1f}s, longer than the block"
    after = gaps[gaps.index(longest) + 1:]
    assert len(after) >= 3 and statistics.median(after) < 1.0, f"pings did not resume: {gaps}"
    assert ship.alive()
    ship.stop_ok()


def test_sigterm_under_load_loses_nothing(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path, harness: Harness,
) -> None:
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    base = unique("svc-term")
    topics = {f"{base}.a": 2, f"{base}.b": 2}
    create_topics(primary, topics)
    # Small segments: uploads and apply transactions are in flight when SIGTERM lands.
    setup = flow(tmp_path, primary_kafka, standby_kafka, [re.escape(base) + r"\..*"],
                 "svc-term", apply_metrics=True,
                 ship={"flush_interval_s": 0.1, "max_bytes": 8192, "heartbeat_interval_s": 1})
    with checkpoint_watch(standby) as watch:
        load = LoadProducer(primary, topics, rate_per_s=300, txn_every=150)
        load.start()
        try:
            load.wait_produced(150)
            socks = {c: harness.listener(c) for c in ("ship", "apply")}
            procs = {c: harness.start(c, setup, f"{c}-1", socks[c]) for c in socks}
            for c, proc in procs.items():
                socks[c].wait("READY=1", proc)
            wait_for(lambda: (watch.get(setup.checkpoint_key) or {}).get("seq", 0) >= 3, 60,
                     "apply to commit a few segments", procs.values())
            port = metrics_port(setup, "apply")
            assert (metric(scrape(port), "drstream_applied_seq") or 0) >= 1
            assert http_get(port, "/readyz")[0] == 200
            produced_at_term = load.produced
            for proc in procs.values():  # both at once, mid-load
                proc.signal(signal.SIGTERM)
            for c, proc in procs.items():
                rc = proc.wait_exit(90)
                assert rc == 0, f"{c} exited {rc} after SIGTERM\n{proc.describe()}"
                assert socks[c].find("STOPPING=1") is not None
            assert not procs["ship"].event("drain_deadline_exceeded")
            print(f"SIGTERM after {produced_at_term} records; "
                  f"applied seq {watch.get(setup.checkpoint_key)['seq']}")
            # Restart both while the load goes on, then stop the load.
            again = {c: harness.start(c, setup, f"{c}-2") for c in ("ship", "apply")}
            for proc in again.values():
                proc.wait_ready()
            load.wait_produced(load.produced + 300)
        finally:
            load._stop.set()
        load.stop()
        print(f"produced {load.produced} plain records, {load.transactions} transactions "
              f"({load.aborted} aborted)")
        source = read_topics(primary, topics)
        watch.wait_applied(setup, next_offsets(source), timeout=120, procs=again.values())
        for proc in again.values():
            proc.stop_ok()
    replica = read_topics(standby, topics)
    compare_replica(as_source(replica, origin="primary"), source,
                    what="standby vs primary after SIGTERM and restart")
    # A graceful stop re-ships nothing: the log holds every record once, in order.
    compare_records(read_log(setup.raw["store"], setup.log_id, setup.keyring), source,
                    what="log vs primary after SIGTERM and restart")
    print(f"{count(replica)} records on the standby, each exactly once")


def test_sighup_reloads_topics_and_rejects_a_bad_config(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path, harness: Harness,
) -> None:
    primary = primary_kafka.bootstrap_servers
    uid = uuid.uuid4().hex[:10]
    t1, t2 = f"t1-{uid}", f"t2-{uid}"
    create_topics(primary, {t1: 2, t2: 1})
    produce(primary, t1, 40, partitions=2, tag="a")
    produce(primary, t2, 30, tag="a")
    setup = flow(tmp_path, primary_kafka, standby_kafka, [re.escape(t1)], "svc-hup")
    sock = harness.listener("ship")
    ship = harness.start("ship", setup, "ship", sock)
    sock.wait("READY=1", ship)
    wait_logged(setup, {(t1, 0): 20, (t1, 1): 20}, ship)
    time.sleep(2.5)  # two discovery intervals (1 s): t2 must still not be picked up
    assert t2 not in logged_topics(setup), "t2 shipped although not selected"

    # Widen the selection: t2's records (from its beginning) are shipped, no restart.
    pid = ship.pid
    setup.raw["sources"][0]["topics"]["include"] = [re.escape(t1), re.escape(t2)]
    setup.rewrite()
    mark = sock.count()
    ship.signal(signal.SIGHUP)
    reloading_at, reloading = sock.wait("RELOADING=1", ship, since=mark)
    assert reloading.field("MONOTONIC_USEC") is not None, reloading.lines
    sock.wait("READY=1", ship, since=reloading_at)
    wait_for(lambda: bool(ship.event("config_reloaded")), 30, "config_reloaded", [ship])
    wait_logged(setup, {(t2, 0): 30}, ship)
    assert ship.alive() and ship.pid == pid

    # An unknown key: rejected, logged naming the key; the running config keeps shipping.
    setup.rewrite(bogus_reload_key=True)
    mark = sock.count()
    ship.signal(signal.SIGHUP)
    reloading_at, _ = sock.wait("RELOADING=1", ship, since=mark)
    sock.wait("READY=1", ship, since=reloading_at)
    wait_for(lambda: bool(ship.event("config_reload_rejected")), 30,
             "config_reload_rejected", [ship])
    [rejected] = ship.event("config_reload_rejected")
    assert "bogus_reload_key" in rejected["error"] and "unknown key" in rejected["error"], \
        rejected
    assert rejected["level"] == "error"
    produce(primary, t1, 20, partitions=2, tag="b")
    produce(primary, t2, 10, tag="b")
    wait_logged(setup, {(t1, 0): 30, (t1, 1): 30, (t2, 0): 40}, ship)

    # Identity keys (log_id, store, keyring) cannot change live.
    del setup.raw["bogus_reload_key"]
    log_id = setup.log_id
    setup.rewrite(log_id=unique("svc-hup-other"))
    ship.signal(signal.SIGHUP)
    wait_for(lambda: len(ship.event("config_reload_rejected")) == 2, 30,
             "the log_id change to be rejected", [ship])
    second = ship.event("config_reload_rejected")[1]
    assert "log_id" in second["error"] and "restart" in second["error"], second
    assert ship.alive() and ship.pid == pid
    ship.stop_ok()
    assert ship.event("ship_stopped")[-1]["durable_seq"] >= 1
    setup.rewrite(log_id=log_id)  # the log the shipper kept writing

    source = read_primary(primary, [t1, t2])
    compare_records(read_log(setup.raw["store"], setup.log_id, setup.keyring), source,
                    what="log vs primary after the reloads")


def test_metrics_lag_health_and_readiness(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path, harness: Harness,
) -> None:
    primary = primary_kafka.bootstrap_servers
    topic = unique("svc-metrics")
    create_topics(primary, {topic: 2})
    setup = flow(tmp_path, primary_kafka, standby_kafka, [re.escape(topic)], "svc-metrics",
                 ship_metrics=True)
    port = metrics_port(setup, "ship")
    sock = harness.listener("ship")
    ship = harness.start("ship", setup, "ship", sock)
    wait_for(answers(port, "/readyz", 200), 60, "/readyz 200", [ship], interval=0.1)
    # READY=1 is sent before /readyz turns 200; the listener thread may read it a moment later
    sock.wait("READY=1", ship, timeout=5)
    assert http_get(port, "/healthz") == (200, "ok\n")
    assert http_get(port, "/nope")[0] == 404
    wait_for(lambda: metric(scrape(port), "drstream_ship_lag_seconds", stream=STREAM) == 0.0,
             30, "drstream_ship_lag_seconds 0 while idle", [ship], interval=0.1)
    assert ("process_cpu_seconds_total", ()) in scrape(port)

    load = LoadProducer(primary, {topic: 2}, rate_per_s=400, txn_every=10**9)
    load.start()
    lags: list[float] = []
    try:
        load.wait_produced(50)

        def lagging() -> bool:
            lags.append(metric(scrape(port), "drstream_ship_lag_seconds", stream=STREAM) or 0)
            return lags[-1] > 0

        wait_for(lagging, 30, "drstream_ship_lag_seconds > 0 under load", [ship], interval=0.1)
    finally:
        load._stop.set()
    load.stop()
    print(f"lag samples under load: {[round(x, 3) for x in lags]}")
    assert max(lags) < 30, f"ship lag {max(lags)}s under a light load"

    zeros = 0

    def caught_up() -> bool:
        nonlocal zeros
        samples = scrape(port)
        shipped = metric(samples, "drstream_records_total", role="ship", stream=STREAM) or 0
        lag = metric(samples, "drstream_ship_lag_seconds", stream=STREAM)
        zeros = zeros + 1 if lag == 0 and shipped >= load.produced else 0
        return zeros >= 3  # every record shipped, and the lag stays at 0

    wait_for(caught_up, 30, "drstream_ship_lag_seconds back to 0 after the load", [ship],
             interval=0.2)
    final = scrape(port)
    assert (metric(final, "drstream_durable_head_seq") or 0) >= 1
    assert (metric(final, "drstream_segment_upload_seconds_count") or 0) >= 1
    assert http_get(port, "/readyz") == (200, "ready\n")
    ship.stop_ok()


def test_not_ready_until_connected(tmp_path: Path, harness: Harness) -> None:
    """An unreachable primary: /healthz answers, /readyz is 503, no READY=1, then exit 3
    once the outage budget (here 8 s) is spent."""
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    setup = write_dr_config(
        tmp_path, store={"type": "file", "path": str(tmp_path / "store")},
        source_bootstrap=dead, sink_bootstrap=dead, include=[".*"],
        log_id=unique("svc-unready"), source={"connect_timeout_s": 6})
    port = free_port()
    setup.rewrite(service={"ship_metrics_listen": f"127.0.0.1:{port}",
                           "apply_metrics_listen": None, "outage_budget_s": 8})
    sock = harness.listener("ship")
    ship = harness.start("ship", setup, "ship", sock)
    wait_for(answers(port, "/healthz", 200), 30, "/healthz", [ship], interval=0.1)
    status, body = http_get(port, "/readyz")
    assert status == 503 and "starting" in body, (status, body)
    rc = ship.wait_exit(60)
    assert rc == 3, f"exit {rc} for an unreachable primary (expected 3)\n{ship.describe()}"
    assert sock.find("READY=1") is None, sock.dump()
    assert "cannot reach Kafka cluster" in ship.output(), ship.describe()
