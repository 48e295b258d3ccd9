"""Stopping a Kafka cluster leaves no process behind: not its pid, not any JVM that was
started for its work directory (storage format tool included), not its pid file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infra.kafka import KafkaCluster
from tests.infra.procs import RUN_DIR, pid_alive, recorded_pids

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def processes_using(workdir: Path) -> list[int]:
    """Live processes whose command line names `workdir` (the broker JVM passes its
    server.properties from there); zombies have an empty command line and do not count."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(workdir).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue  # exited while we looked
    return found


def assert_gone(pid: int, workdir: Path) -> None:
    assert not pid_alive(pid), f"broker pid {pid} still running"
    assert processes_using(workdir) == [], "a process of this cluster is still running"
    assert pid not in recorded_pids(), "pid file left in the run directory"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.infra", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240, check=False)


def test_cli_detached_cluster_is_stopped_by_pid() -> None:
    up = run_cli("kafka", "up", "--count", "1", "--detach", "--json")
    assert up.returncode == 0, up.stderr
    [service] = json.loads(up.stdout)
    pid, workdir = int(service["pid"]), Path(service["workdir"])
    try:
        assert pid_alive(pid) and processes_using(workdir) == [pid]
        assert pid in recorded_pids()
        # The detached broker outlives the CLI process and still serves clients.
        cluster = KafkaCluster("cli-check", workdir)
        assert cluster.bootstrap_servers == service["bootstrap"]
        assert cluster.admin().list_topics(timeout=10).brokers
    finally:
        down = run_cli("stop", str(pid))
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert_gone(pid, workdir)
    shutil.rmtree(workdir)


def test_stop_and_kill_leave_no_process(tmp_path: Path) -> None:
    cluster = KafkaCluster("leftover", tmp_path / "kafka")
    try:
        cluster.start()
        first = cluster.pid
        assert first is not None and pid_alive(first)
        cluster.stop()
        assert_gone(first, cluster.workdir)

        cluster.start()
        second = cluster.pid
        assert second is not None and second != first
        cluster.kill()
        assert_gone(second, cluster.workdir)
    finally:
        cluster.stop()
    assert not list(RUN_DIR.glob("kafka-leftover.*.pid"))
