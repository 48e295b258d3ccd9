"""A model keeps its identity through re-created names, renames and races (issue 21):
real MLflow servers, `drstream ship` and `drstream apply` as processes, `kill -9`.

- A name deleted and created again at once (five calls, well under a second unless the
  machine is overloaded; the time is printed), with versions on both generations;
  then a model renamed while a new one takes its old name (version files of the same
  path and size as the renamed model's). With and without the webhook, the standby ends
  equal to the primary in names, numbers, tags, aliases, stages and every file's sha256,
  and apply never stops.
- A rename forced between the source's listings (a proxy in front of the primary makes
  it at the exact call): no version is ever missing on the standby (watched while it
  happens), nor in the log's state at any segment, nor in `replay --until`.
- Names with ' " \\ spaces and non-ASCII; apply killed with SIGKILL while it creates the
  placeholder versions of a gap: none is left after the restart.
- `drill --until` a time just after each scenario passes, and the state the log folds
  into at that time is what the primary held.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drstream.connectors.mlflow.events import empty_state, fold
from tests.infra.mlflow import MlflowServer
from tests.integration.applylib import DrSetup, ProcessPool, drill, process_pool, unique
from tests.integration.mlflowlib import (
    CHECKPOINT_MODEL_PREFIX,
    RegistryProxy,
    check_equal_with_files,
    check_replica_tags,
    client,
    log_events,
    log_run,
    registry_view,
    rfc3339,
    state_view,
    versions_by_prefix,
    view_diff,
    wait_equal,
    write_mlflow_config,
)
from tests.integration.shiplib import read_segments
from tests.support.procs import drstream, show, wait_for

pytestmark = pytest.mark.integration

GAP = 20  # the one version left on the primary: 19 placeholders on the standby
TRICKY = " it's \"q\" \\ ünï"  # appended to a test's plain prefix: every model name has it


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


def flow(tmp_path: Path, primary: str, standby: str, prefix: str, **source: Any) -> DrSetup:
    """A flow with a stream of its own (drills into the shared scratch server must not
    meet another test's models of the same stream)."""
    name = f"p{os.urandom(3).hex()}"
    return write_mlflow_config(tmp_path, primary=primary, standby=standby, prefix=prefix,
                               source={"name": name, **source},
                               sink={"source": f"mlflow:{name}"})


def stream_of(setup: DrSetup) -> str:
    return f"mlflow:{setup.raw['sources'][0]['name']}"


def model_files(label: str) -> dict[str, bytes]:
    """Every generation has a `data/w.bin` of 65,537 bytes (other bytes each time)."""
    return {"MLmodel": f"label: {label}\n".encode(), "data/w.bin": os.urandom(65_537)}


def check_points(setup: DrSetup, points: list[tuple[str, int, dict[str, Any]]],
                 scratch: MlflowServer) -> None:
    """At each (label, time, primary view then): the log's state through that time is
    what the primary held, and `drill --until` that time passes."""
    segments = read_segments(setup.raw["store"], setup.log_id, setup.keyring)
    stream = stream_of(setup)
    for label, at_ms, view in points:
        through = [s for s in segments if s.header.created_at_ms <= at_ms]
        state = fold(empty_state(), log_events(through, stream))
        diffs = view_diff(view, state_view(state), labels=("primary", "log"))
        assert not diffs, f"after {label}: the log's state differs:\n  " + "\n  ".join(diffs)
        res, report = drill(setup, "--target-mlflow", scratch.tracking_uri, "--stream", stream,
                            "--until", rfc3339(at_ms))
        assert res.returncode == 0 and report["ok"] is True, \
            f"drill --until just after {label}: {show(res)}\n{report}"
        assert report["models"] == len(view), report
        print(f"drill --until just after {label}: {report['models']} models, "
              f"{report['versions']} versions, {report['files']} files, RTO {report['rto_s']}s")


def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "webhook.secret"
    path.write_text(os.urandom(16).hex())
    path.chmod(0o600)
    return f"file:{path}"


@pytest.mark.parametrize("webhook", [False, True], ids=["interval", "webhook"])
def test_recreated_and_renamed_models_replicate_exactly(
        mlflow_primary: MlflowServer, mlflow_standby: MlflowServer, mlflow_scratch: MlflowServer,
        pool: ProcessPool, tmp_path: Path, webhook: bool) -> None:
    prefix = unique("ident")
    a, r = f"{prefix}-a{TRICKY}", f"{prefix}-r{TRICKY}"
    source: dict[str, Any] = {"interval_s": 1}
    if webhook:  # reconciles mostly at the webhook's moments, mid-way through each step
        source = {"interval_s": 3, "webhook": {"listen": "127.0.0.1:0",
                                               "secret": secret_file(tmp_path)}}
    setup = flow(tmp_path, mlflow_primary.tracking_uri, mlflow_standby.tracking_uri, prefix,
                 **source)
    c = client(mlflow_primary.tracking_uri)
    runs = {label: log_run(c, model_files(label))
            for label in ("a1", "a2", "a3", "A1", "A2", "r1", "r2", "n1")}

    def register(name: str, label: str) -> None:
        run_id, src = runs[label]
        c.create_model_version(name, src, run_id, tags={"label": label})

    ship, apply = pool.ship(setup), pool.apply(setup)
    ship.wait_ready(90)
    apply.wait_ready(90)
    procs = [ship, apply]
    c.create_registered_model(a, tags={"gen": "1"}, description="first a")
    for label in ("a1", "a2", "a3"):
        register(a, label)
    c.set_registered_model_alias(a, "prod", "3")
    c.create_registered_model(r, tags={"team": "ranking"})
    for label in ("r1", "r2"):
        register(r, label)
    c.set_registered_model_alias(r, "champion", "2")
    wait_equal(mlflow_primary.tracking_uri, mlflow_standby.tracking_uri, prefix, 60, procs)
    check_equal_with_files(mlflow_primary, mlflow_standby, prefix, tmp_path)
    points = []

    started = time.monotonic()
    c.delete_registered_model(a)
    c.create_registered_model(a, tags={"gen": "2"}, description="second a")
    register(a, "A1")
    register(a, "A2")
    c.set_registered_model_alias(a, "prod", "1")
    print(f"deleted, created again with 2 versions and an alias in "
          f"{time.monotonic() - started:.2f}s")
    wait_equal(mlflow_primary.tracking_uri, mlflow_standby.tracking_uri, prefix, 60, procs)
    view = check_equal_with_files(mlflow_primary, mlflow_standby, prefix, tmp_path)
    assert sorted(view[a]["versions"]) == [1, 2] and view[a]["tags"] == {"gen": "2"}
    points.append(("re-created name", int(time.time() * 1000), view))

    c.rename_registered_model(r, f"{r}-v2")
    c.create_registered_model(r, tags={"team": "new"})
    register(r, "n1")
    wait_equal(mlflow_primary.tracking_uri, mlflow_standby.tracking_uri, prefix, 60, procs)
    view = check_equal_with_files(mlflow_primary, mlflow_standby, prefix, tmp_path)
    assert sorted(view[f"{r}-v2"]["versions"]) == [1, 2] and sorted(view[r]["versions"]) == [1]
    points.append(("rename and a new model under the old name", int(time.time() * 1000), view))
    check_replica_tags(mlflow_standby, view, stream_of(setup))
    if webhook:
        assert '"trigger": "webhook"' in ship.output(), "no reconcile came from a webhook"
    ship.stop_ok()
    apply.stop_ok()
    check_points(setup, points, mlflow_scratch)


def test_rename_racing_a_reconcile_never_hides_a_version(
        mlflow_primary: MlflowServer, mlflow_standby: MlflowServer, mlflow_scratch: MlflowServer,
        pool: ProcessPool, tmp_path: Path) -> None:
    prefix = unique("race")
    name, renamed = f"{prefix}-m{TRICKY}", f"{prefix}-m{TRICKY}-v2"
    c = client(mlflow_primary.tracking_uri)
    c.create_registered_model(name)
    for i in range(3):
        run_id, src = log_run(c, model_files(f"m{i}"))
        c.create_model_version(name, src, run_id)
    c.set_registered_model_alias(name, "prod", "3")
    with RegistryProxy(mlflow_primary.tracking_uri) as proxy:
        setup = flow(tmp_path, proxy.url, mlflow_standby.tracking_uri, prefix, interval_s=1)
        ship, apply = pool.ship(setup), pool.apply(setup)
        procs = [ship, apply]
        wait_equal(mlflow_primary.tracking_uri, mlflow_standby.tracking_uri, prefix, 90, procs)
        watch = StandbyWatch(mlflow_standby.tracking_uri, prefix)
        with watch:
            time.sleep(0.5)
            proxy.arm("model-versions/search", lambda: c.rename_registered_model(name, renamed))
            wait_for(lambda: proxy.armed() == 0, 30, "ship's next reconcile", procs)
            wait_equal(mlflow_primary.tracking_uri, mlflow_standby.tracking_uri, prefix, 60,
                       procs)
            time.sleep(0.5)
        print(f"standby watched {watch.polls} times while the rename replicated")
        assert watch.polls > 10 and watch.fewest == 3, \
            f"the standby showed {watch.fewest} versions at one moment: {watch.low_sample}"
        view = check_equal_with_files(mlflow_primary, mlflow_standby, prefix, tmp_path)
        assert list(view) == [renamed] and sorted(view[renamed]["versions"]) == [1, 2, 3]
        ship.stop_ok()
        apply.stop_ok()
    done_ms = int(time.time() * 1000)

    # the log: at no segment does its state lack a version; no deletion in it at all
    stream = stream_of(setup)
    segments = read_segments(setup.raw["store"], setup.log_id, setup.keyring)
    events = log_events(segments, stream)
    assert not [e for e in events if e["type"].endswith("deleted")], events
    synced = False
    for s in segments:
        state = fold(empty_state(), log_events([x for x in segments if x.seq <= s.seq], stream))
        count = sum(len(m["versions"]) for m in state["models"].values())
        synced = synced or count == 3
        assert not synced or count == 3, f"the log's state at seq {s.seq} has {count} versions"
    renamed_at = next(s.header.created_at_ms for s in segments
                      if any(e["type"] == "model.renamed" for e in log_events([s], stream)))
    for at_ms in (renamed_at - 1, renamed_at):
        run = unique("until")
        res = drstream("replay", "--config", str(setup.path), "--target-mlflow",
                       mlflow_scratch.tracking_uri, "--stream", stream, "--until",
                       rfc3339(at_ms), "--name", run)
        assert res.returncode == 0, show(res)
        got = registry_view(mlflow_scratch.tracking_uri, prefix)
        assert [sorted(m["versions"]) for m in got.values()] == [[1, 2, 3]], got
        drop_models(mlflow_scratch.tracking_uri, prefix, f"{setup.log_id}.replay-{run}")
    check_points(setup, [("the rename", done_ms, view)], mlflow_scratch)


def test_kill_apply_while_it_fills_a_version_gap_leaves_no_placeholder(
        mlflow_primary: MlflowServer, mlflow_standby: MlflowServer, mlflow_scratch: MlflowServer,
        pool: ProcessPool, tmp_path: Path) -> None:
    """Only version 20 is left on the primary: the standby creates and deletes 19
    placeholders to number it 20. Apply (talking to the standby through a proxy) is
    killed with SIGKILL right after the standby made a placeholder, before apply hears of
    it, twice; the restarted apply must clean up what the killed one left."""
    prefix = unique("gap")
    name = f"{prefix}-g{TRICKY}"
    c = client(mlflow_primary.tracking_uri)
    c.create_registered_model(name)
    run_id, src = log_run(c, model_files("g"))
    for _ in range(GAP):
        c.create_model_version(name, src, run_id)
    for n in range(1, GAP):
        c.delete_model_version(name, str(n))

    def versions() -> list[int]:
        return sorted(int(v.version) for v in
                      versions_by_prefix(mlflow_standby.tracking_uri, prefix).get(name, []))

    with RegistryProxy(mlflow_standby.tracking_uri) as proxy:
        setup = flow(tmp_path, mlflow_primary.tracking_uri, proxy.url, prefix)
        ship = pool.ship(setup)
        apply = pool.apply(setup, "apply-1")
        left: list[list[int]] = []
        for kill in range(2):
            creates = proxy.hits.get("model-versions/create", 0)
            proxy.arm("model-versions/create", apply.kill, after=True)
            wait_for(lambda: proxy.armed() == 0, 90, "apply to create a placeholder", [ship])
            left.append(versions())
            apply = pool.apply(setup, f"apply-{kill + 2}")
            print(f"kill {kill + 1} after create #{proxy.hits['model-versions/create'] - creates}"
                  f": the standby holds versions {left[-1]}")
        assert all(vs and GAP not in vs for vs in left), f"not killed mid-gap: {left}"
        wait_equal(mlflow_primary.tracking_uri, mlflow_standby.tracking_uri, prefix, 60,
                   [ship, apply])
        assert versions() == [GAP], f"versions on the standby: {versions()}"
        view = check_equal_with_files(mlflow_primary, mlflow_standby, prefix, tmp_path)
        check_replica_tags(mlflow_standby, view, stream_of(setup))
        ship.stop_ok()
        apply.stop_ok()
    check_points(setup, [("the gap", int(time.time() * 1000), view)], mlflow_scratch)


class StandbyWatch:
    """Counts, in a thread, the versions of the models under `prefix` on a registry, one
    listing (one SQL query on the server) at a time, as fast as it answers."""

    def __init__(self, uri: str, prefix: str) -> None:
        self.uri, self.prefix = uri, prefix
        self.polls = 0
        self.fewest: int | None = None
        self.low_sample: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="standby-watch", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                found = versions_by_prefix(self.uri, self.prefix)
                count = sum(len(vs) for vs in found.values())
                self.polls += 1
                if self.fewest is None or count < self.fewest:
                    self.fewest = count
                    self.low_sample = {n: sorted(int(v.version) for v in vs)
                                       for n, vs in found.items()}
        except BaseException as e:  # reported by __exit__
            self.error = e

    def __enter__(self) -> StandbyWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        if self.error is not None:
            raise self.error


def drop_models(uri: str, prefix: str, checkpoint: str) -> None:
    """Delete a replay's models (under `prefix`) and its checkpoint model from `uri`."""
    c = client(uri)
    for rm in c.search_registered_models(max_results=1000):
        if rm.name.startswith(prefix) or rm.name == f"{CHECKPOINT_MODEL_PREFIX}{checkpoint}":
            c.delete_registered_model(rm.name)
