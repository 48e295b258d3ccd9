"""Max sustained rate and CPU seconds per GiB of drstream with 1 and 2 shards, beside
Kafka MirrorMaker 2 with 1 and 2 tasks, in one run on the same pair of clusters.

    python -m benchmarks.shard_scale                 # 1 GiB backlog (the full run)
    python -m benchmarks.shard_scale --smoke         # 48 MiB, a couple of minutes
    python -m benchmarks.shard_scale --gib 0.5 --systems drstream-1,drstream-2

The rate a replicator sustains is measured as the drain of a backlog: ~1 KiB JSON records
(benchmarks/common.py RecordFactory, zstd-1 about 2.5x) are produced to a topic of 12
partitions on the primary before anything replicates; then, one system after the other,
the replicator starts and drains the whole topic to the standby. Drain time (and the
CPU counted) runs from the moment the replicator moves data (drstream: a ship stored
its first segment; MM2: the first record reached the standby), so a JVM's start or
Python's imports are not a rate (start-up is reported apart), until the standby holds
every record: for drstream, every apply shard's checkpoint (a committed transaction)
covers the primary's end offsets of its partitions; for MM2 (at least once, no
transactions) the standby's end offsets reach the primary's.

- drstream-N: N `drstream ship --shard K` and N `drstream apply --shard K` processes, a
  file store, ship and apply settings at their defaults. The topic's name is picked so
  that 2 shards own 6 partitions each (a lopsided split would cap the speed-up, not the
  shards).
- mm2-N: one dedicated-mode MirrorMaker 2 JVM with tasks.max=N (benchmarks/mm2.py).

CPU is utime+stime (/proc, process trees) of the replicator's processes over the drain,
per GiB of payload (keys + values + headers); beside it, the cores the two brokers, the
replicator's processes and everything else on the machine used on average over the
drain (the profile of where the 2 cores go). The standby topic is deleted between
systems; the primary's backlog is produced once and read by each.

Writes benchmarks/results/shard_scale.json and .md (with the commit measured). A
benchmark, never a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    CpuWindow,
    GiB,
    MiB,
    Progress,
    RecordFactory,
    cpu_seconds,
    create_topic,
    end_offsets,
    exit_on_sigterm,
    machine_facts,
    md_table,
    preload,
    text_table,
    write_results,
)
from drstream.daemon.shards import shard_log_id, shard_of

PARTITIONS = 12
SYSTEMS = ("drstream-1", "drstream-2", "mm2-1", "mm2-2")
FULL_GIB, SMOKE_MIB = 1.0, 48
DRAIN_TIMEOUT_S = 900
START_TIMEOUT_S = 180
POLL_S = 0.5
progress = Progress()


def even_topic(count: int = 2) -> str:
    """A fresh topic name whose PARTITIONS split evenly over `count` shards."""
    while True:
        name = f"scale-{os.urandom(4).hex()}"
        owners = [shard_of(name, p, count) for p in range(PARTITIONS)]
        if all(owners.count(k) == PARTITIONS // count for k in range(count)):
            return name


def delete_topic(bootstrap: str, topic: str, timeout: float = 60) -> None:
    """Delete `topic` and wait until the cluster no longer lists it (a replicator
    recreating it while the deletion runs would fail)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    if topic in admin.list_topics(timeout=10).topics:
        admin.delete_topics([topic], operation_timeout=30)[topic].result(60)
    deadline = time.monotonic() + timeout
    while topic in admin.list_topics(timeout=10).topics:
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic} still listed {timeout:.0f}s after its deletion")
        time.sleep(0.5)


