"""Model registry replication end to end: primary MLflow -> `drstream ship` -> log ->
`drstream apply` -> standby MLflow, all real processes and servers (issue 6 acceptance).

The scripted history (tests/integration/mlflowlib.History) creates models, logs and
registers versions with several files (one of 200 MB, written in blocks), sets and
deletes tags and aliases, updates descriptions, transitions stages, deletes a version,
renames a model and deletes a model. At the end the standby must equal the primary:
names, version numbers, tags, aliases, descriptions, stages, and the sha256 of every
artifact file, downloaded from both servers with mlflow's own client.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.mlflow import MlflowServer
from tests.integration.applylib import DrProcess, ProcessPool, process_pool, seeded_rng, unique
from tests.integration.mlflowlib import (
    CHECKPOINT_MODEL_PREFIX,
    History,
    MiB,
    big_file_env,
    check_equal_with_files,
    check_replica_tags,
    client,
    wait_equal,
    wait_version,
    write_mlflow_config,
)

pytestmark = pytest.mark.integration

KILLS = 3  # per process, at least


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


def test_scripted_history_replicates_to_the_standby(
        mlflow_primary: MlflowServer, mlflow_standby: MlflowServer, pool: ProcessPool,
        tmp_path: Path) -> None:
    prefix = unique("hist")
    setup = write_mlflow_config(tmp_path, primary=mlflow_primary.tracking_uri,
                                standby=mlflow_standby.tracking_uri, prefix=prefix)
    ship, apply = pool.ship(setup), pool.apply(setup)
    ship.wait_ready(90)
    apply.wait_ready(90)
    history = History(mlflow_primary.tracking_uri, prefix, tmp_path / "work",
                      big_bytes=big_file_env(), pause_s=0.3)
    timings: dict[str, float] = {}

    def on_step(label: str) -> None:
        if label == "version b1 (big)":
            assert history.big_version is not None
            name, n = history.big_version
            timings["big"] = wait_version(mlflow_standby.tracking_uri, name, n, timeout=180,
                                         procs=[ship, apply])

    started = time.monotonic()
    history.run(on_step=on_step)
    print(f"history of {len(history.steps)} steps ran in {time.monotonic() - started:.1f}s")
    print(f"{history.big_bytes // MiB} MB version on the standby "
          f"{timings['big']:.1f}s after it was registered on the primary")
    took = wait_equal(mlflow_primary.tracking_uri, mlflow_standby.tracking_uri, prefix,
                      timeout=120, procs=[ship, apply])
    print(f"standby equal {took:.1f}s after the last step of the history")
    view = check_equal_with_files(mlflow_primary, mlflow_standby, prefix, tmp_path)
    # the history did what it says: the end state has each kind of change in it
    names = history.names
    assert set(view) == {names["a"], names["renamed"], names["d"]}
    assert sorted(view[names["a"]]["versions"]) == [1, 3, 5]  # 2 and 4 deleted: gaps
    assert view[names["a"]]["aliases"] == {"champion": 1}
    assert view[names["a"]]["versions"][1]["stage"] == "Production"
    assert view[names["renamed"]]["versions"][1]["stage"] == "Archived"
    check_replica_tags(mlflow_standby, view)
    ship.stop_ok()
    apply.stop_ok()
    # the checkpoint lives on the standby, outside every comparison
    cps = [m.name for m in client(mlflow_standby.tracking_uri).search_registered_models(
        f"name = '{CHECKPOINT_MODEL_PREFIX}{setup.log_id}.standby'")]
    assert cps == [f"{CHECKPOINT_MODEL_PREFIX}{setup.log_id}.standby"]


def test_kill_ship_and_apply_during_the_history(
        mlflow_primary: MlflowServer, mlflow_standby: MlflowServer, pool: ProcessPool,
        tmp_path: Path) -> None:
    rng = seeded_rng()
    prefix = unique("kill")
    # small artifact chunks: a kill lands while blobs are shipped or uploaded
    setup = write_mlflow_config(tmp_path, primary=mlflow_primary.tracking_uri,
                                standby=mlflow_standby.tracking_uri, prefix=prefix,
                                source={"chunk_bytes": 256 * 1024},
                                ship={"flush_interval_s": 0.1})
    history = History(mlflow_primary.tracking_uri, prefix, tmp_path / "work",
                      big_bytes=24 * MiB, pause_s=0.8)
    procs: dict[str, DrProcess] = {"ship": pool.ship(setup, "ship-1"),
                                   "apply": pool.apply(setup, "apply-1")}
    procs["ship"].wait_ready(90)
    procs["apply"].wait_ready(90)

    errors: list[BaseException] = []

    def run_history() -> None:
        try:
            history.run()
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=run_history, name="mlflow-history", daemon=True)
    worker.start()
    kills = {"ship": 0, "apply": 0}
    mid_version = 0
    while worker.is_alive() or min(kills.values()) < KILLS:
        time.sleep(rng.uniform(0.3, 2.0))
        # random while the history runs; afterwards whichever still needs kills
        which = rng.choice(sorted(kills)) if worker.is_alive() \
            else min(sorted(kills), key=lambda k: kills[k])
        if which == "apply" and rng.random() < 0.5 and \
                wait_output_grows(procs["apply"], '"artifact_uploaded"', timeout=3):
            mid_version += 1  # between two files of one version: inside an event
        kill_and_restart(procs, which, kills, pool, setup, rng)
    worker.join(60)
    assert not errors, f"the history failed on the primary: {errors[0]!r}"
    print(f"kills: {kills}, {mid_version} of apply's while it uploaded a version's files")
    assert min(kills.values()) >= KILLS

    took = wait_equal(mlflow_primary.tracking_uri, mlflow_standby.tracking_uri, prefix,
                      timeout=150, procs=list(procs.values()))
    print(f"standby equal {took:.1f}s after the history and the last kill")
    view = check_equal_with_files(mlflow_primary, mlflow_standby, prefix, tmp_path)
    check_replica_tags(mlflow_standby, view)
    # no change applied twice: no version beyond the primary's, none left half-made
    c = client(mlflow_standby.tracking_uri)
    for name, m in view.items():
        numbers = sorted(int(v.version) for v in c.search_model_versions(f"name='{name}'"))
        assert numbers == sorted(m["versions"]), f"{name}: standby versions {numbers}"
    for p in procs.values():
        p.stop_ok()


def wait_output_grows(proc: DrProcess, needle: str, timeout: float) -> bool:
    """Wait until `needle` appears once more in the process's output (False: timeout)."""
    before = proc.output().count(needle)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.alive():
        if proc.output().count(needle) > before:
            return True
        time.sleep(0.02)
    return False


