"""`drstream ship` with an `mlflow` source (real processes): registry changes land in the
log as events, the manifests carry the state blob, a kill -9 and restart resume from the
log without shipping a change twice, and `drstream status` reports the stream."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from drstream.connectors.file.store import FileStore, FileStoreConfig
from drstream.connectors.mlflow.events import empty_state, fold, load_state
from drstream.daemon.blobs import BlobStore
from drstream.daemon.codec import EventBatch
from drstream.daemon.keyring import generate_key_file
from tests.infra.mlflow import MlflowServer
from tests.integration.mlflowlib import log_version
from tests.integration.shiplib import KEY_ID, ShipSetup, read_segments, shipper_pool
from tests.support.procs import drstream, wait_for

pytestmark = pytest.mark.integration

STREAM = "mlflow:primary"


def ship_setup(tmp_path: Path, server: MlflowServer, model: str) -> ShipSetup:
    key_path = tmp_path / "ship.key"
    generate_key_file(key_path)
    log_id = "mlflow-ship"
    store = {"type": "file", "path": str(tmp_path / "log-store")}
    raw: dict[str, Any] = {
        "log_id": log_id, "store": store,
        "keyring": {"active": KEY_ID, "keys": {KEY_ID: f"file:{key_path}"}},
        "sources": [{"type": "mlflow", "tracking_uri": server.tracking_uri, "interval_s": 0.5,
                     "chunk_bytes": 65536, "models": {"include": [f"{model}.*"]}}],
        "ship": {"heartbeat_interval_s": 2, "flush_interval_s": 0.25},
        "logging": {"level": "info", "format": "json"},
        "service": {"ship_metrics_listen": "127.0.0.1:0"},
    }
    setup = ShipSetup(tmp_path / "ship.yaml", log_id, store, key_path, raw)
    setup.rewrite()
    return setup


def shipped_events(setup: ShipSetup) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every event of the stream in log order, and the last manifest's positions."""
    events: list[dict[str, Any]] = []
    positions: dict[str, Any] = {}
    for seg in read_segments(setup.store, setup.log_id, setup.keyring):
        for b in seg.body.batches:
            if isinstance(b, EventBatch) and b.stream == STREAM:
                events += b.events
        positions = seg.manifest.positions.get(STREAM, positions)
    return events, positions


def wait_events(setup: ShipSetup, check: Any, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        events, _ = shipped_events(setup)
        if check(events):
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"log never satisfied the check; events: {events}")
        time.sleep(0.3)


async def state_blob(setup: ShipSetup, positions: dict[str, Any]) -> dict[str, Any]:
    async with FileStore(FileStoreConfig(type="file", path=setup.store["path"])) as store:
        blobs = BlobStore(store, setup.log_id, setup.keyring)
        return load_state(await blobs.get(positions["state_blob"]))


def test_ship_crash_and_resume(mlflow_primary: MlflowServer, mlflow_model_name: str,
                               tmp_path: Path) -> None:
    name = mlflow_model_name
    c = mlflow_primary.client()
    c.create_registered_model(name, description="d0")
    v1, _ = log_version(mlflow_primary, name, {"a.bin": b"a" * 200_000, "b.txt": b"b"})
    setup = ship_setup(tmp_path, mlflow_primary, name)
    with shipper_pool(tmp_path) as pool:
        first = pool.start(setup)
        first.wait_ready()
        wait_events(setup, lambda evs: any(e["type"] == "version.created" for e in evs))
        c.set_registered_model_alias(name, "prod", str(v1))
        wait_events(setup, lambda evs: any(e["type"] == "alias.set" for e in evs))
        first.kill()  # kill -9
        # changes while ship is down, then a restart resumes from the log's positions
        v2, _ = log_version(mlflow_primary, name, {"a.bin": b"c" * 1000})
        c.set_model_version_tag(name, str(v2), "k", "v")
        c.delete_registered_model_alias(name, "prod")
        down = drstream("status", "--config", str(setup.path), "--json")
        assert down.returncode == 0, down.stderr
        pending = json.loads(down.stdout)["streams"][STREAM]
        # registry changes carry no time: the RPO is unknown, never a reassuring 0
        assert pending["pending_records"] > 0 and pending["rpo_s"] is None, pending
        text = drstream("status", "--config", str(setup.path))
        assert "RPO unknown" in text.stdout, text.stdout
        second = pool.start(setup)
        second.wait_ready()
        evs = wait_events(setup, lambda evs: any(e["type"] == "alias.deleted" for e in evs))
        time.sleep(1.5)  # a few more reconciles: nothing new may be shipped
        second.stop_ok()
    evs, positions = shipped_events(setup)
    created = [(e["name"], e["version"]) for e in evs if e["type"] == "version.created"]
    assert created == [(name, v1), (name, v2)], "a version was shipped twice or not at all"
    state = fold(empty_state(), evs)  # raises on a repeated creation
    assert asyncio.run(state_blob(setup, positions)) == state
    m = state["models"][name]
    assert m["description"] == "d0" and m["aliases"] == {}
    assert m["versions"][str(v2)]["tags"] == {"k": "v"}

    out = drstream("status", "--config", str(setup.path), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    stream = report["streams"][STREAM]
    assert stream["reachable"] is True and stream["pending_records"] == 0, stream


def test_unreachable_registry_makes_ship_unready_then_ready(
        mlflow_server_factory: Any, mlflow_model_name: str, tmp_path: Path) -> None:
    """The registry goes away under a running ship: /readyz turns 503 naming the registry,
    drstream_source_up drops to 0, ship keeps running; when the registry is back on the
    same port and data, ship is ready again and ships the change made before the outage."""
    from tests.infra.procs import free_port
    from tests.integration.test_service import http_get, scrape

    server = mlflow_server_factory("readiness")
    name = mlflow_model_name
    server.client().create_registered_model(name)
    setup = ship_setup(tmp_path, server, name)
    port = free_port()
    setup.rewrite(service={"ship_metrics_listen": f"127.0.0.1:{port}"})

    def up() -> float:
        return scrape(port)[("drstream_source_up", (("stream", STREAM),))]

    with shipper_pool(tmp_path) as pool:
        ship = pool.start(setup)
        ship.wait_ready()
        wait_for(lambda: http_get(port, "/readyz")[0] == 200, 30, "/readyz 200", [ship])
        assert up() == 1
        server.stop()
        wait_for(lambda: http_get(port, "/readyz")[0] == 503, 30, "/readyz 503", [ship])
        _, body = http_get(port, "/readyz")
        assert "mlflow:primary" in body and "unreachable" in body, body
        assert up() == 0
        server.restart()
        server.client().update_registered_model(name, description="after the outage")
        wait_for(lambda: http_get(port, "/readyz")[0] == 200, 60, "/readyz 200 again", [ship])
        wait_events(setup, lambda evs: any(e["type"] == "model.description" for e in evs))
        assert up() == 1
        ship.stop_ok()
