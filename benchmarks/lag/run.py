"""Running cases: the replicators under test (drstream, MirrorMaker 2) as processes, one
run per case and system, every case of a report."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    CpuWindow,
    machine_facts,
)
from benchmarks.lag.analysis import analyse
from benchmarks.lag.base import (
    QUIET,
    ROOT,
    SYSTEM_LABEL,
    BenchError,
    CpuTrack,
    Replicator,
    StatusFile,
    progress,
    thread_groups,
)
from benchmarks.lag.report import fmt
from benchmarks.lag.wrapper import read_ops


def start_child(name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                ) -> Any:
    from tests.infra.procs import start_process

    return start_process(name, argv, log_path, env={"PYTHONUNBUFFERED": "1", **(env or {})},
                         cwd=ROOT)


def wait_for_line(proc: Any, needle: str, timeout: float = 90) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if needle in proc.log_tail(400):
            return time.monotonic() - t0
        if not proc.alive():
            raise BenchError(f"{proc.name} exited ({proc.popen.returncode}); log "
                             f"{proc.log_path}:\n{proc.log_tail(20)}")
        time.sleep(0.05)
    raise BenchError(f"{proc.name} did not log {needle!r} in {timeout:.0f}s; log "
                     f"{proc.log_path}:\n{proc.log_tail(20)}")


@dataclass
class Env:
    """What every case run shares: the clusters, each store's test server once needed (by
    store kind), the work root."""

    primary: str
    standby: str
    work: Path
    primary_pid: int | None = None
    standby_pid: int | None = None
    servers: dict[str, Any] = field(default_factory=dict)
    keep: bool = False
    profile_dir: Path | None = None

    def store_server(self, kind: str) -> Any:
        """The test server of store `kind` (s3, gcs, azure), started on first use."""
        if kind not in self.servers:
            from tests.infra.emulators import AzuriteServer, FakeGcsServer
            from tests.infra.s3 import S3Server

            if kind == "s3":
                self.servers[kind] = S3Server.start_new("moto-s3-bench-lag")
            else:
                server = (FakeGcsServer if kind == "gcs" else AzuriteServer)(f"{kind}-bench-lag")
                server.start()
                self.servers[kind] = server
        return self.servers[kind]

    def admin(self, bootstrap: str) -> Any:
        from confluent_kafka.admin import AdminClient

        return AdminClient({"bootstrap.servers": bootstrap, **QUIET})

    def delete_topics(self, bootstrap: str, topics: list[str]) -> None:
        if not topics:
            return
        admin = self.admin(bootstrap)
        with contextlib.suppress(Exception):
            existing = set(admin.list_topics(timeout=10).topics)
            names = [t for t in topics if t in existing]
            if names:
                for fut in admin.delete_topics(names, operation_timeout=30).values():
                    with contextlib.suppress(Exception):
                        fut.result(60)


def _new_bucket(server: Any) -> str:
    """A fresh bucket (container) on a store's test server."""
    from tests.infra.emulators import AzuriteServer

    name: str = (server.create_container() if isinstance(server, AzuriteServer)
                 else server.create_bucket())
    return name


def _delete_bucket(server: Any, name: str) -> None:
    from tests.infra.emulators import AzuriteServer

    if isinstance(server, AzuriteServer):
        server.delete_container(name)
    else:
        server.delete_bucket(name)


def _store_env(kind: str, server: Any) -> dict[str, str]:
    """The variables the store config's credential references read."""
    from tests.infra.emulators import AZURE_KEY_ENV, AZURITE_KEY
    from tests.infra.s3 import KEY_ENV, SECRET_ENV

    if kind == "s3":
        return {KEY_ENV: server.access_key, SECRET_ENV: server.secret_key}
    return {AZURE_KEY_ENV: AZURITE_KEY} if kind == "azure" else {}