def kill_and_restart(procs: dict[str, DrProcess], which: str, kills: dict[str, int],
                     pool: ProcessPool, setup: Any, rng: random.Random) -> None:
    proc = procs[which]
    if proc.alive():
        proc.kill()
        kills[which] += 1
    else:
        raise AssertionError(f"{which} exited on its own\n{proc.describe()}")
    time.sleep(rng.uniform(0, 0.5))
    label = f"{which}-{kills[which] + 1}"
    procs[which] = pool.start(which, setup, label)
    procs[which].wait_ready(90)


def test_webhook_replicates_a_new_version_before_the_next_reconcile(
        mlflow_primary: MlflowServer, mlflow_standby: MlflowServer, pool: ProcessPool,
        tmp_path: Path) -> None:
    """With a 60 s reconcile interval, a version registered on the primary reaches the
    standby through the webhook long before the next reconcile would have found it."""
    interval = 60.0
    secret = tmp_path / "webhook.secret"
    secret.write_text("webhook-secret-for-this-test\n")
    secret.chmod(0o600)
    prefix = unique("hook")
    setup = write_mlflow_config(
        tmp_path, primary=mlflow_primary.tracking_uri, standby=mlflow_standby.tracking_uri,
        prefix=prefix, source={"interval_s": interval, "webhook": {
            "listen": "127.0.0.1:0", "secret": f"file:{secret}"}})
    ship, apply = pool.ship(setup), pool.apply(setup)
    ship.wait_ready(90)
    apply.wait_ready(90)
    reconciled = time.monotonic()  # ship reconciles once at start, then every interval
    time.sleep(2.0)  # the servers cache webhook lists for 1 s
    history = History(mlflow_primary.tracking_uri, prefix, tmp_path / "work", pause_s=0)
    name = f"{prefix}-hooked"
    history.c.create_registered_model(name)
    n = history._version(name, "hooked", small=True)
    registered = time.monotonic()
    took = wait_version(mlflow_standby.tracking_uri, name, n, timeout=interval,
                        procs=[ship, apply])
    print(f"version {n} on the standby {took:.2f}s after it was registered on the primary "
          f"(reconcile interval {interval:.0f}s)")
    assert registered + took < reconciled + interval, "arrived only with the next reconcile"
    ship.stop_ok()
    apply.stop_ok()
