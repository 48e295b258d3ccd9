"""`drstream replay` and `drstream drill` of a registry stream (`mlflow:<name>`) into an
MLflow registry: real MLflow servers, a real file store, the real `drstream ship` (mlflow
source) writing the log and the real `drstream replay` / `drill` commands.

One registry log is recorded per module: a short scripted history on the primary, each
step waited for in the log, so the steps land in different segments. Expectations are
computed from the log itself (the events of the segments through a seq, folded with
`connectors.mlflow.events.fold`) and the target registry is read back with mlflow's own
client (metadata, and every artifact file downloaded and hashed). Each test removes what
it replayed from the shared standby, so the next one starts from a fresh namespace.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from drstream.connectors.mlflow.client import RegistryClient
from drstream.connectors.mlflow.events import SOURCE_TAG, empty_state, fold
from drstream.connectors.mlflow.verify import compare_registry
from tests.infra.mlflow import MlflowServer
from tests.integration.applylib import (
    DrSetup,
    ReplayProcess,
    copy_log,
    drill,
    flip_body_byte,
    process_pool,
    seeded_rng,
    segment_path,
    unique,
)
from tests.integration.mlflowlib import (
    CHECKPOINT_MODEL_PREFIX,
    client,
    file_digests,
    log_events,
    log_version,
    registry_view,
    rfc3339,
    state_view,
    view_diff,
    write_mlflow_config,
)
from tests.integration.shiplib import Segment, read_segments
from tests.support.procs import drstream, show, wait_for

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- helpers


def check_registry(uri: str, prefix: str, state: dict[str, Any], tmp: Path) -> None:
    """The registry's models under `prefix` are exactly `state`: metadata, and every
    version's files (downloaded with mlflow's client) by size and sha256."""
    want, have = state_view(state), registry_view(uri, prefix)
    diffs = view_diff(want, have, labels=("log", "target"))
    assert not diffs, "target registry differs from the log's state:\n  " + "\n  ".join(diffs)
    for name, m in state["models"].items():
        for n, v in m["versions"].items():
            files = file_digests(uri, name, int(n), tmp / "dl")
            expected = {a["path"]: (a["size"], a["sha256"]) for a in v["artifacts"]}
            assert files == expected, f"{name} version {n}: files {files} != log {expected}"


def drop_replayed(uri: str, prefix: str, log_id: str) -> None:
    """Delete the replayed models and the replays' checkpoint models from `uri`."""
    c = client(uri)
    for rm in c.search_registered_models(max_results=1000):
        if rm.name.startswith(prefix) or \
                rm.name.startswith(f"{CHECKPOINT_MODEL_PREFIX}{log_id}."):
            c.delete_registered_model(rm.name)


# --------------------------------------------------------------------------- the log


@dataclass
class RegistryLog:
    setup: DrSetup
    stream: str
    prefix: str
    segments: list[Segment]
    mid_seq: int  # a segment in the middle of the history (after step "stage")

    @property
    def events(self) -> list[dict[str, Any]]:
        return log_events(self.segments, self.stream)

    def events_through(self, seq: int) -> list[dict[str, Any]]:
        return log_events([s for s in self.segments if s.seq <= seq], self.stream)


def files(label: str, size: int = 300_000) -> dict[str, bytes]:
    seed = sum(label.encode())
    return {"MLmodel": f"label: {label}\n".encode(), "data/empty": b"",
            "data/weights.bin": bytes((seed + i * 7) % 251 for i in range(size))}


def stage(c: Any, name: str, version: int, to: str) -> None:
    with warnings.catch_warnings():  # stages are deprecated (FutureWarning), still served
        warnings.simplefilter("ignore", FutureWarning)
        c.transition_model_version_stage(name, str(version), to)


def history(server: MlflowServer, p: str) -> list[tuple[str, Callable[[], object], str]]:
    """(label, action, event type the step's last change ships as)."""
    c = server.client()
    a, b, d = f"{p}-a", f"{p}-b", f"{p}-d"
    return [
        ("models", lambda: (c.create_registered_model(a, tags={"team": "ml"}, description="A"),
                            c.create_registered_model(d, description="doomed")),
         "model.created"),
        ("version a1", lambda: log_version(server, a, files("a1")), "version.created"),
        ("model b, alias", lambda: (log_version(server, b, files("b1", 70_000)),
                                    c.set_registered_model_alias(a, "champion", "1")),
         "alias.set"),
        ("tags, descriptions", lambda: (c.update_registered_model(a, description="A, updated"),
                                        c.set_model_version_tag(a, "1", "validated", "true")),
         "version.tag.set"),
        ("version a2, stage", lambda: (log_version(server, a, files("a2")),
                                       stage(c, a, 1, "Production")), "version.stage"),
        ("delete a2", lambda: c.delete_model_version(a, "2"), "version.deleted"),
        ("rename", lambda: c.rename_registered_model(b, f"{p}-b2"), "model.renamed"),
        ("version a3, tag deleted", lambda: (log_version(server, a, files("a3")),
                                             c.delete_registered_model_tag(a, "team")),
         "model.tag.deleted"),
        ("delete model", lambda: c.delete_registered_model(d), "model.deleted"),
    ]