class Drstream(Replicator):
    system = "drstream"

    def __init__(self, env: Env, case: dict[str, Any], topic: str, workdir: Path) -> None:
        from drstream.daemon.keyring import generate_key_file
        from tests.infra.procs import free_port

        self.env, self.case, self.topic, self.workdir = env, case, topic, workdir
        self.log_id = f"lag-{uuid.uuid4().hex[:8]}"
        key = workdir / "k1.key"
        generate_key_file(key)
        self.bucket = None
        self.proc_env: dict[str, str] = {}
        if case["store"] != "file":
            server = env.store_server(case["store"])
            self.bucket = _new_bucket(server)
            store: dict[str, Any] = server.store_fields(self.bucket, prefix="dr")
            self.proc_env = _store_env(case["store"], server)
            os.environ.update(self.proc_env)  # this process reads the log afterwards
        else:
            store = {"type": "file", "path": str(workdir / "store")}
        tuning = case.get("drstream") or {}
        self.raw_config = {
            "log_id": self.log_id,
            "store": store,
            "keyring": {"active": "k1", "keys": {"k1": f"file:{key}"}},
            "sources": [{"type": "kafka", "name": "primary", "bootstrap_servers": env.primary,
                         "topics": {"include": [re.escape(topic)]},
                         "properties": dict(tuning.get("source_properties") or {})}],
            "sinks": [{"type": "kafka", "name": "standby", "bootstrap_servers": env.standby}],
            "ship": dict(tuning.get("ship") or {}),
            "apply": dict(tuning.get("apply") or {}),
            "service": {"ship_metrics_listen": f"127.0.0.1:{free_port()}",
                        "apply_metrics_listen": f"127.0.0.1:{free_port()}"},
            "logging": {"level": "info", "format": "json"},
        }
        import yaml

        self.config_path = workdir / "drstream.yaml"
        self.config_path.write_text(yaml.safe_dump(self.raw_config, sort_keys=False))
        from drstream.daemon.config import load_config

        self.config = load_config(self.config_path)  # a bad config fails here
        self.procs: dict[str, Any] = {}

    def ops_path(self, command: str) -> Path:
        return self.workdir / f"{command}.ops.jsonl"

    def launch(self) -> None:
        self.launched = time.monotonic()
        for command in ("ship", "apply"):
            profile = []
            if self.env.profile_dir is not None:
                self.env.profile_dir.mkdir(parents=True, exist_ok=True)
                profile = ["--profile-out",
                           str(self.env.profile_dir / f"{self.case['name']}-{command}.json")]
            argv = [sys.executable, "-m", "benchmarks.lag", "_daemon", "--ops-out",
                    str(self.ops_path(command)), *profile, "--", command, "--config",
                    str(self.config_path)]
            self.procs[command] = start_child(f"drstream-{command}-lag", argv,
                                              self.workdir / f"{command}.log", self.proc_env)

    def wait_ready(self) -> float:
        for command in ("ship", "apply"):
            wait_for_line(self.procs[command], f"{command}_started")
        return time.monotonic() - self.launched

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def alive(self) -> bool:
        return all(p.alive() for p in self.procs.values())

    def health(self) -> str | None:
        for name, p in self.procs.items():
            if not p.alive():
                return (f"drstream {name} exited ({p.popen.returncode}); log {p.log_path}:\n"
                        f"{p.log_tail(15)}")
        return None

    def stop(self) -> dict[str, Any]:
        out = {}
        for name, p in self.procs.items():  # ship first: it drains, then apply
            t0 = time.monotonic()
            p.stop(timeout=60)
            out[name] = {"exit_code": p.popen.returncode, "stop_s": time.monotonic() - t0}
        return out

    def freshness(self) -> dict[str, Any]:
        return {"kind": "drstream", "topic": "drstream.checkpoints",
                "key": f"{self.log_id}/standby"}

    def describe(self) -> dict[str, Any]:
        return {"config": {k: v for k, v in self.raw_config.items() if k != "keyring"}}

    def log_problems(self) -> list[str]:
        out = []
        for name, p in self.procs.items():
            with contextlib.suppress(OSError):
                for line in p.log_path.read_text(errors="replace").splitlines():
                    if '"level": "warning"' in line or '"level": "error"' in line \
                            or "Traceback" in line:
                        out.append(f"{name}: {line[:300]}")
        return out[:10]

    def cleanup_topics(self) -> tuple[list[str], list[str]]:
        return [self.topic], [self.topic]

    def cleanup(self) -> None:
        server = self.env.servers.get(self.case["store"])
        if self.bucket and server is not None and server.alive():
            _delete_bucket(server, self.bucket)

    # -- the log, after the run ---------------------------------------------------------

    def segments(self) -> list[dict[str, Any]]:
        """Every stored segment: seq, bytes, when its PUT completed, record count and the
        source positions of its manifest (read from the store after the run)."""
        import asyncio

        from drstream.daemon.cli import keyring_from_config
        from drstream.daemon.deltalog import DeltaLog
        from drstream.daemon.segment import read_manifest

        puts: dict[int, tuple[int, int]] = {}
        for t, op, key, n in read_ops(self.ops_path("ship")):
            m = re.search(r"/(\d{20})\.seg$", key)
            if op == "PUT" and m:
                puts.setdefault(int(m[1]), (t, n))
        fetched: dict[int, int] = {}  # seq -> when apply's GET returned it
        for t, op, key, n in read_ops(self.ops_path("apply")):
            m = re.search(r"/(\d{20})\.seg$", key)
            if op == "GET" and n and m:
                fetched.setdefault(int(m[1]), t)
        keyring = keyring_from_config(self.config)

        async def fetch_all() -> list[dict[str, Any]]:
            out = []
            async with self.config.connectors.open_store(self.config.store) as store:
                log = DeltaLog(store, self.log_id)
                for seq in sorted(puts):
                    data = await log.fetch(seq)
                    if data is None:
                        continue
                    header, manifest = read_manifest(data, keyring,
                                                     expect_log_id=self.log_id, expect_seq=seq)
                    pos = manifest.positions.get("kafka:primary", {}).get(self.topic, {})
                    out.append({"seq": seq, "put_done_ns": puts[seq][0], "bytes": len(data),
                                "created_ns": header.created_at_ms * 1_000_000,
                                "fetched_ns": fetched.get(seq),
                                "records": manifest.record_count, "kind": manifest.kind,
                                "positions": {int(p): int(o) for p, o in pos.items()}})
            return out

        return asyncio.run(fetch_all())


