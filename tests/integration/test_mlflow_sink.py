"""The `mlflow` sink against a real standby MLflow server (no ship: events built here).

Segments' events and artifact blobs are written the way the source writes them (real
BlobStore in a file store); the sink applies them to the session's standby server, and
the standby is read back with mlflow's own client. Crashes are reproduced by what they
leave behind (a checkpoint with a half-applied segment, a version created on the way to
another number) rather than by mocks.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from drstream.connectors.mlflow.checkpoint import CHECKPOINT_TAG, encode_checkpoint
from drstream.connectors.mlflow.config import MlflowSinkConfig
from drstream.connectors.mlflow.events import SOURCE_TAG, diff, empty_state
from drstream.connectors.mlflow.sink import MlflowSink
from drstream.daemon.blobs import BlobStore
from drstream.daemon.codec import Body, EventBatch, Manifest
from drstream.daemon.errors import SinkError, SinkFencedError
from drstream.daemon.keyring import KeyRing
from drstream.daemon.plugins import Context, installed
from drstream.daemon.records import Checkpoint
from tests.infra.mlflow import MlflowServer
from tests.integration.mlflowlib import file_digests, registry_view

pytestmark = pytest.mark.integration
STREAM = "mlflow:primary"


@pytest.fixture
async def blobs(tmp_path: Path) -> AsyncIterator[BlobStore]:
    registry = installed()
    async with registry.open_store(registry.store_config_from_url(f"file://{tmp_path / 'store'}")) \
            as store:
        yield BlobStore(store, "sinktest", KeyRing({"k1": os.urandom(32)}, "k1"))


async def put_file(blobs: BlobStore, path: str, data: bytes, chunk: int = 1 << 20
                   ) -> dict[str, Any]:
    ids = [await blobs.put(data[i:i + chunk]) for i in range(0, len(data), chunk)]
    return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "chunks": ids}


def body(events: list[dict[str, Any]], stream: str = STREAM) -> Body:
    return Body(Manifest(positions={stream: {"state_digest": "x"}}, record_count=len(events)),
                [EventBatch(stream, events)])


def make_sink(standby: MlflowServer, blobs: BlobStore | None, log_id: str,
              **kw: Any) -> MlflowSink:
    cfg = MlflowSinkConfig(type="mlflow", tracking_uri=standby.tracking_uri, **kw)
    return MlflowSink(cfg, Context(log_id=log_id, blobs=blobs))


def digest(seq: int) -> bytes:
    return hashlib.sha256(f"segment {seq}".encode()).digest()


def leave_checkpoint(c: Any, log_id: str, segment_digest: bytes) -> None:
    """Set the sink's checkpoint on the standby to one a crashed apply leaves inside
    segment 1 (`done` 1), the segment having digest `segment_digest`."""
    partial = {"seq": 1, "digest": segment_digest.hex(), "done": 1}
    c.set_registered_model_tag(f"drstream.checkpoint.{log_id}.standby", CHECKPOINT_TAG,
                               encode_checkpoint(Checkpoint(), partial))


def model(versions: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"description": "", "tags": {}, "aliases": {}, "versions": versions, **kw}


def version(artifacts: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"description": "", "tags": {}, "stage": "None", "run_id": "r1",
            "source": f"s3://primary/{uuid.uuid4().hex}", "artifacts": artifacts, **kw}


async def test_sink_replays_events_keeps_numbers_and_files(
        mlflow_standby: MlflowServer, blobs: BlobStore, mlflow_model_name: str,
        tmp_path: Path) -> None:
    name = mlflow_model_name
    log_id = f"sink-{uuid.uuid4().hex[:8]}"
    big = os.urandom(3 * (1 << 20) + 17)
    files = [await put_file(blobs, "MLmodel", b"flavors: {}\n"),
             await put_file(blobs, "data/model.bin", big),
             await put_file(blobs, "empty.txt", b"")]
    state = {"models": {name: model(
        {"3": version(files, description="third", tags={"k": "v"}, stage="Staging"),
         "5": version(files[:1])},
        description="a model", tags={"team": "ml"}, aliases={"champion": 3})}}
    events = diff(empty_state(), state)
    sink = make_sink(mlflow_standby, blobs, log_id)
    try:
        assert (await sink.start()).seq == 0
        await sink.apply(1, digest(1), 1000, body(events))
        assert sink.checkpoint().seq == 1
    finally:
        await sink.close()

    view = registry_view(mlflow_standby.tracking_uri, prefix=name)
    assert view == {name: {
        "description": "a model", "tags": {"team": "ml"}, "aliases": {"champion": 3},
        "versions": {3: {"description": "third", "tags": {"k": "v"}, "stage": "Staging"},
                     5: {"description": "", "tags": {}, "stage": "None"}}}}
    c = mlflow_standby.client()
    assert c.get_registered_model(name).tags[SOURCE_TAG] == f"{STREAM}/{name}"
    assert c.get_model_version(name, "3").tags[SOURCE_TAG] == f"{STREAM}/{name}/3"
    got = file_digests(mlflow_standby.tracking_uri, name, 3, tmp_path / "dl")
    assert got == {a["path"]: (a["size"], a["sha256"]) for a in files}

    # a second apply process reads the checkpoint back from the standby registry
    sink2 = make_sink(mlflow_standby, blobs, log_id)
    try:
        cp = await sink2.peek()
        assert (cp.seq, cp.digest, cp.created_at_ms) == (1, digest(1), 1000)
        assert cp.positions == {STREAM: {"state_digest": "x"}}
        assert (await sink2.start()).seq == 1
        assert await sink2.sync_groups() == {}
        # the next segment: rename, delete a version, move the alias
        new = {"models": {name + "-renamed": model(
            {"3": state["models"][name]["versions"]["3"]},
            description="a model", tags={"team": "ml"}, aliases={"prod": 3})}}
        await sink2.apply(2, digest(2), 2000, body(diff(state, new)))
    finally:
        await sink2.close()
    view = registry_view(mlflow_standby.tracking_uri, prefix=name)
    assert view == {name + "-renamed": {
        "description": "a model", "tags": {"team": "ml"}, "aliases": {"prod": 3},
        "versions": {3: {"description": "third", "tags": {"k": "v"}, "stage": "Staging"}}}}
    assert c.get_model_version(name + "-renamed", "3").tags[SOURCE_TAG] == \
        f"{STREAM}/{name}-renamed/3"
    # both sink instances put their files in the one run of this log and sink
    exp = c.get_experiment_by_name(f"drstream.{log_id}.standby")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1
    assert c.get_model_version(name + "-renamed", "3").run_id == runs[0].info.run_id
    assert c.get_model_version(name + "-renamed", "3").source.startswith(
        f"mlflow-artifacts:/drstream/{log_id}/{runs[0].info.run_id}/artifacts/")


async def test_restart_mid_segment_and_leftovers_do_not_duplicate(
        mlflow_standby: MlflowServer, blobs: BlobStore, mlflow_model_name: str) -> None:
    name = mlflow_model_name
    log_id = f"sink-{uuid.uuid4().hex[:8]}"
    f = await put_file(blobs, "w.bin", os.urandom(5000), chunk=1024)
    state = {"models": {name: model({"2": version([f]), "4": version([f], stage="Production")},
                                    aliases={"a": 4}, tags={"x": "1"})}}
    events = diff(empty_state(), state)
    assert [e["type"] for e in events] == ["model.created", "version.created",
                                           "version.created", "alias.set"]
    sink = make_sink(mlflow_standby, blobs, log_id)
    try:
        await sink.start()
        # a crash after the first version: the model and version 2 exist, and a version
        # made on the way to number 4 was left behind (created, not yet deleted)
        await sink.apply(1, digest(1), 1000, body(events[:2]))
    finally:
        await sink.close()
    c = mlflow_standby.client()
    run_id = c.get_model_version(name, "2").run_id
    source = c.get_model_version(name, "2").source
    leftover = c.create_model_version(name, source, run_id=run_id,
                                      tags={SOURCE_TAG: f"{STREAM}/{name}/4"})
    assert leftover.version == "3"
    # the checkpoint says: segment 1 partly applied, 2 of its events done (events[:2] was
    # its own segment above; rewrite the checkpoint as the crashed apply would have left)
    leave_checkpoint(c, log_id, digest(1))
    sink = make_sink(mlflow_standby, blobs, log_id)
    try:
        assert (await sink.start()).seq == 0
        await sink.apply(1, digest(1), 1000, body(events))  # re-runs version 2's event
    finally:
        await sink.close()
    versions = sorted(int(v.version) for v in c.search_model_versions(f"name='{name}'"))
    assert versions == [2, 4]
    view = registry_view(mlflow_standby.tracking_uri, prefix=name)
    assert view[name]["aliases"] == {"a": 4}
    assert view[name]["versions"][4]["stage"] == "Production"

    # the same segment under another digest: the log was rewritten, apply refuses
    leave_checkpoint(c, log_id, digest(9))
    sink = make_sink(mlflow_standby, blobs, log_id)
    try:
        await sink.start()
        with pytest.raises(SinkError, match="segment 1 differs"):
            await sink.apply(1, digest(1), 1000, body(events))
    finally:
        await sink.close()


async def test_corrupt_artifact_is_refused_and_no_version_created(
        mlflow_standby: MlflowServer, blobs: BlobStore, mlflow_model_name: str) -> None:
    name = mlflow_model_name
    f = await put_file(blobs, "model.bin", os.urandom(3000), chunk=1000)
    f["sha256"] = hashlib.sha256(b"something else").hexdigest()
    events = diff(empty_state(), {"models": {name: model({"1": version([f])})}})
    other = [{"type": "model.created", "name": name + "-other", "description": "",
              "tags": {}}]
    sink = make_sink(mlflow_standby, blobs, f"sink-{uuid.uuid4().hex[:8]}")
    try:
        await sink.start()
        # events of another stream are not this sink's
        await sink.apply(1, digest(1), 1, body(other, stream="mlflow:elsewhere"))
        with pytest.raises(SinkError, match=r"model\.bin.*sha256"):
            await sink.apply(2, digest(2), 1, body(events))
    finally:
        await sink.close()
    c = mlflow_standby.client()
    assert c.search_model_versions(f"name='{name}'") == []
    assert registry_view(mlflow_standby.tracking_uri, prefix=name + "-other") == {}


async def test_foreign_model_on_the_standby_is_a_conflict(
        mlflow_standby: MlflowServer, blobs: BlobStore, mlflow_model_name: str) -> None:
    name = mlflow_model_name
    mlflow_standby.client().create_registered_model(name)  # made by hand on the standby
    sink = make_sink(mlflow_standby, blobs, f"sink-{uuid.uuid4().hex[:8]}")
    try:
        await sink.start()
        with pytest.raises(SinkError, match=f"model {name!r} already exists.*not replicated"):
            await sink.apply(1, digest(1), 1, body(diff(empty_state(),
                                                        {"models": {name: model({})}})))
        assert sink.checkpoint().seq == 0
    finally:
        await sink.close()


async def test_standby_restarting_mid_segment_is_waited_for(
        mlflow_server_factory: Any, blobs: BlobStore, tmp_path: Path) -> None:
    """A standby that goes away while a segment is applied: apply retries the change in
    flight and finishes once the registry is back (it does not die or skip)."""
    import asyncio

    standby: MlflowServer = mlflow_server_factory("standby-restart")
    name = f"restart-{uuid.uuid4().hex[:8]}"
    f = await put_file(blobs, "model.bin", os.urandom(200_000), chunk=50_000)
    state = {"models": {name: model({"1": version([f]), "2": version([f])},
                                    aliases={"prod": 2})}}
    events = diff(empty_state(), state)
    sink = make_sink(standby, blobs, f"sink-{uuid.uuid4().hex[:8]}")
    try:
        await sink.start()
        await sink.apply(1, digest(1), 1, body(events[:2]))
        standby.stop()
        task = asyncio.create_task(sink.apply(2, digest(2), 2, body(events[2:])))
        await asyncio.sleep(1.0)
        assert not task.done()
        await asyncio.to_thread(standby.start)
        await asyncio.wait_for(task, 60)
        assert sink.checkpoint().seq == 2
    finally:
        await sink.close()
    view = registry_view(standby.tracking_uri, prefix=name)
    assert sorted(view[name]["versions"]) == [1, 2]
    assert view[name]["aliases"] == {"prod": 2}


async def test_a_second_apply_fences_the_first(
        mlflow_standby: MlflowServer, blobs: BlobStore, mlflow_model_name: str) -> None:
    """Two applies of one log on one standby registry: the one that started last owns the
    checkpoint model; the older one stops at its next checkpoint, naming the new owner,
    without touching the newer one's position."""
    name = mlflow_model_name
    log_id = f"sink-{uuid.uuid4().hex[:8]}"
    old, new = make_sink(mlflow_standby, blobs, log_id), make_sink(mlflow_standby, blobs, log_id)
    try:
        await old.start()
        await old.apply(1, digest(1), 1, body(diff(empty_state(), {"models": {
            name: model({})}})))
        await new.start()
        assert new.checkpoint().seq == 1
        with pytest.raises(SinkFencedError, match=r"another apply \(.+\) took over"):
            await old.apply(2, digest(2), 2, body([{"type": "model.description",
                                                     "name": name, "description": "old"}]))
        assert mlflow_standby.client().get_registered_model(name).description == ""
        await new.apply(2, digest(2), 2, body([{"type": "model.description", "name": name,
                                                "description": "new"}]))
        assert mlflow_standby.client().get_registered_model(name).description == "new"
    finally:
        await old.close()  # its final checkpoint is refused too (logged, not raised)
        await new.close()
    reread = make_sink(mlflow_standby, blobs, log_id)
    try:
        assert (await reread.peek()).seq == 2
    finally:
        await reread.close()


