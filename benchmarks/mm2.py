"""Apache Kafka MirrorMaker 2 in dedicated mode, for benchmarks that compare drstream with it.

    from benchmarks.mm2 import MirrorMaker2
    mm2 = MirrorMaker2(workdir, primary_bootstrap, standby_bootstrap, topics="^orders$")
    mm2.start(); mm2.wait_replicating(); ...; mm2.stop()

The jars (connect-mirror, connect-runtime and their dependencies, the same Kafka version as
the test brokers) are resolved by Maven from `benchmarks/mm2-pom.xml` once into
`~/.cache/drstream/mm2-<version>/jars` (DRSTREAM_CACHE moves it), like tests/infra does for
the brokers. MM2 runs as one JVM (`org.apache.kafka.connect.mirror.MirrorMaker`, the class
`connect-mirror-maker.sh` starts) with the heap and GC flags that script and
kafka-run-class.sh use, replicating primary -> standby only, with
IdentityReplicationPolicy so topic names stay the same on the standby (as drstream's
default topic_template does). Its internal topics get a per-instance suffix, so instances
started one after the other on the same clusters start cold and do not see each other's
offsets or connector configs. Started and stopped by pid (tests/infra/procs), log in the
work directory.

`python -m benchmarks.mm2 jars` resolves the jars and prints their directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.infra.procs import CACHE_DIR, Proc, start_process

POM = Path(__file__).resolve().parent / "mm2-pom.xml"
MAIN_CLASS = "org.apache.kafka.connect.mirror.MirrorMaker"
IDENTITY_POLICY = "org.apache.kafka.connect.mirror.IdentityReplicationPolicy"
# connect-mirror-maker.sh: KAFKA_HEAP_OPTS="-Xms256M -Xmx2G"; kafka-run-class.sh:
# KAFKA_JVM_PERFORMANCE_OPTS.
DEFAULT_HEAP = ("256m", "2g")
JVM_PERFORMANCE_OPTS = ["-server", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
                        "-XX:InitiatingHeapOccupancyPercent=35",
                        "-XX:+ExplicitGCInvokesConcurrent", "-XX:MaxInlineLevel=15",
                        "-Djava.awt.headless=true"]
# MM2 logs every task commit and rebalance at INFO; keep the lines that tell what it does,
# quiet the per-request and config-dump chatter.
LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.netclient.name = org.apache.kafka.clients.NetworkClient
logger.netclient.level = WARN
logger.appinfo.name = org.apache.kafka.common.utils.AppInfoParser
logger.appinfo.level = WARN
logger.reflections.name = org.reflections
logger.reflections.level = ERROR
"""


# Logged by every start on these clusters and harmless here: plugin scanning advice,
# the connector's attempt to sync topic configs it may not alter on the standby, the
# coordinator close on SIGTERM, a client's missing metadata before topics exist.
BENIGN_WARNINGS = ("plugin.discovery=service_load", "Could not alter configuration of topic",
                   "argument placeholders", "Close timed out with", "UNKNOWN_TOPIC")


class MM2Error(RuntimeError):
    """MirrorMaker 2 could not be resolved or started; the message says where to look."""


def pinned_version() -> str:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(POM).getroot().find("m:properties/m:kafka.version", ns)
    if node is None or not node.text:
        raise MM2Error(f"no <kafka.version> property in {POM}")
    return node.text.strip()


MM2_VERSION = pinned_version()


def ensure_jars() -> Path:
    """Directory of the MM2 jars, resolved by Maven once (marker = pom digest, file lock)."""
    home = CACHE_DIR / f"mm2-{MM2_VERSION}"
    jars, marker = home / "jars", home / "complete"
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    if marker.is_file() and marker.read_text() == digest:
        return jars
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == digest:
            return jars
        mvn = shutil.which("mvn")
        if mvn is None:
            raise MM2Error("`mvn` not found on PATH: MirrorMaker 2's jars are resolved with "
                           "Maven 3.8+")
        staging = home / "jars.partial"
        shutil.rmtree(staging, ignore_errors=True)
        started = time.monotonic()
        result = subprocess.run(
            [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
             f"-DoutputDirectory={staging}"],
            capture_output=True, text=True, timeout=900, check=False)
        if result.returncode != 0 or not any(staging.glob("connect-mirror-*.jar")):
            raise MM2Error(f"mvn could not resolve MirrorMaker 2 {MM2_VERSION} jars (exit "
                           f"{result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}")
        shutil.rmtree(jars, ignore_errors=True)
        staging.rename(jars)
        marker.write_text(digest)
        print(f"MirrorMaker 2 {MM2_VERSION} jars resolved into {jars} in "
              f"{time.monotonic() - started:.1f}s", file=sys.stderr)
    return jars


def java() -> str:
    if os.environ.get("JAVA_HOME"):
        candidate = Path(os.environ["JAVA_HOME"]) / "bin" / "java"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise MM2Error("`java` not found on PATH: MirrorMaker 2 needs a JDK 17+")
    return found


