"""MlflowSource against a real MLflow server, a file store and real blobs: what it ships
(events, artifacts as blobs, the state blob), resuming from positions, an unreachable
registry, and webhook-triggered reconciles."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from drstream.connectors.file.store import FileStore, FileStoreConfig
from drstream.connectors.mlflow.client import RegistryClient
from drstream.connectors.mlflow.config import MlflowSourceConfig
from drstream.connectors.mlflow.events import empty_state, fold, load_state
from drstream.connectors.mlflow.metrics import SOURCE_UP
from drstream.connectors.mlflow.source import MlflowSource
from drstream.daemon.blobs import BlobStore
from drstream.daemon.keyring import KeyRing
from drstream.daemon.plugins import Context
from drstream.daemon.source import Delivery
from tests.infra.mlflow import MlflowServer
from tests.integration.mlflowlib import RegistryProxy, log_run, log_version, registry_view

pytestmark = pytest.mark.integration

LOG_ID = "mlflow-src-test"
CHUNK = 64 << 10
SECRET_ENV = "DRS_TEST_MLFLOW_WEBHOOK_SECRET"


@pytest.fixture
async def blobs(tmp_path: Path) -> AsyncIterator[BlobStore]:
    async with FileStore(FileStoreConfig(type="file", path=str(tmp_path / "store"))) as store:
        yield BlobStore(store, LOG_ID, KeyRing({"k1": os.urandom(32)}, "k1"))


def source_config(server: MlflowServer, model: str, **overrides: Any) -> MlflowSourceConfig:
    return MlflowSourceConfig.model_validate({
        "type": "mlflow", "name": "primary", "tracking_uri": server.tracking_uri,
        "interval_s": 0.3, "chunk_bytes": CHUNK, "request_timeout_s": 10,
        "models": {"include": [f"{model}.*"]}, **overrides})


@contextlib.asynccontextmanager
async def webhook_source(server: MlflowServer, name: str, blobs: BlobStore,
                         monkeypatch: pytest.MonkeyPatch, *, interval_s: float,
                         **webhook: Any) -> AsyncIterator[tuple[MlflowSource, str]]:
    """A started source of model `name` (created here) that runs a webhook receiver: a
    fresh secret in SECRET_ENV, a log id of its own, `webhook` settings added. Yields the
    source and its log id; closes it and deletes the webhook it registered at exit."""
    monkeypatch.setenv(SECRET_ENV, os.urandom(16).hex())
    cfg = source_config(server, name, interval_s=interval_s, webhook={
        "listen": "127.0.0.1:0", "secret": f"env:{SECRET_ENV}", **webhook})
    log_id = f"{LOG_ID}-{os.urandom(4).hex()}"
    await asyncio.to_thread(server.client().create_registered_model, name)
    src = MlflowSource(cfg, Context(log_id=log_id, blobs=blobs))
    await src.start({})
    try:
        yield src, log_id
    finally:
        await src.close()
        async with RegistryClient(server.tracking_uri) as rc:
            await rc.delete_webhook(f"drstream-{log_id}")


async def next_delivery(src: MlflowSource, timeout: float = 30.0) -> Delivery:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = await src.read(0.2)
        if d is not None:
            return d
    raise AssertionError(f"no delivery from {src.stream} within {timeout}s")


def events_of(d: Delivery) -> list[dict[str, Any]]:
    assert [b.stream for b in d.events] == ["mlflow:primary"]
    return d.events[0].events


@pytest.fixture
def proxy(mlflow_primary: MlflowServer) -> Iterator[RegistryProxy]:
    """The primary behind a proxy that can make a change land between two calls."""
    with RegistryProxy(mlflow_primary.tracking_uri) as p:
        yield p


async def drain(src: MlflowSource, quiet_s: float = 1.5, timeout: float = 60
                ) -> list[list[dict[str, Any]]]:
    """The events of every delivery until the source has nothing to ship for `quiet_s`."""
    out: list[list[dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_s:
        assert time.monotonic() < deadline, f"the source kept shipping: {out}"
        d = await src.read(0.2)
        if d is not None:
            out.append(events_of(d))
            quiet_since = time.monotonic()
    return out


DELETIONS = {"model.deleted", "version.deleted", "alias.deleted", "model.tag.deleted",
             "version.tag.deleted"}


async def file_from_blobs(blobs: BlobStore, art: dict[str, Any]) -> bytes:
    return b"".join([await blobs.get(c) for c in art["chunks"]])


async def test_ships_state_events_and_artifacts(mlflow_primary: MlflowServer,
                                               mlflow_model_name: str,
                                               blobs: BlobStore) -> None:
    name = mlflow_model_name
    big = os.urandom(3 * CHUNK + 123)  # 4 chunks
    files = {"MLmodel": b"flavor: x\n", "data/weights.bin": big, "empty.txt": b""}
    c = mlflow_primary.client()
    await asyncio.to_thread(c.create_registered_model, name, {"team": "ml"}, "a model")
    v1, run1 = await asyncio.to_thread(log_version, mlflow_primary, name, files)
    await asyncio.to_thread(c.set_registered_model_alias, name, "champion", str(v1))
    await asyncio.to_thread(c.set_model_version_tag, name, str(v1), "drstream.source", "x")

    src = MlflowSource(source_config(mlflow_primary, name), Context(log_id=LOG_ID, blobs=blobs))
    await src.start({})
    try:
        d = await next_delivery(src)
        evs = events_of(d)
        assert [e["type"] for e in evs] == ["model.created", "version.created", "alias.set"]
        created = (await asyncio.to_thread(c.get_registered_model, name)).creation_timestamp
        assert evs[0] == {"type": "model.created", "name": name, "description": "a model",
                          "tags": {"team": "ml"}, "created_ms": created}
        ver = evs[1]
        assert (ver["name"], ver["version"], ver["run_id"]) == (name, v1, run1)
        assert ver["tags"] == {}  # drstream.* tags are never shipped
        arts = {a["path"]: a for a in ver["artifacts"]}
        assert sorted(arts) == sorted(files)
        for path, data in files.items():
            assert arts[path]["size"] == len(data)
            assert arts[path]["sha256"] == hashlib.sha256(data).hexdigest()
            assert await file_from_blobs(blobs, arts[path]) == data
        assert len(arts["data/weights.bin"]["chunks"]) == 4
        assert evs[2] == {"type": "alias.set", "name": name, "alias": "champion", "version": v1}

        # the state blob is put before the delivery and equals fold(empty, events)
        pos = d.positions
        assert set(pos) == {"state_blob", "state_digest"} and src.positions() == pos
        raw = await blobs.get(pos["state_blob"])
        assert hashlib.sha256(raw).hexdigest() == pos["state_digest"]
        assert load_state(raw) == fold({"models": {}}, evs)

        # nothing changed: no delivery; then changes become exactly these events
        assert await src.read(0.5) is None
        uploaded = blobs.uploaded
        v2, _ = await asyncio.to_thread(log_version, mlflow_primary, name, files)
        await asyncio.to_thread(c.set_registered_model_tag, name, "env", "prod")
        await asyncio.to_thread(c.delete_registered_model_alias, name, "champion")
        await asyncio.to_thread(c.update_model_version, name, str(v1), "first")
        evs = events_of(await next_delivery(src))
        assert [e["type"] for e in evs] == ["version.created", "version.description",
                                            "model.tag.set", "alias.deleted"]
        assert evs[0]["version"] == v2
        # same file contents: every chunk was already stored, only the state blob is new
        assert blobs.uploaded == uploaded + 1
    finally:
        await src.close()

    # a restarted source resumes from the positions: nothing to ship, nothing re-read
    src2 = MlflowSource(source_config(mlflow_primary, name), Context(log_id=LOG_ID, blobs=blobs))
    await src2.start(src.positions())
    try:
        assert await src2.read(1.0) is None
        assert src2.reconciles >= 1
        await asyncio.to_thread(c.rename_registered_model, name, f"{name}-renamed")
        evs = events_of(await next_delivery(src2))
        assert evs == [{"type": "model.renamed", "name": name, "new_name": f"{name}-renamed"}]
        probe = await src2.probe(src2.positions())
        assert probe.reachable and probe.pending_records == 0
    finally:
        await src2.close()


async def test_unreachable_registry_is_reported_then_resumed(
        mlflow_primary: MlflowServer, mlflow_model_name: str, blobs: BlobStore) -> None:
    name = mlflow_model_name
    c = mlflow_primary.client()
    await asyncio.to_thread(c.create_registered_model, name)
    src = MlflowSource(source_config(mlflow_primary, name), Context(log_id=LOG_ID, blobs=blobs))
    await src.start({})
    try:
        first = await next_delivery(src)
        assert src.health() == (True, "ready")
        assert SOURCE_UP.labels("mlflow:primary")._value.get() == 1
        await asyncio.to_thread(mlflow_primary.stop)
        try:
            for _ in range(10):
                assert await src.read(0.3) is None
            assert src.up is False
            assert SOURCE_UP.labels("mlflow:primary")._value.get() == 0
            ok, reason = src.health()
            assert not ok and "unreachable" in reason
            probe = await src.probe(first.positions)
            assert not probe.reachable and probe.error
            assert src.positions() == first.positions  # what is in the log is kept
        finally:
            await asyncio.to_thread(mlflow_primary.start)
        await asyncio.to_thread(c.update_registered_model, name, "after the outage")
        evs = events_of(await next_delivery(src, timeout=60))
        assert evs == [{"type": "model.description", "name": name,
                        "description": "after the outage"}]
        assert src.up is True and SOURCE_UP.labels("mlflow:primary")._value.get() == 1
    finally:
        await src.close()


async def test_webhook_wakes_the_source_before_the_interval(
        mlflow_primary: MlflowServer, mlflow_model_name: str, blobs: BlobStore,
        monkeypatch: pytest.MonkeyPatch) -> None:
    name = mlflow_model_name
    interval = 60.0
    async with webhook_source(mlflow_primary, name, blobs, monkeypatch, interval_s=interval,
                              tolerance_s=60) as (src, log_id):
        assert src.webhook_url is not None
        async with RegistryClient(mlflow_primary.tracking_uri) as rc:
            hooks = [h for h in await rc.list_webhooks() if h["name"] == f"drstream-{log_id}"]
        assert [h["url"] for h in hooks] == [src.webhook_url]
        events_of(await next_delivery(src))  # the start reconcile
        reconciled_at = time.monotonic()
        await asyncio.to_thread(log_version, mlflow_primary, name, {"f": b"x" * 100})
        registered = time.monotonic()  # create_model_version returned (webhook sent async)
        d = await next_delivery(src, timeout=interval - 5)
        latency = time.monotonic() - registered
        print(f"\nwebhook-triggered delivery {latency:.2f}s after the version was "
              f"registered (reconcile interval {interval:.0f}s)")
        assert [e["type"] for e in events_of(d)] == ["version.created"]
        assert src.webhook_wakeups >= 1
        assert time.monotonic() < reconciled_at + interval  # before the next reconcile


async def test_receiver_unreachable_interval_still_ships(
        mlflow_primary: MlflowServer, mlflow_model_name: str, blobs: BlobStore,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry posts to a dead address (receiver down): reconciles still ship."""
    name = mlflow_model_name
    dead = "http://127.0.0.1:9/webhook"  # discard port: nothing listens
    async with webhook_source(mlflow_primary, name, blobs, monkeypatch, interval_s=1.0,
                              public_url=dead) as (src, _):
        events_of(await next_delivery(src))
        v1, _ = await asyncio.to_thread(log_version, mlflow_primary, name, {"f": b"y"})
        evs = events_of(await next_delivery(src))
        assert [(e["type"], e["version"]) for e in evs] == [("version.created", v1)]
        assert src.webhook_wakeups == 0


