"""connectors.mlflow.client against a real MLflow server: every registry call the source
and the sink use, artifact listing/streaming both ways, webhooks, snapshots, errors."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drstream.connectors.mlflow.client import MlflowApiError, RegistryClient
from tests.infra.mlflow import MlflowServer
from tests.integration.mlflowlib import log_version

pytestmark = pytest.mark.integration


async def test_registry_calls_round_trip(mlflow_primary: MlflowServer,
                                         mlflow_model_name: str) -> None:
    name = mlflow_model_name
    async with RegistryClient(mlflow_primary.tracking_uri, name="primary") as c:
        assert await c.get_model(name) is None
        await c.create_model(name, "first", {"team": "a"})
        exp = await c.experiment_id("drstream-client-test")
        assert await c.experiment_id("drstream-client-test") == exp
        run = await c.create_run(exp, "home")
        base = run["artifact_uri"]
        v1 = await c.create_version(name, f"{base}/v1", run["run_id"], "v one", {"k": "v"})
        v2 = await c.create_version(name, f"runs:/{run['run_id']}/v2", run["run_id"])
        await c.end_run(run["run_id"])
        assert c.artifact_path_of(base) is not None
        assert (v1["version"], v2["version"]) == ("1", "2")
        await c.update_model_description(name, "second")
        await c.set_model_tag(name, "env", "prod")
        await c.delete_model_tag(name, "team")
        await c.update_version_description(name, 2, "v two")
        await c.transition_stage(name, 2, "Staging")
        await c.set_version_tag(name, 2, "x", "1")
        await c.delete_version_tag(name, 1, "k")
        await c.set_alias(name, "champion", 2)
        await c.set_alias(name, "old", 1)
        await c.delete_alias(name, "old")
        await c.delete_version(name, 1)
        assert await c.get_version(name, 1) is None
        renamed = f"{name}-r"
        await c.rename_model(name, renamed)
        assert await c.get_model(name) is None
        snap = await c.snapshot(selection=None)
        m = snap.state["models"][renamed]
        assert m["description"] == "second" and m["tags"] == {"env": "prod"}
        assert m["aliases"] == {"champion": 2}
        assert list(m["versions"]) == ["2"]
        assert m["versions"]["2"]["tags"] == {"x": "1"}
        assert m["versions"]["2"]["stage"] == "Staging"
        assert m["versions"]["2"]["description"] == "v two"
        assert (renamed, 2) in snap.missing
        with pytest.raises(MlflowApiError) as err:
            await c.create_model(renamed)
        assert err.value.already_exists and not err.value.retriable
        assert renamed in str(err.value)
        await c.delete_model(renamed)
        assert await c.get_model(renamed) is None


# Names MLflow accepts that a registry filter has to quote with care (MLflow 3 takes
# 'a\'b' literally and matches nothing; "a'b" works; a name with both quotes, or a
# backslash before a quote, has no exact quoted form at all), and decoys that a LIKE
# pattern or a case-blind comparison would confuse with them.
TRICKY_NAMES = ["it's", 'say "hi"', "both ' and \"", "back\\slash", "tr\\'icky", "sp ace",
                "ünï-cödé ✓", "pct%_x", "pctA_x", "pct%Bx", "UPPER", "upper", "a''b", "a'b"]


async def test_version_search_by_name_is_exact_for_any_name(
        mlflow_primary: MlflowServer, mlflow_model_name: str) -> None:
    """The sink and the clean-up of crashed placeholders look a model's versions up by
    name: against the real server, every name finds exactly its own versions."""
    names = [f"{mlflow_model_name} {n}" for n in TRICKY_NAMES]
    async with RegistryClient(mlflow_primary.tracking_uri) as c:
        for i, name in enumerate(names):
            await c.create_model(name)
            for _ in range(i % 3 + 1):
                await c.create_version(name, f"s3://bucket/{i}")
        for i, name in enumerate(names):
            found = await c.search_versions(name)
            assert sorted((v["name"], v["version"]) for v in found) == \
                [(name, str(n)) for n in range(1, i % 3 + 2)], name
        # the lookups the sink makes after a rename, under the new name
        await c.rename_model(names[0], names[0] + " renamed")
        assert [v["version"] for v in await c.search_versions(names[0] + " renamed")] == ["1"]
        assert await c.search_versions(names[0]) == []


async def test_artifacts_stream_both_ways(mlflow_primary: MlflowServer,
                                          mlflow_model_name: str) -> None:
    files = {"MLmodel": b"flavor: test\n", "data/weights.bin": os.urandom(300_000),
             "data/empty": b""}
    v_runs, _ = log_version(mlflow_primary, mlflow_model_name, files, "runs")
    v_direct, _ = log_version(mlflow_primary, mlflow_model_name, files, "artifacts")
    async with RegistryClient(mlflow_primary.tracking_uri) as c:
        for v in (v_runs, v_direct):
            root = await c.artifact_root(mlflow_model_name, v)
            listed = await c.list_artifacts(root)
            assert [(f.path, f.size) for f in listed] == sorted(
                (p, len(d)) for p, d in files.items())
            for f in listed:
                chunks = [ch async for ch in c.download(f"{root}/{f.path}", 65536)]
                assert all(len(ch) == 65536 for ch in chunks[:-1])
                assert b"".join(chunks) == files[f.path]
        data = os.urandom(1_000_000)

        async def gen() -> AsyncIterator[bytes]:
            for i in range(0, len(data), 100_000):
                yield data[i:i + 100_000]

        dest = f"drstream-test/{mlflow_model_name}"
        await c.upload(f"{dest}/a b/x.bin", gen(), size=len(data))
        await c.upload(f"{dest}/y.bin", gen())
        listed = await c.list_artifacts(dest)
        assert [(f.path, f.size) for f in listed] == [("a b/x.bin", len(data)),
                                                       ("y.bin", len(data))]
        for f in listed:
            h = hashlib.sha256()
            async for ch in c.download(f"{dest}/{f.path}"):
                h.update(ch)
            assert h.hexdigest() == hashlib.sha256(data).hexdigest()


async def test_logged_model_source(mlflow_primary: MlflowServer,
                                   mlflow_model_name: str) -> None:
    """MLflow 3 versions of logged models have source models:/m-...; files are found."""
    c = mlflow_primary.client()
    exp_id = c.create_experiment(f"lm-{mlflow_model_name}")
    lm = c.create_logged_model(exp_id, name="lm")
    with tempfile.TemporaryDirectory() as d:
        Path(d, "model.pkl").write_bytes(b"pickle")
        c.log_model_artifacts(lm.model_id, d)
    c.create_registered_model(mlflow_model_name)
    mv = c.create_model_version(mlflow_model_name, f"models:/{lm.model_id}",
                                model_id=lm.model_id)
    assert mv.source.startswith("models:/")
    async with RegistryClient(mlflow_primary.tracking_uri) as rc:
        root = await rc.artifact_root(mlflow_model_name, int(mv.version))
        files = await rc.list_artifacts(root)
        assert [(f.path, f.size) for f in files] == [("model.pkl", 6)]


async def test_webhook_registration_is_idempotent(mlflow_primary: MlflowServer) -> None:
    name = f"drstream-test-{os.urandom(4).hex()}"
    async with RegistryClient(mlflow_primary.tracking_uri) as c:
        first = await c.ensure_webhook(name, "http://127.0.0.1:9/a", "s1")
        second = await c.ensure_webhook(name, "http://127.0.0.1:9/b", "s2")
        assert first == second
        hooks = [h for h in await c.list_webhooks() if h["name"] == name]
        assert len(hooks) == 1 and hooks[0]["url"] == "http://127.0.0.1:9/b"
        assert await c.delete_webhook(name)
        assert not await c.delete_webhook(name)


async def test_errors_name_the_object_and_classify() -> None:
    async with RegistryClient("http://127.0.0.1:9", name="gone") as c:
        with pytest.raises(MlflowApiError) as err:
            await c.get_version("my-model", 3)
        assert err.value.retriable
        assert "my-model" in str(err.value) and "gone" in str(err.value)
        assert not await c.health()