class DrstreamSet:
    """N ship and N apply shards on one file store."""

    def __init__(self, work: Path, primary: str, standby: str, topic: str, shards: int
                 ) -> None:
        from tests.integration.applylib import write_dr_config

        self.shards, self.work = shards, work
        self.setup = write_dr_config(
            work, store={"type": "file", "path": str(work / "store")},
            source_bootstrap=primary, sink_bootstrap=standby, include=[re.escape(topic)],
            log_id=f"scale-{os.urandom(3).hex()}")
        # defaults, not the short test intervals write_dr_config sets
        self.setup.rewrite(ship={}, apply={}, shards={"count": shards})
        self.procs: dict[str, Any] = {}

    def launch(self) -> None:
        from tests.support.procs import DrstreamProcess

        for role in ("ship", "apply"):
            for k in range(self.shards):
                self.procs[f"{role}-{k}"] = DrstreamProcess(
                    [role, "--config", str(self.setup.path), "--shard", str(k)],
                    self.work / f"{role}-{k}.log", f"{role}-{k}")

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def started(self) -> bool:
        """A ship stored its first segment (it consumes from the moment it started)."""
        return any((self.work / "store" / "logs").glob("*/*.seg"))

    def drained(self, ends: dict[tuple[str, int], int]) -> Callable[[], bool]:
        from tests.integration.applylib import CheckpointWatch, DrSetup

        watch = CheckpointWatch(self.setup.raw["sinks"][0]["bootstrap_servers"])
        watch._start = None  # every checkpoint, from the topic's beginning
        views = [(DrSetup(self.setup.path, {**self.setup.raw, "log_id": shard_log_id(
            self.setup.log_id, k, self.shards)}),
            {tp: o for tp, o in ends.items() if shard_of(*tp, self.shards) == k})
            for k in range(self.shards)]
        return lambda: all(not watch.behind(view, mine) for view, mine in views)

    def problem(self) -> str | None:
        for p in self.procs.values():
            if not p.alive():
                return f"{p.label} exited\n{p.describe()}"
        return None

    def stop(self) -> None:
        for p in self.procs.values():
            p.reap()