class MM2(Replicator):
    system = "mm2"

    def __init__(self, env: Env, case: dict[str, Any], topic: str, workdir: Path) -> None:
        from benchmarks.mm2 import MirrorMaker2

        opts = case.get("mm2") or {}
        self.env, self.topic, self.workdir = env, topic, workdir
        self.mm2 = MirrorMaker2(workdir, env.primary, env.standby, f"^{re.escape(topic)}$",
                                tasks=int(opts.get("tasks", 1)),
                                extra={str(k): str(v) for k, v in
                                       (opts.get("properties") or {}).items()})

    def launch(self) -> None:
        self.mm2.start()

    def wait_ready(self) -> float:
        return self.mm2.wait_replicating()

    def pids(self) -> dict[str, int]:
        return {"mm2": self.mm2.pid} if self.mm2.pid else {}

    def alive(self) -> bool:
        return self.mm2.alive()

    def health(self) -> str | None:
        if not self.mm2.alive():
            return f"MirrorMaker 2 exited; log {self.mm2.log_path}:\n{self.mm2.log_tail(15)}"
        return None

    def stop(self) -> dict[str, Any]:
        t0 = time.monotonic()
        code = self.mm2.stop(timeout=30)
        # The JVM exits 143 on SIGTERM after its shutdown hook ran: a clean stop.
        return {"mm2": {"exit_code": code, "stop_s": time.monotonic() - t0}}

    def freshness(self) -> dict[str, Any]:
        return {"kind": "mm2", "topic": "heartbeats"}

    def describe(self) -> dict[str, Any]:
        return {"properties": {k: v for k, v in self.mm2.properties.items()
                               if "bootstrap" not in k}}

    def log_problems(self) -> list[str]:
        return self.mm2.log_problems()

    def cleanup_topics(self) -> tuple[list[str], list[str]]:
        s = self.mm2.suffix
        internal = [f"mm2-offsets.{s}.internal", f"mm2-status.{s}.internal",
                    f"mm2-configs.{s}.internal"]
        return [self.topic], [self.topic, *internal]



