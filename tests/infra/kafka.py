"""Real single-node Apache Kafka (KRaft) clusters on loopback for tests, benchmarks and the CLI.

The broker jars come from Maven Central through `tests/infra/pom.xml` (one pinned Kafka
version) and are cached in `CACHE_DIR/kafka-<version>/jars`; nothing is installed system-wide.
Each cluster is one JVM running broker and controller together, with its own work directory
(server.properties, data/, server.log) and free loopback ports that survive a restart, so a
test can take a broker down and bring it back at the same address with the same data.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from confluent_kafka.admin import AdminClient

from tests.infra.procs import (
    CACHE_DIR,
    RUN_DIR,
    Proc,
    ServiceStartError,
    free_port,
    port_open,
    start_process,
    wait_until,
)

log = logging.getLogger(__name__)

INFRA_DIR = Path(__file__).resolve().parent
POM = INFRA_DIR / "pom.xml"
LOG4J_CONFIG = INFRA_DIR / "log4j2.properties"
START_TIMEOUT = float(os.environ.get("DRSTREAM_KAFKA_START_TIMEOUT", "120"))

# Broker settings every test cluster gets. A single node can only hold one replica, so the
# internal topics must not ask for more; their partition counts are cut from 50 to 4 because
# creating 50 partitions on first group/transaction use costs seconds per cluster.
BASE_CONFIG: dict[str, str] = {
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    "num.partitions": "1",
    "default.replication.factor": "1",
    "min.insync.replicas": "1",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "4",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "4",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "share.coordinator.state.topic.num.partitions": "1",
    "group.initial.rebalance.delay.ms": "0",
    # After a kill -9 the controller refuses the restarted broker (duplicate registration)
    # until the old session times out: 9s by default, 5s here. Not lower, as a single broker
    # that misses heartbeats on a busy 2-core machine is fenced and takes every partition
    # offline with it.
    "broker.heartbeat.interval.ms": "1000",
    "broker.session.timeout.ms": "5000",
    # A DR replicator must create standby topics itself (same partition count as the
    # primary); auto-creation would hide that bug behind a 1-partition topic.
    "auto.create.topics.enable": "false",
}


def pinned_version() -> str:
    """The Kafka version pinned in pom.xml (single source of truth)."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(POM).getroot().find("m:properties/m:kafka.version", ns)
    if node is None or not node.text:
        raise ServiceStartError(f"no <kafka.version> property in {POM}")
    return node.text.strip()


KAFKA_VERSION = pinned_version()


def require_tool(name: str) -> str:
    """Path of `java` or `mvn`; java is taken from JAVA_HOME first, like Kafka's scripts do."""
    if name == "java" and os.environ.get("JAVA_HOME"):
        candidate = Path(os.environ["JAVA_HOME"]) / "bin" / "java"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        hint = "install a JDK 17+ or set JAVA_HOME" if name == "java" else "install Maven 3.8+"
        raise ServiceStartError(
            f"`{name}` not found on PATH; the Kafka test clusters need it: {hint}")
    return found


def _pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def ensure_jars() -> Path:
    """Directory of Kafka jars, resolved by Maven once and then reused.

    The marker file is written only after a complete copy and holds the pom digest, so an
    interrupted download or an edited pom is resolved again. A file lock keeps parallel
    sessions from copying into the same directory at once.
    """
    home = CACHE_DIR / f"kafka-{KAFKA_VERSION}"
    jars, marker = home / "jars", home / "complete"
    digest = _pom_digest()
    if marker.is_file() and marker.read_text() == digest:
        return jars
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == digest:
            return jars  # another process finished while we waited
        _download_jars(home, jars)
        marker.write_text(digest)
    return jars


def _download_jars(home: Path, jars: Path) -> None:
    mvn = require_tool("mvn")
    require_tool("java")  # fail early with a clear message rather than inside Maven
    staging = home / "jars.partial"
    shutil.rmtree(staging, ignore_errors=True)
    started = time.monotonic()
    result = subprocess.run(
        [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
         f"-DoutputDirectory={staging}"],
        capture_output=True, text=True, timeout=900, check=False,
    )
    if result.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
        raise ServiceStartError(
            f"mvn could not resolve Kafka {KAFKA_VERSION} jars (exit {result.returncode}):\n"
            f"{(result.stdout + result.stderr)[-4000:]}"
        )
    shutil.rmtree(jars, ignore_errors=True)
    staging.rename(jars)
    message = (f"Kafka {KAFKA_VERSION} jars resolved into {jars} "
               f"in {time.monotonic() - started:.1f}s")
    log.info(message)
    print(message, file=sys.stderr)


