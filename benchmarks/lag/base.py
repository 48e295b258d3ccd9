"""What the lag programs share: constants, the cases (benchmarks/cases/*.json), the status
file a subprocess reports through, CPU per thread group."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ProcSampler,
    Progress,
)

# `drstream bench` stamps its records alike: either reader times the other's records
from drstream.connectors.kafka.bench import ID_HEADER as ID_HEADER
from drstream.connectors.kafka.bench import TS_HEADER as TS_HEADER

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
CASES_DIR = BENCHMARKS / "cases"
RESULTS_DIR = BENCHMARKS / "results"
SYSTEMS = ("drstream", "mm2")
# drstream log stores a case can use: local files, or an object store's test server.
STORES = ("file", "s3", "gcs", "azure")
SYSTEM_LABEL = {"drstream": "drstream", "mm2": "MirrorMaker 2"}
STATUS_EVERY_S = 0.25
QUIET = {"log_level": 3}
progress = Progress(5.0)


class BenchError(RuntimeError):
    """The benchmark could not run a case; the message says what and where to look."""


# --------------------------------------------------------------------------- cases

CASE_DEFAULTS: dict[str, Any] = {
    "description": "",
    "order": 100,
    "partitions": 12,
    "keys": 100_000,
    "preload": False,
    "store": "file",
    "settle_s": 3.0,
    "drain_timeout_s": 180.0,
    "systems": list(SYSTEMS),
    "mm2": {"tasks": 2, "properties": {}},
    # drstream config sections for the run: ship, apply, source_properties (librdkafka
    # properties of the Kafka source); empty = the defaults a user gets.
    "drstream": {"ship": {}, "apply": {}, "source_properties": {}},
}
PHASE_KINDS = ("records_per_s", "mb_per_s", "records")


def load_case(path: Path) -> dict[str, Any]:
    """A case file: name, phases and optional settings (CASE_DEFAULTS); checked here so a
    typo fails before any service starts."""
    raw = json.loads(path.read_text())
    unknown = set(raw) - set(CASE_DEFAULTS) - {"name", "phases"}
    if unknown:
        raise BenchError(f"{path}: unknown keys {sorted(unknown)}")
    case = {**CASE_DEFAULTS, **raw}
    if not isinstance(case.get("name"), str) or not re.fullmatch(r"[a-z0-9-]+", case["name"]):
        raise BenchError(f"{path}: name must be [a-z0-9-]+")
    phases = case.get("phases")
    if not isinstance(phases, list) or not phases:
        raise BenchError(f"{path}: phases must be a non-empty list")
    for i, ph in enumerate(phases):
        extra = set(ph) - {*PHASE_KINDS, "seconds", "warmup"}
        if extra:
            raise BenchError(f"{path}: phase {i}: unknown keys {sorted(extra)}")
        kinds = [k for k in PHASE_KINDS if k in ph]
        if len(kinds) != 1 or (kinds[0] != "records" and "seconds" not in ph):
            raise BenchError(f"{path}: phase {i}: one of records_per_s/mb_per_s with seconds, "
                             f"or records (a burst), got {ph}")
    if case["store"] not in STORES:
        raise BenchError(f"{path}: store must be one of {', '.join(STORES)}")
    bad = set(case["systems"]) - set(SYSTEMS)
    if bad:
        raise BenchError(f"{path}: unknown systems {sorted(bad)}")
    case["file"] = str(path)
    return case


def scaled(case: dict[str, Any], scale: float) -> dict[str, Any]:
    """The case with every duration and record count multiplied by `scale` (quick runs)."""
    if scale == 1:
        return case
    out = json.loads(json.dumps(case))
    for ph in out["phases"]:
        if "seconds" in ph:
            ph["seconds"] = max(1.0, ph["seconds"] * scale)
        if "records" in ph:
            ph["records"] = max(1, int(ph["records"] * scale))
    return out


def all_cases() -> list[dict[str, Any]]:
    cases = [load_case(p) for p in sorted(CASES_DIR.glob("*.json"))]
    return sorted(cases, key=lambda c: (c["order"], c["name"]))


class StatusFile:
    """A small JSON status a subprocess rewrites atomically; the orchestrator polls it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, doc: dict[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)

    def read(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(self.path.read_text()))
        return {}


def thread_groups(pid: int, top: int = 8) -> dict[str, float]:
    """CPU seconds per thread group of a process since it started (/proc/<pid>/task):
    Python's main thread (the event loop), librdkafka threads by role, JVM threads by
    name with numbers dropped."""
    from benchmarks.common import thread_cpu

    out: dict[str, float] = {}
    for t in thread_cpu(pid):
        comm = t["comm"]
        if t["tid"] == pid:
            name = "main thread"
        elif comm.startswith("rdk:broker"):
            name = "rdk:broker*"
        else:
            name = re.sub(r"[-_]?\d+", "#", comm) or "?"
        out[name] = round(out.get(name, 0.0) + t["cpu_s"], 2)
    ranked = sorted(out.items(), key=lambda kv: -kv[1])
    rest = round(sum(v for _, v in ranked[top:]), 2)
    return dict(ranked[:top] + ([("(other threads)", rest)] if rest else []))


def child_args(name: str, argv: list[str]) -> tuple[dict[str, Any], StatusFile, Path,
                                                      threading.Event]:
    """`--spec JSON --status PATH --out PATH` of the `_produce` and `_read` subprocesses:
    (spec, status file, output path, an event SIGTERM sets)."""
    ap = argparse.ArgumentParser(prog=f"benchmarks.lag {name}")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--status", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    halt = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: halt.set())
    return json.loads(args.spec), StatusFile(args.status), args.out, halt


class Replicator:
    """A replicator under test: start, processes to measure, stop, facts."""

    system = ""

    def pids(self) -> dict[str, int]:
        raise NotImplementedError

    def launch(self) -> None:
        raise NotImplementedError

    def wait_ready(self) -> float:
        """Seconds from launch until it replicates."""
        raise NotImplementedError

    def log_problems(self) -> list[str]:
        return []

    def cleanup(self) -> None:
        pass

    def alive(self) -> bool:
        raise NotImplementedError

    def stop(self) -> dict[str, Any]:
        raise NotImplementedError

    def freshness(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def health(self) -> str | None:
        return None

    def cleanup_topics(self) -> tuple[list[str], list[str]]:
        return [], []


class CpuTrack:
    """CPU seconds of named process trees over time (ProcSampler per tree), so the CPU in
    any window can be read afterwards; peak RSS per tree."""

    def __init__(self, pids: dict[str, int], interval: float = 0.25) -> None:
        self.samplers = {name: ProcSampler(pid, interval).start() for name, pid in pids.items()}

    def stop(self) -> None:
        for s in self.samplers.values():
            s.stop()

    def cpu_at(self, name: str, t: float) -> float:
        """CPU seconds of `name` at monotonic time t (the last sample at or before t; the
        first sample before that)."""
        samples = self.samplers[name].samples
        best = samples[0][1] if samples else 0.0
        for ts, cpu, _ in samples:
            if ts > t:
                break
            best = cpu
        return best

    def window(self, t0: float, t1: float) -> dict[str, float]:
        return {n: self.cpu_at(n, t1) - self.cpu_at(n, t0) for n in self.samplers}

    def peak_rss(self) -> dict[str, int]:
        return {n: s.peak_rss for n, s in self.samplers.items()}