async def test_recreated_and_renamed_models_keep_their_own_files(
        mlflow_standby: MlflowServer, blobs: BlobStore, mlflow_model_name: str,
        tmp_path: Path) -> None:
    """A model deleted and created again under its name (seen once before its new
    versions), then renamed while a new model takes its name: the standby numbers each
    new model's versions from 1, and every version serves its own files, though each new
    version 1 has a file of the same path and size as an older version 1."""
    name, renamed = mlflow_model_name, f"{mlflow_model_name}-v2"

    async def files(label: str, size: int = 65_537) -> list[dict[str, Any]]:
        return [await put_file(blobs, "MLmodel", f"label: {label}\n".encode()),
                await put_file(blobs, "data/w.bin", os.urandom(size), chunk=20_000)]

    first = {"models": {name: model({str(n): version(await files(f"a{n}")) for n in (1, 2, 3)},
                                    created_ms=100, aliases={"prod": 3})}}
    # seen once between the deletion and its new versions: numbering starts again at 1
    recreated = {"models": {name: model({}, created_ms=200, description="again")}}
    second = {"models": {name: model({str(n): version(await files(f"b{n}")) for n in (1, 2)},
                                     created_ms=200, description="again")}}
    third = {"models": {renamed: second["models"][name],
                        name: model({"1": version(await files("c1"))}, created_ms=300)}}
    sink = make_sink(mlflow_standby, blobs, f"sink-{uuid.uuid4().hex[:8]}")
    try:
        await sink.start()
        steps = ((empty_state(), first), (first, recreated), (recreated, second),
                 (second, third))
        for seq, (old, new) in enumerate(steps, start=1):
            await sink.apply(seq, digest(seq), seq, body(diff(old, new)))
            view = registry_view(mlflow_standby.tracking_uri, prefix=name)
            assert {n: sorted(m["versions"]) for n, m in view.items()} == \
                {n: sorted(map(int, m["versions"])) for n, m in new["models"].items()}
            for n, m in new["models"].items():
                for v, want in m["versions"].items():
                    got = file_digests(mlflow_standby.tracking_uri, n, int(v), tmp_path / "dl")
                    assert got == {a["path"]: (a["size"], a["sha256"])
                                   for a in want["artifacts"]}, f"{n} version {v} (step {seq})"
    finally:
        await sink.close()