# Ports handed out by this process. free_port() releases its socket before the broker binds,
# so two clusters started side by side could otherwise be given the same port.
_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def _new_port() -> int:
    with _ports_lock:
        while True:
            port = free_port()
            if port not in _ports_given:
                _ports_given.add(port)
                return port


def _read_properties(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def _listener_port(listeners: str, name: str) -> int:
    match = re.search(rf"{name}://[^,]*:(\d+)", listeners)
    if match is None:
        raise ServiceStartError(f"no {name} listener in {listeners!r}")
    return int(match[1])


def _new_cluster_id() -> str:
    """A Kafka Uuid in its text form (URL-safe base64, no padding); a leading '-' would be
    read as an option by the storage tool, so such ids are redrawn, as Kafka does."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _jvm_base(jars: Path) -> list[str]:
    return [require_tool("java"), "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}", "-cp", f"{jars}/*"]


class KafkaCluster:
    """One single-node KRaft cluster (combined broker+controller) on 127.0.0.1.

    Attributes: name, workdir, port, controller_port, bootstrap_servers, pid, log_path.
    start()/stop()/kill()/restart() keep the work directory and the ports, so data and
    client configuration survive an outage; remove() deletes the work directory.
    """

    def __init__(
        self, name: str = "kafka", workdir: Path | None = None, *, heap: str = "512m",
        config: dict[str, str] | None = None, sasl_users: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        # with users: a second listener, SASL_PLAINTEXT with mechanism PLAIN, for clients
        # that must authenticate (a secured cluster); user -> password
        self.sasl_users = dict(sasl_users or {})
        self.sasl_port = 0
        if workdir is None:
            (RUN_DIR / "kafka").mkdir(parents=True, exist_ok=True)
            workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=RUN_DIR / "kafka"))
        self.workdir = Path(workdir)
        self.heap = heap
        self.overrides = dict(config or {})
        self.port = 0
        self.controller_port = 0
        self.cluster_id = ""
        self.startup_seconds = 0.0
        self._proc: Proc | None = None
        self._load_existing()

    # -- addresses and state ---------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap_servers(self) -> str:
        """The SASL_PLAINTEXT listener (a cluster made with `sasl_users`)."""
        assert self.sasl_port, f"{self.name} has no SASL listener"
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def pid(self) -> int | None:
        """Pid of the broker JVM (the last one, once stopped)."""
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def properties_path(self) -> Path:
        return self.workdir / "server.properties"

    def alive(self) -> bool:
        return self._proc is not None and self._proc.alive()

    def log_tail(self, lines: int = 60) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def admin(self, **conf: str) -> AdminClient:
        return AdminClient({"bootstrap.servers": self.bootstrap_servers, **conf})

    def __repr__(self) -> str:
        return f"KafkaCluster({self.name!r}, {self.bootstrap_servers}, pid={self.pid})"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> KafkaCluster:
        """Format on first start, launch the JVM and wait until it serves metadata."""
        if self.alive():
            return self
        jars = ensure_jars()
        started = time.monotonic()
        if self._formatted():
            self._launch(jars, timeout)
        else:
            self._first_start(jars, timeout)
        self.startup_seconds = time.monotonic() - started
        log.info("%s up at %s (pid %s) in %.1fs", self.name, self.bootstrap_servers,
                 self.pid, self.startup_seconds)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (clean shutdown, flushes logs), then SIGKILL after `timeout`."""
        if self._proc is not None:
            self._proc.stop(timeout=timeout)

    def kill(self) -> None:
        """kill -9: a crash, no shutdown hooks; the next start runs log recovery."""
        if self._proc is not None:
            self._proc.kill()
            with contextlib.suppress(FileNotFoundError):
                self._proc.pid_path.unlink()

    def restart(self, timeout: float = START_TIMEOUT, *, hard: bool = False) -> KafkaCluster:
        """Stop (or kill, if `hard`) and start again on the same data dir and ports."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start(timeout=timeout)

    def remove(self) -> None:
        """Stop and delete the work directory (data and logs)."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------

    def _formatted(self) -> bool:
        return (self.data_dir / "meta.properties").is_file() and self.properties_path.is_file()

    def _load_existing(self) -> None:
        """Adopt the ports of an already formatted work directory (restart from another
        process, e.g. the CLI), so its clients keep working."""
        if not self._formatted():
            return
        listeners = _read_properties(self.properties_path)["listeners"]
        self.port = _listener_port(listeners, "PLAINTEXT")
        self.controller_port = _listener_port(listeners, "CONTROLLER")
        if self.sasl_users:
            self.sasl_port = _listener_port(listeners, "SASL_PLAINTEXT")
        self.cluster_id = _read_properties(self.data_dir / "meta.properties")["cluster.id"]

    def _first_start(self, jars: Path, timeout: float) -> None:
        # Ports are picked just before the JVM binds them; another process may still win the
        # race, so a bind failure is retried with new ports on a fresh data dir.
        for attempt in range(3):
            self.port, self.controller_port = _new_port(), _new_port()
            self.sasl_port = _new_port() if self.sasl_users else 0
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self._write_properties()
            self._format(jars)
            log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self._launch(jars, timeout)
                return
            except ServiceStartError:
                if attempt == 2 or not self._bind_failed_since(log_size):
                    raise
                log.warning("%s: port taken, retrying with new ports", self.name)

    def _bind_failed_since(self, offset: int) -> bool:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return b"Address already in use" in f.read()

    def _write_properties(self) -> None:
        config = {
            **BASE_CONFIG,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
                         f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            # Static one-voter quorum: nothing about the voter is stored at format time,
            # which keeps the data dir valid for restarts on the same ports.
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "log.dirs": str(self.data_dir),
            **self._sasl_config(),
            **self.overrides,
        }
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.properties_path.write_text("".join(f"{k}={v}\n" for k, v in config.items()))

    def _sasl_config(self) -> dict[str, str]:
        if not self.sasl_users:
            return {}
        users = " ".join(f'user_{u}="{pw}"' for u, pw in self.sasl_users.items())
        sasl = f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}"
        return {
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},{sasl},"
                         f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port},{sasl}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,"
                                              "SASL_PLAINTEXT:SASL_PLAINTEXT",
            "sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config":
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};",
        }

    def _format(self, jars: Path) -> None:
        """Write meta.properties and the bootstrap metadata (`kafka-storage.sh format`)."""
        self.cluster_id = _new_cluster_id()
        # A short-lived tool: C1-only JIT and serial GC make the JVM start faster.
        argv = [*_jvm_base(jars), "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
                "kafka.tools.StorageTool", "format", "-t", self.cluster_id,
                "-c", str(self.properties_path)]
        format_log = self.workdir / "format.log"
        with open(format_log, "wb") as out:
            result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=120, check=False)
        if result.returncode != 0:
            tail = "\n".join(format_log.read_text(errors="replace").splitlines()[-30:])
            raise ServiceStartError(f"{self.name}: storage format failed "
                                    f"(exit {result.returncode}), {format_log}:\n{tail}")

    def _launch(self, jars: Path, timeout: float) -> None:
        argv = [*_jvm_base(jars), "-Xms128m", f"-Xmx{self.heap}", "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError",
                f"-Dkafka.logs.dir={self.workdir}", "kafka.Kafka", str(self.properties_path)]
        # A marker line, so a log tail shows which start (after a restart) it belongs to.
        with open(self.log_path, "a") as out:
            out.write(f"--- drstream: starting {self.name} on {self.bootstrap_servers} "
                      f"at {time.strftime('%H:%M:%S')} ---\n")
        self._proc = start_process(f"kafka-{self.name}", argv, self.log_path, cwd=self.workdir)
        proc = self._proc
        wait_until(lambda: port_open(self.port), timeout, proc, f"listening on {self.port}")
        admin = self.admin()
        # The listener opens before the broker is unfenced; metadata lists only unfenced
        # brokers, so a non-empty broker list means it can take produce/create requests.
        wait_until(lambda: bool(admin.list_topics(timeout=2).brokers), timeout, proc,
                   "serving metadata")


def cluster_names(count: int) -> list[str]:
    return ["primary", "standby", *(f"kafka{i}" for i in range(3, count + 1))][:count]


def start_clusters(
    names: Sequence[str] = ("primary", "standby"), *, parallel: bool = True,
    timeout: float = START_TIMEOUT, base_dir: Path | None = None,
) -> list[KafkaCluster]:
    """Start independent clusters (side by side when `parallel`); all or none come up."""
    ensure_jars()  # once, before the threads, so they do not queue on the download lock
    clusters = [KafkaCluster(n, base_dir / n if base_dir else None) for n in names]
    started = time.monotonic()
    try:
        if parallel:
            with ThreadPoolExecutor(max_workers=len(clusters)) as pool:
                for future in [pool.submit(c.start, timeout) for c in clusters]:
                    future.result()
        else:
            for c in clusters:
                c.start(timeout)
    except BaseException:
        for c in clusters:
            c.stop()
        raise
    log.info("%d Kafka clusters up in %.1fs", len(clusters), time.monotonic() - started)
    return clusters
