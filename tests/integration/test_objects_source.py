"""The object source against the S3 API server, in process: listings over many pages
(versions of one key spanning pages), scans handed over in steps, a restart from a
mid-scan position, and a later scan that ships exactly what changed.

Pages and steps are made small (LIST_PAGE, MAX_STEP_EVENTS) so a few hundred objects
cross many page and step boundaries; the logic is the one a bucket of millions runs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from drstream.connectors.s3 import objsource
from drstream.connectors.s3.objconfig import ObjectSinkConfig, ObjectSourceConfig
from drstream.connectors.s3.objreplay import fold
from drstream.connectors.s3.objsink import ObjectSink
from drstream.connectors.s3.objsource import ObjectSource
from drstream.daemon import objsource as shared_source
from drstream.daemon.codec import make_manifest
from drstream.daemon.errors import SinkError
from drstream.daemon.plugins import Context
from drstream.daemon.records import Body, EventBatch
from tests.contract.conftest import log_context
from tests.infra.s3 import S3Server

pytestmark = pytest.mark.integration

KEYS = 260


def _history(s3: S3Server, bucket: str) -> dict[str, bytes]:
    """Objects under data/: some with several versions, some deleted; what is live."""
    live: dict[str, bytes] = {}
    c = s3.client
    for i in range(KEYS):
        key = f"k{i:04d}" if i % 37 else f"ü dir/k {i:04d}"
        for v in range(3 if i % 11 == 0 else 1):
            body = f"{key} v{v}".encode()
            c.put_object(Bucket=bucket, Key=f"data/{key}", Body=body, Metadata={"v": str(v)})
            live[key] = body
        if i % 13 == 0:
            c.delete_object(Bucket=bucket, Key=f"data/{key}")
            live.pop(key)
    return live


async def _scan(src: ObjectSource) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
    """Read deliveries until a scan completes (positions with "state")."""
    steps = []
    for _ in range(10_000):
        d = await src.read(0.05)
        if d is None:
            continue
        events = [e for b in d.events for e in b.events]
        steps.append((events, d.positions))
        if "state" in d.positions:
            return steps
    raise AssertionError("the scan did not complete")


def _expected(live: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in live.items()}


def _strip(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != "seen_ms"} for e in events]


@pytest.mark.parametrize("versioned", [False, True], ids=["unversioned", "versioned"])
async def test_steps_resume_and_later_scans(
        s3: S3Server, s3_creds_env: None, s3_buckets: Callable[[], str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, versioned: bool) -> None:
    monkeypatch.setattr(objsource, "LIST_PAGE", 7)
    monkeypatch.setattr(shared_source, "MAX_STEP_EVENTS", 40)
    bucket = s3_buckets()
    if versioned:
        s3.client.put_bucket_versioning(Bucket=bucket,
                                        VersioningConfiguration={"Status": "Enabled"})
    live = _history(s3, bucket)
    config = ObjectSourceConfig.model_validate({**s3.store_fields(bucket, "data"),
                                                "interval_s": 0.05})
    async with log_context(tmp_path, "objects-source") as ctx:
        async with ObjectSource(config, ctx) as src:
            await src.start(None)
            steps = await _scan(src)
        assert len(steps) > 3, "the scan was handed over in steps"
        state: dict[str, dict[str, Any]] = {}
        for events, _ in steps:
            for ev in events:
                fold(state, ev)
        assert {k: v["sha256"] for k, v in state.items()} == _expected(live)
        if versioned:  # every version and delete marker was shipped, oldest first
            puts = [e for s, _ in steps for e in s if e["type"] == "object.put"]
            assert len(puts) == KEYS + 2 * len(range(0, KEYS, 11))
            assert all(e["version_id"] for s, _ in steps for e in s)

        # a restart from the position of the second step ships what followed it again
        resumed = await _resume(config, ctx, steps[1][1])
        assert _strip([e for s, _ in resumed for e in s]) == \
            _strip([e for s, _ in steps[2:] for e in s])
        assert resumed[-1][1] == steps[-1][1]  # the same state chunks

        # the next scan ships exactly what changed since; content already shipped under
        # another key (a re-upload, a DVC cache file) is not stored again
        assert ctx.blobs is not None
        s3.client.put_object(Bucket=bucket, Key="data/k0001", Body=b"new")
        s3.client.delete_object(Bucket=bucket, Key="data/k0002")
        s3.client.put_object(Bucket=bucket, Key="data/zz copy", Body=live["k0003"])
        uploaded = ctx.blobs.uploaded
        later = await _resume(config, ctx, steps[-1][1])
        events = [e for s, _ in later for e in s]
        assert [(e["type"], e["key"]) for e in events] == [
            ("object.put", "k0001"), ("object.deleted", "k0002"), ("object.put", "zz copy")]
        first = next(e for s, _ in steps for e in s if e["key"] == "k0003")
        assert events[2]["chunks"] == first["chunks"]
        # uploaded: the new content of k0001 and the state chunks that changed, nothing else
        new_chunks = set(later[-1][1]["state"]) - set(steps[-1][1]["state"])
        assert ctx.blobs.uploaded - uploaded == 1 + len(new_chunks)


async def _resume(config: ObjectSourceConfig, ctx: Context, positions: dict[str, Any]
                  ) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
    async with ObjectSource(config, ctx) as src:
        await src.start(positions)
        return await _scan(src)


async def test_a_new_standby_is_not_built_from_a_pruned_log(
        s3: S3Server, s3_creds_env: None, s3_buckets: Callable[[], str],
        tmp_path: Path) -> None:
    """The objects shipped before a pruned log's first segment are gone: a fresh sink
    refuses to start there instead of building a standby that silently lacks them."""
    config = ObjectSinkConfig.model_validate({**s3.store_fields(s3_buckets(), "replica"),
                                              "source": "s3:datasets"})
    batch = EventBatch("s3:datasets", [{"type": "object.deleted", "key": "k",
                                        "version_id": None, "last_modified_ms": None,
                                        "seen_ms": 1}])
    body = Body(make_manifest({"s3:datasets": {"state": []}}, [batch]), [batch])
    async with log_context(tmp_path, "objects-pruned") as ctx, ObjectSink(config, ctx) as sink:
        assert (await sink.start()).seq == 0
        with pytest.raises(SinkError, match=r"starts at segment 5 \(pruned\)"):
            await sink.apply(5, bytes(32), 1, body)
        await sink.apply(1, bytes(32), 1, body)  # from the start it applies
        assert sink.checkpoint().seq == 1