@pytest.fixture(scope="module")
def registry_log(_mlflow_primary_server: MlflowServer, _mlflow_standby_server: MlflowServer,
                 tmp_path_factory: pytest.TempPathFactory) -> RegistryLog:
    tmp = tmp_path_factory.mktemp("registry-log")
    primary = _mlflow_primary_server
    prefix = unique("rp")
    source = f"src{uuid.uuid4().hex[:6]}"  # a stream of its own on the shared servers
    setup = write_mlflow_config(
        tmp, primary=primary.tracking_uri, standby=_mlflow_standby_server.tracking_uri,
        prefix=prefix, source={"name": source, "interval_s": 0.3, "chunk_bytes": 65536},
        sink={"source": f"mlflow:{source}"}, ship={"flush_interval_s": 0.1})
    stream = f"mlflow:{source}"
    marks: dict[str, int] = {}
    started = time.monotonic()
    with process_pool(tmp) as pool:
        ship = pool.ship(setup)
        ship.wait_ready(90)
        for label, action, etype in history(primary, prefix):
            before = sum(e["type"] == etype for e in log_events(
                read_segments(setup.raw["store"], setup.log_id, setup.keyring), stream))
            action()

            def shipped(etype: str = etype, before: int = before, label: str = label) -> bool:
                segs = read_segments(setup.raw["store"], setup.log_id, setup.keyring)
                if sum(e["type"] == etype for e in log_events(segs, stream)) <= before:
                    return False
                marks[label] = segs[-1].seq
                return True

            wait_for(shipped, 60, f"step {label!r} in the log", [ship], interval=0.1)
        ship.stop_ok()
    segments = read_segments(setup.raw["store"], setup.log_id, setup.keyring)
    log = RegistryLog(setup, stream, prefix, segments, marks["version a2, stage"])
    later = [s.seq for s in segments if s.seq > log.mid_seq and log_events([s], stream)]
    assert later, "no events after the middle of the history: the cut would prove nothing"
    print(f"registry log: {len(log.events)} events in {len(segments)} segments in "
          f"{time.monotonic() - started:.1f}s; middle seq {log.mid_seq}, steps at {marks}")
    return log


@pytest.fixture
def standby(mlflow_standby: MlflowServer, registry_log: RegistryLog) -> Iterator[str]:
    uri = mlflow_standby.tracking_uri
    drop_replayed(uri, registry_log.prefix, registry_log.setup.log_id)
    yield uri
    drop_replayed(uri, registry_log.prefix, registry_log.setup.log_id)


# --------------------------------------------------------------------------- replay


def test_replay_until_seq_restores_the_registry_at_that_seq(
    registry_log: RegistryLog, standby: str, tmp_path: Path,
) -> None:
    log, seq = registry_log, registry_log.mid_seq
    want = fold(empty_state(), log.events_through(seq))
    res = drstream("replay", "--config", str(log.setup.path), "--target-mlflow", standby,
                   "--stream", log.stream, "--until-seq", str(seq), "--name", unique("cut"))
    assert res.returncode == 0, show(res)
    n = len(log.events_through(seq))
    assert f"through seq {seq}: wrote {n} events" in res.stdout, show(res)
    check_registry(standby, log.prefix, want, tmp_path)
    # the cut is real: the full history differs from the state at the seq
    assert fold(empty_state(), log.events) != want
    a = f"{log.prefix}-a"
    assert sorted(want["models"][a]["versions"], key=int) == ["1", "2"], want["models"][a]

    # --until TIME cuts by segment write time: the same cut, counted by a dry run
    created = next(s.header.created_at_ms for s in log.segments if s.seq == seq)
    dry = drstream("replay", "--config", str(log.setup.path), "--stream", log.stream,
                   "--until", rfc3339(created), "--dry-run")
    assert dry.returncode == 0, show(dry)
    assert f"would write {n} events" in dry.stdout, show(dry)
    progress = [ln for ln in dry.stderr.splitlines() if ln.startswith("replay seq")]
    assert progress and progress[-1].endswith("ETA 0s") and " events, " in progress[-1], \
        show(dry)