async def test_an_existing_file_is_reused_only_when_its_checksum_matches(
        mlflow_standby: MlflowServer, blobs: BlobStore, mlflow_model_name: str,
        tmp_path: Path) -> None:
    """A file already in the version's place on the standby (a crash after its upload)
    with the right size but other bytes is uploaded again, not taken as done."""
    from drstream.connectors.mlflow.client import RegistryClient

    name = mlflow_model_name
    data = os.urandom(100_000)
    f = await put_file(blobs, "w.bin", data, chunk=30_000)
    events = diff(empty_state(), {"models": {name: model({"1": version([f])})}})
    sink = make_sink(mlflow_standby, blobs, f"sink-{uuid.uuid4().hex[:8]}")
    try:
        await sink.start()
        await sink.apply(1, digest(1), 1, body(events))
        async with RegistryClient(mlflow_standby.tracking_uri) as rc:
            root = await rc.artifact_root(name, 1)

            async def zeros() -> AsyncIterator[bytes]:
                yield bytes(len(data))

            await rc.upload(f"{root}/w.bin", zeros(), size=len(data))
        # the model is gone again (as if it had never been made) and the log is re-read
        mlflow_standby.client().delete_registered_model(name)
        await sink.apply(2, digest(2), 2, body(events))
    finally:
        await sink.close()
    got = file_digests(mlflow_standby.tracking_uri, name, 1, tmp_path / "dl")
    assert got == {"w.bin": (len(data), hashlib.sha256(data).hexdigest())}