async def test_artifact_capture_memory_is_bounded(
        mlflow_primary: MlflowServer, mlflow_model_name: str, blobs: BlobStore,
        tmp_path: Path) -> None:
    """A file many times the chunk size is shipped with a few chunks in memory at most."""
    import tracemalloc

    name = mlflow_model_name
    size = 48 << 20
    chunk = 1 << 20
    big = tmp_path / "big.bin"
    h = hashlib.sha256()
    with big.open("wb") as f:
        for _ in range(size // chunk):
            block = os.urandom(chunk)
            h.update(block)
            f.write(block)
    c = mlflow_primary.client()
    await asyncio.to_thread(c.create_registered_model, name)
    run = await asyncio.to_thread(c.create_run, await asyncio.to_thread(
        lambda: c.get_experiment_by_name("Default").experiment_id))
    await asyncio.to_thread(c.log_artifact, run.info.run_id, str(big), "model")
    await asyncio.to_thread(c.create_model_version, name, f"runs:/{run.info.run_id}/model",
                            run.info.run_id)
    src = MlflowSource(source_config(mlflow_primary, name, chunk_bytes=chunk),
                       Context(log_id=LOG_ID, blobs=blobs))
    await src.start({})
    tracemalloc.start()
    try:
        evs = events_of(await next_delivery(src, timeout=120))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await src.close()
    (art,) = evs[1]["artifacts"]
    assert (art["path"], art["size"], art["sha256"]) == ("big.bin", size, h.hexdigest())
    assert len(art["chunks"]) == size // chunk
    print(f"\nshipped a {size >> 20} MiB file in {chunk >> 20} MiB chunks; traced peak "
          f"{peak / (1 << 20):.1f} MiB")
    assert peak < 16 * chunk  # ~10 chunks: queue, download buffer, encode copies


async def test_large_sync_ships_in_steps_without_moving_aliases_early(
        mlflow_primary: MlflowServer, mlflow_model_name: str, blobs: BlobStore,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the capture budget the rest waits for the next reconcile (at once); an alias
    whose new target is not shipped yet keeps its shipped target meanwhile."""
    import drstream.connectors.mlflow.source as source_module

    monkeypatch.setattr(source_module, "CAPTURE_BUDGET_BYTES", 1)  # one version per step
    name = mlflow_model_name
    c = mlflow_primary.client()
    await asyncio.to_thread(c.create_registered_model, name)
    vs = [(await asyncio.to_thread(log_version, mlflow_primary, name, {"f": bytes([i]) * 10}))[0]
          for i in range(3)]
    await asyncio.to_thread(c.set_registered_model_alias, name, "prod", str(vs[1]))
    src = MlflowSource(source_config(mlflow_primary, name, interval_s=60),
                       Context(log_id=LOG_ID, blobs=blobs))
    await src.start({})
    try:
        steps = [events_of(await next_delivery(src, timeout=20)) for _ in range(3)]
        assert [[(e["type"], e.get("version")) for e in evs] for evs in steps] == [
            [("model.created", None), ("version.created", vs[0])],
            [("version.created", vs[1]), ("alias.set", vs[1])],
            [("version.created", vs[2])],
        ]
        v4, _ = await asyncio.to_thread(log_version, mlflow_primary, name, {"f": b"4"})
        v5, _ = await asyncio.to_thread(log_version, mlflow_primary, name, {"f": b"5"})
        await asyncio.to_thread(c.set_registered_model_alias, name, "prod", str(v5))
        src._wake.set()  # as a webhook would
        steps = [events_of(await next_delivery(src, timeout=20)) for _ in range(2)]
        assert [[(e["type"], e.get("version")) for e in evs] for evs in steps] == [
            [("version.created", v4)],  # prod stays on vs[1] until v5 is shipped
            [("version.created", v5), ("alias.set", v5)],
        ]
        assert await src.read(0.5) is None
        assert src.reconciles == 5
    finally:
        await src.close()


async def test_webhook_signed_with_another_secret_is_rejected(
        mlflow_primary: MlflowServer, mlflow_model_name: str, blobs: BlobStore,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's own delivery, signed with a secret that is not ours: 401, counted, and
    the source is not woken."""
    from drstream.connectors.mlflow.metrics import WEBHOOKS_REJECTED

    name = mlflow_model_name
    bad = WEBHOOKS_REJECTED.labels("mlflow:primary", "bad_signature")
    async with webhook_source(mlflow_primary, name, blobs, monkeypatch,
                              interval_s=60.0) as (src, log_id):
        events_of(await next_delivery(src))
        assert src.webhook_url is not None
        async with RegistryClient(mlflow_primary.tracking_uri) as rc:
            await rc.ensure_webhook(f"drstream-{log_id}", src.webhook_url, "not-our-secret")
        await asyncio.sleep(1.5)  # the server caches webhook lists for 1 s
        before = bad._value.get()
        await asyncio.to_thread(log_version, mlflow_primary, name, {"f": b"z"})
        deadline = time.monotonic() + 20
        while bad._value.get() == before and time.monotonic() < deadline:
            assert await src.read(0.2) is None
        assert bad._value.get() > before
        assert src.webhook_wakeups == 0


def summary(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["type"], e["name"], *([e["new_name"]] if "new_name" in e else []),
             *([e["version"]] if "version" in e else [])) for e in events]


async def test_rename_during_a_reconcile_is_shipped_as_a_rename(
        mlflow_primary: MlflowServer, proxy: RegistryProxy, mlflow_model_name: str,
        blobs: BlobStore) -> None:
    """The model is renamed between the source's listing of models and its listing of
    versions: what ships is the rename, never its versions or aliases deleted."""
    name, renamed = f"{mlflow_model_name}-a", f"{mlflow_model_name}-a-v2"
    c = mlflow_primary.client()
    await asyncio.to_thread(c.create_registered_model, name)
    for i in range(2):
        await asyncio.to_thread(log_version, mlflow_primary, name, {"f": bytes([i]) * 100})
    await asyncio.to_thread(c.set_registered_model_alias, name, "prod", "2")
    src = MlflowSource(source_config(mlflow_primary, mlflow_model_name, interval_s=60,
                                     tracking_uri=proxy.url), Context(log_id=LOG_ID, blobs=blobs))
    await src.start({})
    try:
        first = events_of(await next_delivery(src))
        assert [e["type"] for e in first] == ["model.created", "version.created",
                                              "version.created", "alias.set"]
        proxy.arm("model-versions/search",
                  lambda: c.rename_registered_model(name, renamed))
        src._wake.set()  # as a webhook would
        shipped = await drain(src)
        assert proxy.armed() == 0, "the rename was never forced"
        assert [summary(evs) for evs in shipped] == [[("model.renamed", name, renamed)]]
    finally:
        await src.close()


async def test_listings_that_keep_disagreeing_are_narrowed_never_deleted(
        mlflow_primary: MlflowServer, proxy: RegistryProxy, mlflow_model_name: str,
        blobs: BlobStore) -> None:
    """A model renamed back and forth under every listing: the source never ships its
    versions or itself as deleted, ships the changes of the other models meanwhile, and
    the rename once the model holds still."""
    a, flipped, b = (f"{mlflow_model_name}-a", f"{mlflow_model_name}-a-x",
                     f"{mlflow_model_name}-b")
    c = mlflow_primary.client()
    for n in (a, b):
        await asyncio.to_thread(c.create_registered_model, n)
        await asyncio.to_thread(log_version, mlflow_primary, n, {"f": n.encode()})
    await asyncio.to_thread(c.set_registered_model_alias, a, "prod", "1")
    src = MlflowSource(source_config(mlflow_primary, mlflow_model_name, interval_s=60,
                                     tracking_uri=proxy.url), Context(log_id=LOG_ID, blobs=blobs))
    await src.start({})
    try:
        shipped = [events_of(await next_delivery(src))]
        names = [a, flipped]

        def flip() -> None:
            c.rename_registered_model(names[0], names[1])
            names.reverse()

        flips = 7  # odd: the model ends renamed
        proxy.arm("model-versions/search", flip, times=flips)
        await asyncio.to_thread(c.update_registered_model, b, "changed meanwhile")
        src._wake.set()
        d = await next_delivery(src)
        assert proxy.armed() > 0, "the flapping stopped before the first delivery"
        assert summary(events_of(d)) == [("model.description", b)]
        shipped.append(events_of(d))
        while proxy.armed():
            src._wake.set()
            if (d := await src.read(0.5)) is not None:
                shipped.append(events_of(d))
        src._wake.set()
        shipped += await drain(src)
    finally:
        await src.close()
    events = [e for evs in shipped for e in evs]
    assert not [e for e in events if e["type"] in DELETIONS], summary(events)
    assert ("model.renamed", a, flipped) in summary(events)
    final = fold(empty_state(), events)
    view = await asyncio.to_thread(registry_view, mlflow_primary.tracking_uri, mlflow_model_name)
    assert sorted(final["models"]) == sorted(view) == sorted([flipped, b])
    assert final["models"][flipped]["aliases"] == {"prod": 1}


async def test_each_version_is_read_through_its_own_source(
        mlflow_primary: MlflowServer, proxy: RegistryProxy, mlflow_model_name: str,
        blobs: BlobStore) -> None:
    """The model is deleted and created again, with versions 1 and 2 of other files,
    right after the source listed a new version 2 of the old model: no version is ever
    shipped with another version's files, and the new model is a new model."""
    name = mlflow_model_name
    c = mlflow_primary.client()
    runs: dict[str, dict[str, bytes]] = {}

    def run_with(label: str) -> tuple[str, str]:
        files = {"MLmodel": f"label: {label}\n".encode(), "w.bin": os.urandom(70_000)}
        run_id, source = log_run(c, files)
        runs[run_id] = files
        return run_id, source

    old = [await asyncio.to_thread(run_with, f"old{i}") for i in (1, 2)]
    new = [await asyncio.to_thread(run_with, f"new{i}") for i in (1, 2)]
    await asyncio.to_thread(c.create_registered_model, name)
    await asyncio.to_thread(c.create_model_version, name, old[0][1], old[0][0])
    src = MlflowSource(source_config(mlflow_primary, name, interval_s=60,
                                     tracking_uri=proxy.url), Context(log_id=LOG_ID, blobs=blobs))
    await src.start({})
    try:
        shipped = [events_of(await next_delivery(src))]
        await asyncio.to_thread(c.create_model_version, name, old[1][1], old[1][0])

        def recreate() -> None:
            c.delete_registered_model(name)
            c.create_registered_model(name)
            for run_id, source in new:
                c.create_model_version(name, source, run_id)

        proxy.arm("model-versions/search", recreate, after=True)
        src._wake.set()
        shipped += await drain(src)
        assert proxy.armed() == 0, "the re-creation was never forced"
    finally:
        await src.close()
    events = [e for evs in shipped for e in evs]
    for e in (e for e in events if e["type"] == "version.created"):
        want = {p: hashlib.sha256(data).hexdigest() for p, data in runs[e["run_id"]].items()}
        got = {a["path"]: a["sha256"] for a in e["artifacts"]}
        assert got == want, f"version {e['version']} of run {e['run_id']} shipped with " \
                            "another version's files"
        for a in e["artifacts"]:
            assert hashlib.sha256(await file_from_blobs(blobs, a)).hexdigest() == a["sha256"]
    final = fold(empty_state(), events)
    assert {n: v["run_id"] for n, v in final["models"][name]["versions"].items()} == \
        {"1": new[0][0], "2": new[1][0]}
    assert ("model.deleted", name) in summary(events)
    assert summary(events)[-2:] == [("version.created", name, 1), ("version.created", name, 2)]


async def test_recreated_name_and_rename_between_two_reconciles(
        mlflow_primary: MlflowServer, mlflow_model_name: str, blobs: BlobStore) -> None:
    """Between two reconciles one model is deleted and created again under its name, and
    another is renamed while a new model takes its old name (version 1 registered from
    the very run of the renamed model's version 1)."""
    a, r = f"{mlflow_model_name}-a", f"{mlflow_model_name}-r"
    c = mlflow_primary.client()
    for n in (a, r):
        await asyncio.to_thread(c.create_registered_model, n, {"gen": "1"})
    r1_run, r1_source = await asyncio.to_thread(log_run, c, {"f": b"r1"})
    await asyncio.to_thread(c.create_model_version, r, r1_source, r1_run)
    await asyncio.to_thread(log_version, mlflow_primary, r, {"f": b"r2"})
    for i in range(3):
        await asyncio.to_thread(log_version, mlflow_primary, a, {"f": bytes([i])})
    await asyncio.to_thread(c.set_registered_model_alias, a, "prod", "3")
    src = MlflowSource(source_config(mlflow_primary, mlflow_model_name, interval_s=60),
                       Context(log_id=LOG_ID, blobs=blobs))
    await src.start({})
    try:
        shipped = [events_of(await next_delivery(src))]
        await asyncio.to_thread(c.delete_registered_model, a)
        await asyncio.to_thread(c.create_registered_model, a, {"gen": "2"})
        await asyncio.to_thread(log_version, mlflow_primary, a, {"f": b"new"})
        await asyncio.to_thread(c.rename_registered_model, r, f"{r}-v2")
        await asyncio.to_thread(c.create_registered_model, r, {"gen": "2"})
        await asyncio.to_thread(c.create_model_version, r, r1_source, r1_run)
        src._wake.set()
        shipped += await drain(src)
    finally:
        await src.close()
    assert summary(shipped[1]) == [
        ("model.deleted", a), ("model.renamed", r, f"{r}-v2"), ("model.created", a),
        ("model.created", r), ("version.created", a, 1), ("version.created", r, 1)]
    assert len(shipped) == 2
    final = fold(empty_state(), [e for evs in shipped for e in evs])
    view = await asyncio.to_thread(registry_view, mlflow_primary.tracking_uri, mlflow_model_name)
    assert {n: sorted(m["versions"], key=int) for n, m in final["models"].items()} == \
        {n: [str(v) for v in sorted(m["versions"])] for n, m in view.items()}
    assert final["models"][a]["tags"] == {"gen": "2"} and final["models"][a]["aliases"] == {}