def run_one(env: Env, case: dict[str, Any], system: str) -> dict[str, Any]:
    """One case with one system on fresh topics; the result dict (see analyse)."""
    from benchmarks.common import create_topic

    tag = f"{case['name']}/{system}"
    topic = f"lag-{case['name']}-{system}-{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix=f"lag-{case['name']}-{system}-", dir=env.work))
    parts = int(case["partitions"])
    create_topic(env.primary, topic, parts)
    rep: Replicator = (Drstream if system == "drstream" else MM2)(env, case, topic, workdir)
    producer = reader = None
    track: CpuTrack | None = None
    marks: dict[str, float] = {}
    stop_info: dict[str, Any] = {}
    try:
        produce_spec = {"bootstrap": env.primary, "topic": topic, "partitions": parts,
                        "keys": int(case["keys"]), "phases": case["phases"],
                        "fast": bool(case["preload"])}
        pstatus = StatusFile(workdir / "producer.status.json")
        produce_argv = [sys.executable, "-m", "benchmarks.lag", "_produce", "--spec",
                        json.dumps(produce_spec), "--status", str(pstatus.path), "--out",
                        str(workdir / "produced.bin")]
        if case["preload"]:
            progress(f"[{tag}] preloading the backlog into {topic}", force=True)
            marks["load_start"] = time.monotonic()
            producer = start_child("bench-lag-producer", produce_argv, workdir / "producer.log")
            wait_producer(producer, pstatus, tag, lambda: None)
            marks["load_end"] = time.monotonic()
        # The reader first: it must see each record as soon as the replicator writes it.
        rstatus = StatusFile(workdir / "reader.status.json")
        read_spec = {"bootstrap": env.standby, "topic": topic, "partitions": parts,
                     "freshness": rep.freshness(), "not_before_ms": int(time.time() * 1000),
                     "check_drstream_offsets": system == "drstream"}
        reader = start_child("bench-lag-reader", [
            sys.executable, "-m", "benchmarks.lag", "_read", "--spec", json.dumps(read_spec),
            "--status", str(rstatus.path), "--out", str(workdir / "arrivals.bin")],
            workdir / "reader.log")
        wait_status(reader, rstatus)
        progress(f"[{tag}] starting {SYSTEM_LABEL[system]}", force=True)
        marks["launch"] = time.monotonic()
        rep.launch()
        track = CpuTrack(rep.pids())
        startup_s = rep.wait_ready()
        marks["ready"] = time.monotonic()
        pids = {**rep.pids(), "reader": reader.pid}
        if env.primary_pid:
            pids["primary broker"] = env.primary_pid
        if env.standby_pid:
            pids["standby broker"] = env.standby_pid
        server = env.servers.get(case["store"])
        if system == "drstream" and server is not None:
            pids[f"{case['store']} server"] = server.proc.pid
        if not case["preload"]:
            time.sleep(float(case["settle_s"]))

        def health() -> None:
            problem = rep.health()
            if problem:
                raise BenchError(problem)
            if reader is not None and not reader.alive():
                raise BenchError(f"reader exited; log {reader.log_path}:\n{reader.log_tail()}")

        def line(extra: str = "") -> None:
            r = rstatus.read()
            p = pstatus.read()
            w = r.get("window") or {}
            cores = track.window(time.monotonic() - 5, time.monotonic()) if track else {}
            cpu = ", ".join(f"{n} {v / 5:.2f}" for n, v in cores.items())
            lag = (f"lag p50 {w['p50']:.0f} p99 {w['p99']:.0f} ms" if w.get("n") else "lag -")
            progress(f"[{tag}] {time.monotonic() - marks['load_start']:4.0f}s produced "
                     f"{p.get('acked', 0):,} arrived {r.get('seen', 0):,} {lag}; cores: {cpu}"
                     f"{extra}")

        if not case["preload"]:
            producer = start_child("bench-lag-producer", produce_argv, workdir / "producer.log")
            wait_status(producer, pstatus)  # connected, first record sent
            marks["load_start"] = time.monotonic()
        window = CpuWindow(pids)
        if not case["preload"]:
            wait_producer(producer, pstatus, tag, lambda: (health(), line()))
            marks["load_end"] = time.monotonic()
        produced = pstatus.read()
        target = int(produced["acked"])
        deadline = time.monotonic() + float(case["drain_timeout_s"])
        caught_up = False
        while time.monotonic() < deadline:
            health()
            r = rstatus.read()
            if r.get("seen", 0) >= target:
                caught_up = True
                break
            line(f" (draining: {target - r.get('seen', 0):,} to go)")
            time.sleep(0.05)
        marks["caught_up"] = time.monotonic()
        # The producer has exited by now: its own CPU count (rusage) stands in.
        window_cpu = window.close(None if case["preload"] else
                                  {"producer": float(produced.get("cpu_s") or 0.0)})
        threads = {name: thread_groups(pid) for name, pid in rep.pids().items()}
        time.sleep(1.0)  # late duplicates
        reader.stop(timeout=30)
        marks["reader_stopped"] = time.monotonic()
        stop_info = rep.stop()
        track.stop()
        progress(f"[{tag}] {'caught up' if caught_up else 'NOT caught up'} "
                 f"{marks['caught_up'] - marks['load_start']:.1f}s after the load started; "
                 f"analysing", force=True)
        result = analyse(case, system, workdir, rep, marks, track, window_cpu)
        result.update({"topic": topic, "caught_up": caught_up, "startup_s": startup_s,
                       "stop": stop_info, "replicator": rep.describe(),
                       "log_problems": rep.log_problems(), "threads_cpu_s": threads,
                       "phases": produced.get("phases"),
                       "producer_max_behind_s": produced.get("max_behind_s"),
                       "producer_errors": produced.get("first_errors")})
        return result
    finally:
        for proc in (producer, reader):
            if proc is not None and proc.alive():
                proc.stop(timeout=30)
        if rep.alive():
            rep.stop()
        if track is not None:
            track.stop()
        primary_topics, standby_topics = rep.cleanup_topics()
        env.delete_topics(env.primary, primary_topics)
        env.delete_topics(env.standby, standby_topics)
        rep.cleanup()
        if env.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def wait_status(proc: Any, status: StatusFile, timeout: float = 60) -> None:
    """Until a subprocess wrote its first status (it is connected and running)."""
    deadline = time.monotonic() + timeout
    while not status.read():
        if not proc.alive() or time.monotonic() > deadline:
            raise BenchError(f"{proc.name} did not start; log {proc.log_path}:\n"
                             f"{proc.log_tail(20)}")
        time.sleep(0.05)