def mm2_properties(primary: str, standby: str, topics: str, *, suffix: str,
                   tasks: int = 1, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A dedicated-mode mm2.properties: primary -> standby only, identity topic names,
    replication factor 1 everywhere (single-broker clusters), internal topics and the
    Connect group named with `suffix`. `extra` overrides or adds any property (e.g.
    `primary->standby.producer.override.linger.ms`)."""
    props = {
        "clusters": "primary, standby",
        "primary.bootstrap.servers": primary,
        "standby.bootstrap.servers": standby,
        "primary->standby.enabled": "true",
        "standby->primary.enabled": "false",
        "primary->standby.topics": topics,
        "primary->standby.groups": ".*",
        "replication.policy.class": IDENTITY_POLICY,
        "tasks.max": str(tasks),
        "emit.heartbeats.enabled": "true",
        "emit.heartbeats.interval.seconds": "1",
        "emit.checkpoints.enabled": "true",
        "emit.checkpoints.interval.seconds": "5",
        "sync.group.offsets.enabled": "false",
        "sync.topic.configs.enabled": "true",
        "sync.topic.acls.enabled": "false",
        # The topics exist before MM2 starts; discovery of later ones is not measured.
        "refresh.topics.interval.seconds": "10",
        "refresh.groups.interval.seconds": "10",
        # Single-broker clusters hold one replica of everything.
        "replication.factor": "1",
        "checkpoints.topic.replication.factor": "1",
        "heartbeats.topic.replication.factor": "1",
        "offset-syncs.topic.replication.factor": "1",
        "offset.storage.replication.factor": "1",
        "status.storage.replication.factor": "1",
        "config.storage.replication.factor": "1",
        # Per-instance Connect group and internal topics: a cold start every time. Worker
        # settings are read from the target cluster's prefix (MirrorMakerConfig.workerConfig).
        "standby.group.id": f"mm2-{suffix}",
        "offset.storage.topic": f"mm2-offsets.{suffix}.internal",
        "status.storage.topic": f"mm2-status.{suffix}.internal",
        "config.storage.topic": f"mm2-configs.{suffix}.internal",
        "offset-syncs.topic.location": "target",
        # Internal topics, not the 25 partitions Connect asks for by default.
        "offset.storage.partitions": "1",
        "status.storage.partitions": "1",
    }
    props.update(extra or {})
    return props


class MirrorMaker2:
    """One dedicated-mode MirrorMaker 2 JVM replicating `topics` (a Java regex) from the
    primary to the standby cluster."""

    def __init__(self, workdir: Path, primary: str, standby: str, topics: str, *,
                 tasks: int = 1, heap: tuple[str, str] = DEFAULT_HEAP,
                 extra: dict[str, str] | None = None, name: str = "mm2") -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.suffix = f"{name}-{uuid.uuid4().hex[:8]}"
        self.properties = mm2_properties(primary, standby, topics, suffix=self.suffix,
                                         tasks=tasks, extra=extra)
        self.heap = heap
        self.proc: Proc | None = None
        self.launched = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def log_path(self) -> Path:
        return self.workdir / "mm2.log"

    @property
    def properties_path(self) -> Path:
        return self.workdir / "mm2.properties"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"

    def start(self) -> MirrorMaker2:
        jars = ensure_jars()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.properties_path.write_text(
            "".join(f"{k} = {v}\n" for k, v in self.properties.items()))
        log4j = self.workdir / "log4j2.properties"
        log4j.write_text(LOG4J2)
        argv = [java(), f"-Xms{self.heap[0]}", f"-Xmx{self.heap[1]}", *JVM_PERFORMANCE_OPTS,
                f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{jars}/*", MAIN_CLASS,
                str(self.properties_path), "--clusters", "standby"]
        self.launched = time.monotonic()
        self.proc = start_process(f"mm2-{self.suffix}", argv, self.log_path, cwd=self.workdir)
        return self

    def wait_replicating(self, timeout: float = 180.0) -> float:
        """Wait until the MirrorSourceConnector's tasks run (its log says so); seconds
        since launch."""
        pattern = re.compile(r"(WorkerSourceTask\{id=MirrorSourceConnector-\d+\} "
                             r"Source task finished initialization and start|"
                             r"Starting with \d+ previously uncommitted partitions|"
                             r"MirrorSourceTask.*started)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.popen.returncode if self.proc else None
                raise MM2Error(f"MirrorMaker 2 exited ({code}) while starting; log "
                               f"{self.log_path}:\n{self.log_tail()}")
            if pattern.search(self.log_text()):
                return time.monotonic() - self.launched
            time.sleep(0.2)
        raise MM2Error(f"MirrorMaker 2 did not start replicating in {timeout:.0f}s; log "
                       f"{self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Connect's shutdown hook commits offsets), SIGKILL after `timeout`."""
        if self.proc is None:
            return None
        self.proc.stop(timeout=timeout)
        return self.proc.popen.returncode

    def log_problems(self, limit: int = 10) -> list[str]:
        """ERROR lines and WARN lines worth a look (not the ones every start logs)."""
        out = []
        for line in self.log_text().splitlines():
            if "] ERROR " in line or ("] WARN " in line and not any(
                    benign in line for benign in BENIGN_WARNINGS)):
                out.append(line[:300])
        return out[:limit]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["jars"]:
        print(ensure_jars())
        return 0
    print("usage: python -m benchmarks.mm2 jars", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