class MM2Set:
    """One MirrorMaker 2 JVM with tasks.max=N."""

    def __init__(self, work: Path, primary: str, standby: str, topic: str, tasks: int
                 ) -> None:
        from benchmarks.mm2 import MirrorMaker2

        self.standby, self.topic = standby, topic
        self.mm2 = MirrorMaker2(work, primary, standby, f"^{re.escape(topic)}$", tasks=tasks)

    def launch(self) -> None:
        self.mm2.start()

    def pids(self) -> dict[str, int]:
        return {"mm2": self.mm2.pid} if self.mm2.pid else {}

    def started(self) -> bool:
        """The first record reached the standby (MM2 produces what it fetched at once)."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.standby})
        return any(standby_ends(admin, self.standby, self.topic).values())

    def drained(self, ends: dict[tuple[str, int], int]) -> Callable[[], bool]:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.standby})

        def done() -> bool:
            got = standby_ends(admin, self.standby, self.topic)
            return all(got.get(p, 0) >= o for (_, p), o in ends.items())
        return done

    def problem(self) -> str | None:
        if not self.mm2.alive():
            return f"MirrorMaker 2 exited; log {self.mm2.log_path}:\n{self.mm2.log_tail(15)}"
        return None

    def stop(self) -> None:
        self.mm2.stop()


def make_system(name: str, work: Path, primary: str, standby: str, topic: str
                ) -> DrstreamSet | MM2Set:
    kind, n = name.rsplit("-", 1)
    if kind == "drstream":
        return DrstreamSet(work, primary, standby, topic, int(n))
    return MM2Set(work, primary, standby, topic, int(n))


def standby_ends(admin: Any, standby: str, topic: str) -> dict[int, int]:
    """The standby topic's end offsets; {} while it does not exist or its partitions have
    no leader yet (just created by the replicator)."""
    from confluent_kafka import KafkaException

    try:
        if topic not in admin.list_topics(timeout=10).topics:
            return {}
        return end_offsets(standby, topic, PARTITIONS)
    except KafkaException:
        return {}


def wait_started(system: DrstreamSet | MM2Set) -> None:
    """Wait until the replicator moves data (see `started` of each)."""
    begun = time.monotonic()
    while not system.started():
        problem = system.problem()
        if problem:
            raise RuntimeError(problem)
        if time.monotonic() - begun > START_TIMEOUT_S:
            raise RuntimeError(f"no data moved {START_TIMEOUT_S}s after the start")
        time.sleep(0.05)


def drain(name: str, system: DrstreamSet | MM2Set, ends: dict[tuple[str, int], int],
          payload: int, brokers: dict[str, int | None]) -> dict[str, Any]:
    """Start `system`; time and account the drain of the backlog up to `ends` from the
    moment it moves data (start-up, a JVM's or Python's imports, reported apart) until
    the standby holds the last record."""
    launched = time.monotonic()
    system.launch()
    wait_started(system)
    startup_s = time.monotonic() - launched
    pids = system.pids()
    before = {k: cpu_seconds(p) or 0.0 for k, p in pids.items()}
    window = CpuWindow({**brokers, **pids})
    t0, done = time.monotonic(), system.drained(ends)
    load0 = os.getloadavg()[0]
    while not done():
        problem = system.problem()
        if problem:
            raise RuntimeError(f"{name}: {problem}")
        if time.monotonic() - t0 > DRAIN_TIMEOUT_S:
            raise RuntimeError(f"{name}: not drained in {DRAIN_TIMEOUT_S}s")
        progress(f"{name}: draining, {time.monotonic() - t0:.0f}s")
        time.sleep(POLL_S)
    seconds = time.monotonic() - t0
    cores = window.close()
    used = {k: (cpu_seconds(p) or before[k]) - before[k] for k, p in pids.items()}
    cpu = sum(used.values())
    return {
        "system": name, "startup_s": round(startup_s, 1), "drain_s": round(seconds, 2),
        "mb_per_s": round(payload / 1e6 / seconds, 2),
        "records_per_s": round(sum(ends.values()) / seconds),
        "cpu_s": round(cpu, 1), "cpu_s_per_gib": round(cpu / (payload / GiB), 1),
        "cpu_s_by_process": {k: round(v, 1) for k, v in used.items()},
        "cores": cores, "loadavg_1m": [load0, os.getloadavg()[0]],
    }


def run(systems: list[str], target_bytes: int, work: Path) -> dict[str, Any]:
    from tests.infra.kafka import start_clusters

    progress("starting primary and standby Kafka clusters", force=True)
    primary, standby = start_clusters(("scale-primary", "scale-standby"),
                                      base_dir=work / "kafka")
    brokers = {"primary_broker": primary.pid, "standby_broker": standby.pid}
    report: dict[str, Any] = {"runs": [], "failures": []}
    try:
        if any(s.startswith("mm2") for s in systems):
            from benchmarks.mm2 import ensure_jars

            ensure_jars()
        topic = even_topic()
        create_topic(primary.bootstrap_servers, topic, PARTITIONS)
        stats = preload(primary.bootstrap_servers, topic, PARTITIONS, target_bytes,
                        RecordFactory(), progress)
        ends = {(topic, p): o for p, o in
                end_offsets(primary.bootstrap_servers, topic, PARTITIONS).items()}
        report["backlog"] = {"partitions": PARTITIONS, **stats.as_dict()}
        progress(f"backlog: {stats.records:,} records, {stats.payload_bytes / MiB:,.0f} MiB",
                 force=True)
        for name in systems:
            sub = work / name
            sub.mkdir()
            system = make_system(name, sub, primary.bootstrap_servers,
                                 standby.bootstrap_servers, topic)
            try:
                r = drain(name, system, ends, stats.payload_bytes, brokers)
                report["runs"].append(r)
                progress(f"{name}: {r['mb_per_s']} MB/s, {r['cpu_s_per_gib']} CPU s/GiB",
                         force=True)
            except Exception as e:  # one failed system does not cost the others
                progress(f"{name} FAILED: {e}", force=True)
                report["failures"].append({"system": name, "error": str(e)[:3000]})
            finally:
                system.stop()
                delete_topic(standby.bootstrap_servers, topic)
    finally:
        primary.remove()
        standby.remove()
    return report


def scaling(runs: list[dict[str, Any]]) -> None:
    """Each N>1 run's rate and CPU per GiB relative to the same system with 1."""
    by = {r["system"]: r for r in runs}
    for r in runs:
        one = by.get(r["system"].rsplit("-", 1)[0] + "-1")
        if one:
            r["rate_x_vs_1"] = round(r["mb_per_s"] / one["mb_per_s"], 2)
            r["cpu_per_gib_x_vs_1"] = round(r["cpu_s_per_gib"] / one["cpu_s_per_gib"], 2)


HEADERS = ["system", "drain s", "MB/s", "records/s", "rate vs 1", "CPU s/GiB",
           "CPU/GiB vs 1", "start-up s", "replicator cores", "broker cores", "other cores"]