def test_replay_options_that_do_not_fit_the_stream_are_usage_errors(
    registry_log: RegistryLog,
) -> None:
    cfg = str(registry_log.setup.path)
    res = drstream("replay", "--config", cfg, "--stream", "kafka:primary",
                   "--target-mlflow", "http://127.0.0.1:9")
    assert res.returncode == 2 and "--target-mlflow" in res.stderr, show(res)
    res = drstream("replay", "--config", cfg, "--stream", registry_log.stream,
                   "--target-bootstrap", "127.0.0.1:9")
    assert res.returncode == 2 and "--target-bootstrap" in res.stderr, show(res)
    res = drstream("replay", "--config", cfg, "--stream", registry_log.stream)
    assert res.returncode == 2 and "--target-mlflow" in res.stderr, show(res)


def test_replay_killed_and_rerun_creates_each_version_once(
    registry_log: RegistryLog, standby: str, tmp_path: Path,
) -> None:
    rng = seeded_rng()
    log = registry_log
    want = fold(empty_state(), log.events)
    args = ["--log-format", "json",
            "replay", "--config", str(log.setup.path), "--target-mlflow", standby,
            "--stream", log.stream, "--name", unique("resume"), "--parallel", "2"]
    # The whole replay takes well under a second here, so the kill is placed by what the
    # replay logged, early on: after a segment, or between the files of a version
    # (inside one event), chosen at random.
    needle, times = rng.choice([("segment_applied", 1), ("segment_applied", 2),
                                ("artifact_uploaded", 1), ("artifact_uploaded", 2),
                                ("artifact_uploaded", 4)])
    first = ReplayProcess(args, tmp_path / "replay-1.log")
    try:
        wait_for(lambda: first.output().count(needle) >= times or not first.alive(), 90,
                 f"the replay to log {needle} {times} times", interval=0.005)
        assert first.alive(), f"replay finished before its kill\n{first.output()[-3000:]}"
    finally:
        first.kill()
    applied = first.output().count("segment_applied")
    print(f"replay killed after {needle} x{times}")
    second = ReplayProcess(args, tmp_path / "replay-2.log")
    rc = second.wait(120)
    out = second.output()
    assert rc == 0, f"resumed replay exited {rc}\n{out[-3000:]}"
    head = log.segments[-1].seq
    m = re.search(rf"through seq {head}: wrote (\d+) events", out)
    assert m, out[-3000:]
    assert int(m.group(1)) < len(log.events), "the rerun replayed the whole log again"
    check_registry(standby, log.prefix, want, tmp_path)
    c = client(standby)
    for name, model in want["models"].items():
        numbers = sorted(int(v.version) for v in c.search_model_versions(f"name='{name}'"))
        assert numbers == sorted(map(int, model["versions"])), f"{name}: versions {numbers}"
        for v in c.search_model_versions(f"name='{name}'"):
            assert v.tags.get(SOURCE_TAG) == f"{log.stream}/{name}/{v.version}", v.tags
    print(f"killed after {applied} segments with events; the rerun wrote {m.group(1)} of "
          f"{len(log.events)} events")


# --------------------------------------------------------------------------- drill


def test_drill_of_a_healthy_registry_log_passes(
    registry_log: RegistryLog, standby: str, tmp_path: Path,
) -> None:
    log = registry_log
    setup, store = copy_log(log.setup.raw, tmp_path)
    res, report = drill(setup, "--target-mlflow", standby, "--stream", log.stream)
    assert res.returncode == 0, f"drill of a healthy registry log failed: {show(res)}"
    assert report["ok"] is True and report["mismatches"] == [], report
    state = fold(empty_state(), log.events)
    assert report["events"] == len(log.events), report
    assert report["applied_through_seq"] == log.segments[-1].seq, report
    assert report["models"] == len(state["models"]), report
    n_files = sum(len(v["artifacts"]) for m in state["models"].values()
                  for v in m["versions"].values())
    assert report["files"] == n_files and n_files > 0, report
    assert report["rto_s"] >= 0 and report["rpo_at_point_s"] is not None, report
    stored = json.loads((store / report["audit_object"]).read_text())
    assert stored["ok"] is True and stored["kind"] == "registry", stored
    # without --keep the scratch models are gone again
    assert registry_view(standby, log.prefix) == {}, "the drill left its scratch models"
    human = drstream("drill", "--config", str(setup.path), "--target-mlflow", standby,
                     "--stream", log.stream)
    assert human.returncode == 0 and "PASSED" in human.stdout and \
        "mismatches             0" in human.stdout, show(human)
    print(f"registry drill passed: {report['events']} events, {report['files']} files "
          f"checked, RTO {report['rto_s']}s, verify {report['verify_s']}s")