def wait_producer(proc: Any, status: StatusFile, tag: str, tick: Any) -> None:
    while True:
        s = status.read()
        if s.get("done"):
            proc.stop(timeout=30)
            if s.get("errors") or s.get("undelivered"):
                raise BenchError(f"[{tag}] producer: {s.get('errors')} delivery errors, "
                                 f"{s.get('undelivered')} undelivered: {s.get('first_errors')}")
            return
        if not proc.alive():
            raise BenchError(f"[{tag}] producer exited ({proc.popen.returncode}); log "
                             f"{proc.log_path}:\n{proc.log_tail(20)}")
        tick()
        time.sleep(0.1)




def run_cases(cases: list[dict[str, Any]], systems: list[str], *, primary: str | None = None,
              standby: str | None = None, keep: bool = False,
              profile_dir: Path | None = None) -> dict[str, Any]:
    """Run every case with every system (in that order), on given clusters or on two
    started here; returns the report (without writing it)."""
    from tests.infra.procs import RUN_DIR

    RUN_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-lag-", dir=RUN_DIR))
    clusters: list[Any] = []
    env: Env | None = None
    started = time.monotonic()
    report: dict[str, Any] = {"machine": machine_facts(), "results": [], "failures": []}
    try:
        if primary is None or standby is None:
            from tests.infra.kafka import start_clusters

            progress("starting primary and standby Kafka clusters", force=True)
            clusters = start_clusters(("primary", "standby"), base_dir=work / "kafka")
            primary, standby = (c.bootstrap_servers for c in clusters)
        env = Env(primary, standby, work, keep=keep, profile_dir=profile_dir,
                  primary_pid=clusters[0].pid if clusters else None,
                  standby_pid=clusters[1].pid if clusters else None)
        if "mm2" in systems:
            from benchmarks.mm2 import ensure_jars

            ensure_jars()
        report["clusters"] = {"primary": primary, "standby": standby,
                              "started_here": bool(clusters)}
        for case in cases:
            for system in systems:
                if system not in case["systems"]:
                    continue
                t0 = time.monotonic()
                try:
                    r = run_one(env, case, system)
                except Exception as e:
                    # One broken case does not cost the others; the report says what failed.
                    progress(f"[{case['name']}/{system}] FAILED: {e}", force=True)
                    report["failures"].append({"case": case["name"], "system": system,
                                               "error": str(e)[:3000]})
                    continue
                r["case_wall_s"] = time.monotonic() - t0
                report["results"].append(r)
                lag = r["lag_ms"]
                progress(f"[{case['name']}/{system}] done in {r['case_wall_s']:.0f}s: "
                         f"{r['records']['arrived']:,}/{r['records']['produced']:,} arrived, "
                         f"lag p50 {lag['p50']} p99 {lag['p99']} ms, "
                         f"{fmt(r['cpu_s_per_gib'], '.1f')} CPU s/GiB", force=True)
        return report
    finally:
        report["total_s"] = time.monotonic() - started
        report["loadavg_at_end"] = os.getloadavg()
        for server in (env.servers.values() if env is not None else ()):
            server.stop()
        for c in clusters:
            c.stop() if keep else c.remove()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
