"""Every user mistake ends in exit 2 and one line naming the option or field (never a
traceback, never a secret, nothing created or deleted); runtime failures end in exit 3
naming what failed; the output never says "None".

The commands run in this process (`cli.main`) against a file store holding a real log,
or as processes where a signal or a hang is the point. No Kafka: where a cluster is
needed, it is one that cannot answer (a refused or a silent port).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from drstream.connectors.file.store import FileStore, FileStoreConfig
from drstream.connectors.kafka.config import DEFAULT_CONNECT_TIMEOUT_S
from drstream.connectors.kafka.source import PROBE_TIMEOUT_S
from drstream.daemon import render
from drstream.daemon.cli import main
from drstream.daemon.deltalog import LogWriter
from drstream.daemon.keyring import KeyRing, generate_key_file, load_key
from drstream.daemon.logging import configure_logging, pin
from drstream.daemon.status import StatusReport
from tests.contract.test_deltalog_contract import body
from tests.infra.procs import free_port

LOG = "east-1"
SEGMENTS = 4
ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "drstream.daemon.cli"]


@dataclass
class Setup:
    """A file store holding log `east-1` (kafka:primary, topic orders), its key, and a
    config naming both (no sources, no sinks) that tests extend."""

    tmp: Path
    store: Path
    key: Path
    raw: dict[str, Any]

    def config(self, name: str = "c.yaml", **changes: Any) -> str:
        path = self.tmp / name
        path.write_text(yaml.safe_dump({**self.raw, **changes}, sort_keys=False))
        return str(path)

    def segments(self) -> list[str]:
        return sorted(p.name for p in (self.store / "logs" / LOG).iterdir())


@pytest.fixture(autouse=True)
def unpinned_logging() -> Iterator[None]:
    """main() pins --log-* for its process: later tests start from the defaults."""
    yield
    pin(None, None)
    configure_logging()


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    key = tmp_path / "k1.key"
    generate_key_file(key)
    store = tmp_path / "store"

    async def write() -> None:
        keyring = KeyRing({"k1": load_key(f"file:{key}")}, "k1")
        async with FileStore(FileStoreConfig(type="file", path=str(store))) as fs:
            writer = LogWriter(fs, LOG, keyring)
            await writer.open()
            for i in range(SEGMENTS):  # one at a time: each names its predecessor durable
                await writer.append(body(3, start=3 * i))
                await writer.flush()

    asyncio.run(write())
    raw = {"log_id": LOG, "store": {"type": "file", "path": str(store)},
           "keyring": {"active": "k1", "keys": {"k1": f"file:{key}"}},
           "logging": {"level": "info", "format": "console"}}
    return Setup(tmp_path, store, key, raw)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`drstream ARGS` in this process (console output): exit code, stdout, stderr."""
    code = main(["--log-format", "console", *args])
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run a command that must end in exit 2 with one `drstream:` line; that line."""
    code, out, err = run(capsys, *args)
    lines = [line for line in err.splitlines() if line.startswith("drstream:")]
    assert code == 2 and len(lines) == 1, f"exit {code}\n{out}\n{err}"
    assert "Traceback" not in err
    return lines[0]


def dead_cluster() -> str:
    """An address where nothing listens (connections are refused)."""
    return f"127.0.0.1:{free_port()}"


@contextlib.contextmanager
def silent_cluster() -> Iterator[str]:
    """An address that accepts connections and never answers (a broker that hangs)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def kafka_source(bootstrap: str, **extra: Any) -> dict[str, Any]:
    return {"type": "kafka", "bootstrap_servers": bootstrap, "topics": {"include": [".*"]},
            "connect_timeout_s": 2, **extra}


def kafka_sink(bootstrap: str, **extra: Any) -> dict[str, Any]:
    return {"type": "kafka", "bootstrap_servers": bootstrap, "connect_timeout_s": 2, **extra}


# --------------------------------------------------------------------------- item 3