def rows(runs: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for r in runs:
        c = r["cores"]
        mine = sum(c.get(f"{k}_cores", 0.0) for k in r["cpu_s_by_process"])
        out.append([r["system"], r["drain_s"], r["mb_per_s"], f"{r['records_per_s']:,}",
                    r.get("rate_x_vs_1"), r["cpu_s_per_gib"], r.get("cpu_per_gib_x_vs_1"),
                    r["startup_s"], round(mine, 2),
                    round(c["primary_broker_cores"] + c["standby_broker_cores"], 2),
                    round(c["others_cores"] - c.get("bench_cores", 0.0), 2)])
    return out


CORE_HEADERS = ["system", "ship", "apply", "mm2", "primary broker", "standby broker",
                "this script", "others", "machine busy"]


def core_rows(runs: list[dict[str, Any]]) -> list[list[Any]]:
    """Where the machine's cores went over each drain (average cores busy)."""
    out = []
    for r in runs:
        c = r["cores"]

        def role(prefix: str, cores: dict[str, float] = c) -> float | None:
            found = [v for k, v in cores.items() if k.startswith(prefix)]
            return round(sum(found), 2) if found else None
        out.append([r["system"], role("ship-"), role("apply-"), role("mm2_"),
                    c["primary_broker_cores"], c["standby_broker_cores"],
                    c.get("bench_cores"), c["others_cores"], c["machine_cores"]])
    return out


def load(facts: dict[str, Any]) -> str:
    avg = facts.get("loadavg_at_start") or facts.get("loadavg_at_end")
    return f"{avg[0]:.1f}" if avg else "?"


def markdown(doc: dict[str, Any]) -> str:
    b = doc["backlog"]
    lines = [f"# Shard scaling: drain of a {b['payload_bytes'] / MiB:,.0f} MiB backlog",
             "", f"`{doc['command']}`, commit {doc['commit']['commit']}"
             f"{' (with changes)' if doc['commit']['tree_changed'] else ''}, "
             f"{doc['machine'].get('sched_affinity_cpus')} CPUs; {b['records']:,} records over "
             f"{b['partitions']} partitions. Load average (1 min) {load(doc['machine'])} "
             f"at the start, {load(doc)} at the end: 'other cores' is what the rest of "
             "the machine used meanwhile.", "", md_table(HEADERS, rows(doc["runs"])), "",
             "Cores busy on average over each drain, by process (of the machine's "
             f"{doc['machine'].get('sched_affinity_cpus')}):", "",
             md_table(CORE_HEADERS, core_rows(doc["runs"])), ""]
    lines += [f"- {f['system']} FAILED: {f['error'][:300]}" for f in doc["failures"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.shard_scale",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--gib", type=float, default=None, help=f"backlog (default {FULL_GIB})")
    size.add_argument("--smoke", action="store_true", help=f"a {SMOKE_MIB} MiB backlog; "
                      "writes shard_scale-smoke.{json,md}")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"--systems: unknown {unknown}, known: {','.join(SYSTEMS)}")
    target = SMOKE_MIB * MiB if args.smoke else int((args.gib or FULL_GIB) * GiB)
    from tests.infra.procs import RUN_DIR

    RUN_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-shard-scale-", dir=RUN_DIR))
    facts = machine_facts()  # the commit and the load average before the run
    started = time.monotonic()
    try:
        report = run(systems, target, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    scaling(report["runs"])
    doc = {"command": " ".join(["python -m benchmarks.shard_scale",
                                *(argv if argv is not None else sys.argv[1:])]),
        "commit": {k: facts[k] for k in ("commit", "tree_changed")}, "machine": facts,
        "loadavg_at_end": os.getloadavg(), "total_s": round(time.monotonic() - started),
        **report}
    name = "shard_scale-smoke" if args.smoke else "shard_scale"
    for path in write_results(name, doc, markdown(doc)):
        print(f"wrote {path}")
    print(text_table(HEADERS, rows(doc["runs"])))
    print(text_table(CORE_HEADERS, core_rows(doc["runs"])))
    print(json.dumps(doc["failures"], indent=1) if doc["failures"] else "")
    return 1 if doc["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