def test_drill_of_a_tampered_registry_log_fails_naming_the_segment(
    registry_log: RegistryLog, standby: str, tmp_path: Path,
) -> None:
    log = registry_log
    setup, store = copy_log(log.setup.raw, tmp_path)
    with_events = [s.seq for s in log.segments if log_events([s], log.stream)]
    seq = with_events[len(with_events) // 2]
    flip_body_byte(store, setup.log_id, seq)
    res, report = drill(setup, "--target-mlflow", standby, "--stream", log.stream)
    assert res.returncode == 1, f"drill of a tampered log: want exit 1, {show(res)}"
    assert report["ok"] is False, report
    error = report.get("error", "")
    assert f"log {setup.log_id}" in error and re.search(rf"\bseq {seq}\b", error), \
        f"the drill error does not name log {setup.log_id} seq {seq}: {report}"
    assert json.loads((store / report["audit_object"]).read_text())["ok"] is False
    assert registry_view(standby, log.prefix) == {}, "the failed drill left scratch models"


def test_drill_keep_then_compare_names_what_differs(
    registry_log: RegistryLog, standby: str, tmp_path: Path,
) -> None:
    """`--keep` leaves the scratch models; a second drill refuses a registry that holds
    them; the comparison a drill makes names each altered model/version/field."""
    log = registry_log
    setup, _ = copy_log(log.setup.raw, tmp_path)
    res = drstream("drill", "--config", str(setup.path), "--target-mlflow", standby,
                   "--stream", log.stream, "--keep", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["ok"] is True, show(res)
    state = fold(empty_state(), log.events)
    check_registry(standby, log.prefix, state, tmp_path)  # kept, and equal

    again = drstream("drill", "--config", str(setup.path), "--target-mlflow", standby,
                     "--stream", log.stream)
    assert again.returncode != 0 and "already holds" in again.stderr, show(again)

    a = f"{log.prefix}-a"
    c = client(standby)
    c.update_registered_model(a, description="changed on the scratch registry")
    c.set_model_version_tag(a, "1", "validated", "false")
    size = next(f["size"] for f in state["models"][a]["versions"]["1"]["artifacts"]
                if f["path"] == "data/weights.bin")

    async def alter_and_compare() -> list[dict[str, Any]]:
        async with RegistryClient(standby, name="scratch") as rc:
            root = await rc.artifact_root(a, 1)

            async def zeros() -> Any:
                yield bytes(size)

            await rc.upload(f"{root}/data/weights.bin", zeros(), size=size)
            return (await compare_registry(rc, log.stream, state)).mismatches

    found = {(m["model"], m["version"], m["field"]) for m in asyncio.run(alter_and_compare())}
    assert found == {(a, None, "description"), (a, 1, "tags"),
                     (a, 1, "file data/weights.bin")}, found


def test_pruned_registry_log_still_rebuilds_the_registry(
    registry_log: RegistryLog, standby: str, tmp_path: Path,
) -> None:
    """Events before a prune are gone, but models made long ago must not be: the first
    remaining segment's state blob rebuilds them. A replay and a drill of a log whose
    first half was deleted (as prune does, a prefix) give the full registry state."""
    log = registry_log
    setup, store = copy_log(log.setup.raw, tmp_path)
    cut = log.mid_seq  # delete segments 1..mid_seq - 1; keep the rest
    for s in log.segments:
        if s.seq < cut:
            segment_path(store, setup.log_id, s.seq).unlink()
    want = fold(empty_state(), log.events)
    assert any(e["type"] == "model.created" for e in log.events_through(cut - 1)), \
        "the deleted prefix must hold model creations for this test to prove anything"
    res = drstream("replay", "--config", str(setup.path), "--target-mlflow", standby,
                   "--stream", log.stream, "--name", unique("pruned"))
    assert res.returncode == 0, show(res)
    check_registry(standby, log.prefix, want, tmp_path)
    drop_replayed(standby, log.prefix, setup.log_id)
    res, report = drill(setup, "--target-mlflow", standby, "--stream", log.stream)
    assert res.returncode == 0 and report["ok"] is True, f"{show(res)}\n{report}"
    assert report["models"] == len(want["models"]), report