def test_prune_refuses_a_config_without_sinks_and_deletes_nothing(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """A ship config has no sinks: pruning with it would delete what no apply has read."""
    before = setup.segments()
    line = usage_error(capsys, "prune", "--config", setup.config(), "--older-than", "0s")
    assert "sinks" in line and "--no-sink-check" in line
    assert setup.segments() == before
    code, out, _ = run(capsys, "prune", "--config", setup.config(), "--older-than", "0s",
                       "--no-sink-check")
    assert code == 0 and f"deleted {SEGMENTS - 1} segments" in out, out
    assert setup.segments() == before[-1:]  # the head stays


# --------------------------------------------------------------------------- item 4


def test_replay_of_a_mistyped_store_log_or_stream_fails_and_creates_nothing(
        setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    typo = tmp_path / "typo" / "store"
    key = f"k1=file:{setup.key}"
    line = usage_error(capsys, "replay", "--store", typo.as_uri(), "--log-id", LOG, "--key",
                       key, "--dry-run")
    assert "--log-id" in line and "no segments" in line
    assert not typo.parent.exists()
    line = usage_error(capsys, "replay", "--store", setup.store.as_uri(), "--log-id", "nope",
                       "--key", key, "--dry-run")
    assert "--log-id" in line and "'nope'" in line
    line = usage_error(capsys, "replay", "--config", setup.config(), "--stream", "kafka:nope",
                       "--dry-run")
    assert "--stream" in line and "kafka:primary" in line  # names the streams there are
    code, out, _ = run(capsys, "replay", "--config", setup.config(), "--dry-run")
    assert code == 0 and f"would write {3 * SEGMENTS} records" in out


def test_verify_of_a_missing_store_is_a_usage_error_and_creates_nothing(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "store"
    line = usage_error(capsys, "verify", missing.as_uri())
    assert "URL" in line and "no logs" in line
    assert not missing.parent.exists()


# --------------------------------------------------------------------------- item 5


@pytest.mark.parametrize(("option", "value"), [
    ("--topics", "(["), ("--rename", "{foo}"), ("--rename", "{topic"),
    ("--parallel", "-5"), ("--until-seq", "-1")])
def test_bad_replay_options_are_usage_errors_found_before_reading(
        setup: Setup, capsys: pytest.CaptureFixture[str], option: str, value: str) -> None:
    line = usage_error(capsys, "replay", "--config", setup.config(), "--dry-run",
                       f"{option}={value}")
    assert option in line and value in line


def test_failover_without_sinks_names_the_section(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    line = usage_error(capsys, "failover", "--config", setup.config())
    assert "sinks" in line


def test_an_unknown_librdkafka_property_fails_validate_naming_it(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    path = setup.config(sources=[kafka_source(dead_cluster(),
                                              properties={"fetch.wait.max.msec": 5})],
                        sinks=[kafka_sink(dead_cluster(),
                                          properties={"security.protocol": "bogus"},
                                          secret_properties={"sasl.passwrd": "env:PW"})])
    code, _, err = run(capsys, "validate", path)
    assert code == 2, err
    assert "sources[0].properties" in err and "fetch.wait.max.msec" in err
    assert "sinks[0].properties" in err and "security.protocol" in err
    assert "sinks[0].secret_properties" in err and "sasl.passwrd" in err
    assert "Traceback" not in err


def test_a_config_that_is_not_utf8_is_a_usage_error(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("log_id: ost-1 # Köln\n".encode("latin-1"))
    code, _, err = run(capsys, "validate", str(path))
    assert code == 2 and "not UTF-8" in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- item 6


def test_a_dry_run_with_parallel_0_is_refused_not_hung(setup: Setup) -> None:
    res = subprocess.run([*CLI, "replay", "--config", setup.config(), "--dry-run",
                          "--parallel", "0"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert res.returncode == 2 and "--parallel" in res.stderr, res.stderr


# --------------------------------------------------------------------------- item 7


def test_a_key_given_instead_of_its_reference_is_never_printed(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    secret = setup.key.read_text().strip()
    for key_arg in (f"k1={secret}", secret):
        code, out, err = run(capsys, "verify", setup.store.as_uri(), "--deep", "--key", key_arg)
        assert code == 2 and "--key" in err, err
        assert secret not in out + err and secret[:12] not in out + err
    path = setup.config(keyring={"active": "k1", "keys": {"k1": secret}})
    code, out, err = run(capsys, "validate", path)
    assert code == 2 and "keyring.keys.k1" in err
    assert secret not in out + err


# --------------------------------------------------------------------------- item 8


def signalled(args: list[str], log: Path, sig: int, ready: str,
              timeout: float = 60) -> tuple[int, float]:
    """Start `drstream ARGS`, wait for `ready` in its output, send `sig`: (exit code,
    seconds from the signal to the exit)."""
    with log.open("wb") as out:
        proc = subprocess.Popen([*CLI, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while ready not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no {ready!r}: {log.read_text()}"
            time.sleep(0.05)
        time.sleep(0.5)  # inside the blocked connect
        sent = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(timeout=timeout)
        return code, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# A connect that does not answer blocks this long; the commands must not wait it out.
STUCK_CONNECT_S = 60


def test_sigterm_while_starting_stops_the_service_at_once_with_exit_0(
        setup: Setup, tmp_path: Path) -> None:
    """systemctl stop during a broker outage must leave the unit stopped, not failed."""
    with silent_cluster() as broker:
        path = setup.config(sources=[kafka_source(broker, connect_timeout_s=STUCK_CONNECT_S)],
                            service={"ship_metrics_listen": None},
                            logging={"level": "info", "format": "json"})
        log = tmp_path / "ship.log"
        code, took = signalled(["ship", "--config", path], log, signal.SIGTERM, '"log_opened"')
    assert code == 0, log.read_text()
    assert took < STUCK_CONNECT_S / 2, f"waited {took:.1f}s: the connect timeout"
    assert "stopped_while_starting" in log.read_text()


# status: the source probe's requests; replay: starting its target sink (the default
# connect timeout of a --target-bootstrap)
@pytest.mark.parametrize(("command", "blocked_s"), [("status", PROBE_TIMEOUT_S),
                                                   ("replay", DEFAULT_CONNECT_TIMEOUT_S)])
def test_ctrl_c_ends_an_operator_command_at_once(
        setup: Setup, tmp_path: Path, command: str, blocked_s: float) -> None:
    with silent_cluster() as broker:
        extra = ["--target-bootstrap", broker] if command == "replay" else []
        path = setup.config(
            sources=[kafka_source(broker, connect_timeout_s=STUCK_CONNECT_S)],
            logging={"level": "debug", "format": "json"})
        log = tmp_path / f"{command}.log"
        # status probes the source; replay starts its target sink: both block on the broker
        code, took = signalled(["--log-level", "debug", command, "--config", path, *extra],
                               log, signal.SIGINT, '"command_started"')
    assert code == 130, log.read_text()
    assert took < blocked_s / 2, f"waited {took:.1f}s: the blocked call's timeout"


# --------------------------------------------------------------------------- item 9


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line parsed as JSON (fails on the first that is not)."""
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\nin:\n{text}") from None
    return out


def test_command_line_log_options_win_over_the_config(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    path = setup.config(logging={"level": "error", "format": "console"})
    code = main(["--log-level", "info", "--log-format", "json", "prune", "--config", path,
                 "--older-than", "1d", "--dry-run", "--no-sink-check"])
    _, err = capsys.readouterr()
    events = [e["event"] for e in json_lines(err)]
    assert code == 0 and "prune_done" in events  # an info line, in JSON


def test_in_json_mode_every_stderr_line_is_json_librdkafka_and_errors_included(
        setup: Setup, tmp_path: Path) -> None:
    # a short outage budget: ship retries the dead cluster that long, then exits 3
    path = setup.config(sources=[kafka_source(dead_cluster())],
                        service={"ship_metrics_listen": None, "outage_budget_s": 3},
                        logging={"level": "debug", "format": "json"})
    res = subprocess.run([*CLI, "ship", "--config", path], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    lines = json_lines(res.stderr)
    assert res.returncode == 3
    rdkafka = [e for e in lines if e["event"] == "librdkafka"]
    assert rdkafka and all({"facility", "client", "message"} <= set(e) for e in rdkafka)
    # the connect failure repeats every ~50 ms; the same line is logged once, counted
    assert len(rdkafka) < 10, len(rdkafka)
    assert lines[-1]["event"] == "command_failed" and lines[-1]["exit_code"] == 3
    assert "primary" in lines[-1]["error"]


# --------------------------------------------------------------------------- item 10


@pytest.mark.parametrize(("changes", "field", "shown"), [
    ({"service": {"ship_metrics_listen": "127.0.0.1:99999"}},
     "service.ship_metrics_listen", "99999"),
    ({"ship": {"drain_deadline_s": float("inf")}}, "ship.drain_deadline_s", "inf"),
    ({"ship": {"heartbeat_interval_s": 1e308}}, "ship.heartbeat_interval_s", "1e+308"),
    ({"sources": [kafka_source("a:1"), kafka_source("b:1")]}, "sources[1].name", "primary"),
    ({"sinks": [kafka_sink("a:1"), kafka_sink("b:1")]}, "sinks[1].name", "standby"),
    ({"sources": [kafka_source("a:1")], "sinks": [kafka_sink("b:1", source="kafka:nope")]},
     "sinks[0].source", "kafka:nope"),
    ({"sources": [kafka_source("a:1", start_from="2026-11-26T12:00:00")]},
     "sources[0].start_from", "2026-11-26T12:00:00"),
])
def test_validate_refuses(setup: Setup, capsys: pytest.CaptureFixture[str],
                          changes: dict[str, Any], field: str, shown: str) -> None:
    code, _, err = run(capsys, "validate", setup.config(**changes))
    assert code == 2 and field in err and shown in err, err


def test_validate_refuses_a_key_given_twice(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(setup.config())
    path.write_text(path.read_text() + f"log_id: {LOG}-b\n")
    code, _, err = run(capsys, "validate", str(path))
    assert code == 2 and "'log_id' appears twice" in err, err


def test_validate_checks_key_files_and_with_check_keys_reports_every_bad_key(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    loose = setup.tmp / "loose.key"
    loose.write_text(setup.key.read_text())
    loose.chmod(0o644)
    keys = {"k1": f"file:{setup.key}", "k2": f"file:{setup.tmp}/missing.key",
            "k3": f"file:{loose}"}
    path = setup.config(keyring={"active": "k1", "keys": keys})
    for extra in ([], ["--check-keys"]):
        code, _, err = run(capsys, "validate", path, *extra)
        assert code == 2, err
        assert "keyring.keys.k2" in err and "does not exist" in err
        assert "keyring.keys.k3" in err and "0644" in err
        assert "keyring.keys.k1" not in err


# --------------------------------------------------------------------------- item 12


def test_exit_codes_follow_the_contract(setup: Setup, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    url = setup.store.as_uri()
    assert "--deep" in usage_error(capsys, "verify", url, "--deep")
    assert "--from-seq" in usage_error(capsys, "verify", url, "--from-seq", "10",
                                       "--to-seq", "5")
    before = setup.key.read_bytes()
    assert "exists" in usage_error(capsys, "keys", "generate", str(setup.key))
    assert setup.key.read_bytes() == before
    new = setup.tmp / "k9.key"
    assert "--id" in usage_error(capsys, "keys", "generate", str(new), "--id", "bad id!")
    assert not new.exists()


def test_a_drill_whose_target_cannot_be_reached_fails_with_3_and_stores_nothing(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    path = setup.config(sinks=[kafka_sink(dead_cluster())])
    code, out, err = run(capsys, "drill", "--config", path, "--json")
    assert code == 3 and "cannot reach Kafka cluster" in err, err
    assert out == "" and not (setup.store / "audit").exists()


# --------------------------------------------------------------------------- item 13


def test_output_never_says_none(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "verify", setup.store.as_uri(), "--from-seq", "100")
    assert code == 1 and "None" not in out, out
    report = StatusReport(LOG, "file:///x", None, None, None,
                          streams={"kafka:primary": {"reachable": False, "error": "down",
                                                     "rpo_s_upper_bound": None}})
    assert "None" not in "\n".join(render.status(report))
    render.replay_progress("records")(0, -1, 0, 0, 0.0)
    assert "replay seq 0/0 (100%)" in capsys.readouterr().err


def test_a_dry_run_prune_logs_what_it_would_delete(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--log-format", "json", "prune", "--config", setup.config(),
                 "--older-than", "0s", "--dry-run", "--no-sink-check"])
    out, err = capsys.readouterr()
    done = next(e for e in json_lines(err) if e["event"] == "prune_done")
    assert code == 0 and done["would_delete"] == SEGMENTS - 1 and "deleted" not in done
    assert "would delete" in out


def test_status_with_the_primary_unreachable_or_over_a_threshold_exits_1(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    path = setup.config(sources=[kafka_source(dead_cluster())])
    code, out, _ = run(capsys, "status", "--config", path, "--max-rpo", "0")
    assert code == 1, out
    assert "PROBLEM        kafka:primary: source unreachable" in out
    assert "is over --max-rpo 0s" in out and "None" not in out


# --------------------------------------------------------------------------- bench


@pytest.mark.parametrize(("option", "value"), [
    ("--rate", "0"), ("--duration", "-1"), ("--record-bytes", "0"), ("--partitions", "0"),
    ("--ready-timeout", "0"), ("--out", "/nonexistent/dir/bench.json")])
def test_bench_refuses_a_run_it_cannot_honour_before_touching_a_cluster(
        setup: Setup, capsys: pytest.CaptureFixture[str], option: str, value: str) -> None:
    path = setup.config(sources=[kafka_source(dead_cluster())],
                        sinks=[kafka_sink(dead_cluster())])
    line = usage_error(capsys, "bench", "--config", path, f"{option}={value}")
    assert option in line and value in line


def test_bench_needs_a_stream_the_config_both_reads_and_applies(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    path = setup.config(sources=[kafka_source(dead_cluster())])
    assert "sources/sinks" in usage_error(capsys, "bench", "--config", path)
    path = setup.config(sources=[kafka_source(dead_cluster())],
                        sinks=[kafka_sink(dead_cluster())])
    line = usage_error(capsys, "bench", "--config", path, "--stream", "kafka:other")
    assert "kafka:other" in line
