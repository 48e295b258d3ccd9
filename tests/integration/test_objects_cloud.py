"""Dataset replication from a GCS bucket prefix (fake-gcs-server) and from an Azure Blob
container prefix (Azurite) into a standby bucket prefix on the S3 API server: real
`drstream ship` and `drstream apply` processes, the scripted history of
objectslib.History written with each service's own client, the standby equal to the
primary object by object (key, size, sha256, content type, user metadata); then
`replay --until` a time in the middle of the history into another S3 bucket; and kill -9
of ship while a GCS source captures large objects. In process: a GCS listing in small
pages handed over in steps, and the guard on listing order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from drstream.connectors.azure.objsource import AzureObjectSource, AzureObjectSourceConfig
from drstream.connectors.gcs import objsource as gcs_objsource
from drstream.connectors.gcs.objsource import GcsObjectSource, GcsObjectSourceConfig
from drstream.daemon import objsource as shared_source
from drstream.daemon.errors import SourceError
from drstream.daemon.objsource import ObjectSource
from tests.contract.conftest import log_context
from tests.infra.emulators import AzuriteServer, FakeGcsServer, unique_name
from tests.infra.s3 import S3Server
from tests.integration import objectslib as lib
from tests.integration.applylib import ProcessPool, process_pool, seeded_rng
from tests.support.buckets import AzureBucket, Bucket, GcsBucket, MiB
from tests.support.procs import drstream, show

pytestmark = pytest.mark.integration

BIG = 12 * MiB  # three 5 MiB chunks, in 4 MiB parts or blocks


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


@pytest.fixture(params=["gcs", "gcs-versioned", "azure"])
def primary(request: pytest.FixtureRequest) -> Iterator[tuple[Bucket, dict[str, Any]]]:
    """The primary bucket (its client) and the source section's store fields."""
    if request.param == "gcs":
        gcs: FakeGcsServer = request.getfixturevalue("gcs")
        bucket = request.getfixturevalue("gcs_bucket")
        yield GcsBucket(gcs.port, bucket), gcs.store_fields(bucket)
        return
    if request.param == "gcs-versioned":  # every generation listed, deletes timed
        gcs = request.getfixturevalue("gcs")
        bucket = gcs.create_bucket(unique_name(), versioning=True)
        yield GcsBucket(gcs.port, bucket), gcs.store_fields(bucket)
        gcs.delete_bucket(bucket)
        return
    azurite: AzuriteServer = request.getfixturevalue("azurite")
    request.getfixturevalue("azure_creds_env")
    container = request.getfixturevalue("azure_container")
    yield AzureBucket(azurite._client(), container), azurite.store_fields(container)


@pytest.fixture
def s3_env(s3: S3Server, s3_creds_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_* point s3:// URLs (replay's --target-s3) at the server."""
    for k, v in s3.store_env().items():
        monkeypatch.setenv(k, v)


def _source(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k != "prefix"}


def test_scripted_history_then_replay_until(
        primary: tuple[Bucket, dict[str, Any]], s3: S3Server, s3_env: None,
        s3_buckets: Callable[[], str], pool: ProcessPool, tmp_path: Path) -> None:
    bucket, fields = primary
    standby, scratch = s3_buckets(), s3_buckets()
    setup = lib.write_objects_config(tmp_path, s3, source_bucket="", standby_bucket=standby,
                                 source_store=_source(fields))
    ship, apply = pool.ship(setup), pool.apply(setup)
    ship.wait_ready(60)
    apply.wait_ready(60)
    history = lib.History(bucket, "data", BIG)
    middle = 6  # after "delete b": a, the unicode key and c exist
    mid_view, mid_ms = None, 0
    for i, (_label, step) in enumerate(history.steps):
        step()
        if i + 1 == middle:
            mid_view = lib.wait_equal(s3, ("", "data"), (standby, "replica"), [ship, apply],
                                  source=bucket)
            time.sleep(1.2)  # listing times are to the millisecond at best
            mid_ms = int(time.time() * 1000)
            time.sleep(1.2)
        time.sleep(0.2)
    final = lib.wait_equal(s3, ("", "data"), (standby, "replica"), [ship, apply], timeout=120,
                       source=bucket)
    assert set(final) == {"a.txt", "dir/b.bin", lib.UNICODE_KEY, "big/model.bin", "empty"}
    assert final["a.txt"]["metadata"] == {"owner": "team-y", "rev": "2"}
    assert final["dir/b.bin"]["metadata"] == {"again": "yes"}
    assert final[lib.UNICODE_KEY]["content_type"] == "text/plain; charset=utf-8"
    assert final["big/model.bin"]["size"] == BIG
    assert not s3.client.list_multipart_uploads(Bucket=standby).get("Uploads")
    ship.stop_ok()
    apply.stop_ok()

    assert mid_view is not None and set(mid_view) == {"a.txt", lib.UNICODE_KEY, "c.csv"}
    until = datetime.fromtimestamp(mid_ms / 1000, UTC).isoformat()
    stream = f"{fields['type']}:datasets"
    res = drstream("replay", "--config", str(setup.path), "--stream", stream,
                   "--target-s3", f"s3://{scratch}/restored", "--until", until)
    assert res.returncode == 0, show(res)
    assert lib.view(s3, scratch, "restored") == mid_view


def test_kill_ship_during_gcs_capture(
        gcs: FakeGcsServer, gcs_bucket: str, s3: S3Server, s3_creds_env: None,
        s3_buckets: Callable[[], str], pool: ProcessPool, tmp_path: Path) -> None:
    rng = seeded_rng()
    bucket = GcsBucket(gcs.port, gcs_bucket)
    standby = s3_buckets()
    setup = lib.write_objects_config(tmp_path, s3, source_bucket="", standby_bucket=standby,
                                 source_store=_source(gcs.store_fields(gcs_bucket)),
                                 source={"capture_budget_bytes": MiB})

    def history() -> None:
        for i in range(5):
            bucket.put_big(f"data/big/{i % 3}.bin", BIG + i * 1000, seed=i,
                           metadata={"i": str(i)}, part=4 * MiB)  # 3 and 4 overwrite
            for j in range(3):
                bucket.put(f"data/small/{i}-{j}", f"small {i} {j}".encode(), {})
            time.sleep(0.3)

    ship, apply = pool.ship(setup, "ship-1"), pool.apply(setup, "apply-1")
    ship.wait_ready(60)
    apply.wait_ready(60)
    writer = threading.Thread(target=history, daemon=True)
    writer.start()
    kills = mid_capture = 0
    while writer.is_alive() or kills < 2:  # the history keeps the source capturing
        mid_capture += _capturing(tmp_path / "store", setup.log_id, timeout=rng.uniform(1, 3))
        assert ship.alive(), ship.describe()
        ship.kill()
        kills += 1
        ship = pool.ship(setup, f"ship-{kills + 1}")
        ship.wait_ready(60)
    writer.join(60)
    final = lib.wait_equal(s3, ("", "data"), (standby, "replica"), [ship, apply],
                           timeout=120, source=bucket)
    print(f"ship killed {kills} times, {mid_capture} of them mid-capture")
    assert mid_capture >= 1
    assert len(final) == 3 + 15
    assert not s3.client.list_multipart_uploads(Bucket=standby).get("Uploads")
    ship.stop_ok()
    apply.stop_ok()



def _capturing(store: Path, log_id: str, timeout: float) -> bool:
    """Wait until ship has stored a blob since the last segment (it is reading an object
    into chunks, not yet named by a segment)."""
    def count(kind: str) -> int:
        return sum(1 for p in (store / kind / log_id).rglob("*") if p.is_file())

    deadline = time.monotonic() + timeout
    segments, blobs = count("logs"), count("blobs")
    while time.monotonic() < deadline:
        time.sleep(0.01)
        if count("logs") != segments:
            segments, blobs = count("logs"), count("blobs")
        elif count("blobs") > blobs:
            return True
    return False


async def _scan(src: ObjectSource) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
    """Read deliveries until a scan completes (positions with "state")."""
    steps = []
    for _ in range(10_000):
        d = await src.read(0.05)
        if d is not None:
            steps.append(([e for b in d.events for e in b.events], d.positions))
            if "state" in d.positions:
                return steps
    raise AssertionError("the scan did not complete")


async def test_gcs_listing_in_pages_and_steps_then_a_later_scan(
        gcs: FakeGcsServer, gcs_bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcs_objsource, "PAGE", 3)
    monkeypatch.setattr(shared_source, "MAX_STEP_EVENTS", 4)
    bucket = GcsBucket(gcs.port, gcs_bucket)
    keys = [f"k{i:02d}" for i in range(17)] + [lib.UNICODE_KEY]
    for k in keys:
        bucket.put(f"data/{k}", k.encode(), {"k": "v"})
    config = GcsObjectSourceConfig.model_validate({**gcs.store_fields(gcs_bucket, "data"),
                                                   "interval_s": 0.05})
    async with log_context(tmp_path, "objects-gcs") as ctx, \
            GcsObjectSource(config, ctx) as src:
        await src.start(None)
        steps = await _scan(src)
        assert len(steps) >= 4, "the scan was handed over in steps"
        shipped = [e["key"] for events, _ in steps for e in events]
        assert sorted(shipped) == sorted(keys)  # each once
        bucket.put("data/k03", b"changed", {})
        bucket.delete("data/k11")
        later = [(e["type"], e["key"]) for events, _ in await _scan(src) for e in events]
        assert sorted(later) == [("object.deleted", "k11"), ("object.put", "k03")]


async def test_azure_listing_out_of_utf8_order_stops_the_source(
        azurite: AzuriteServer, azure_container: str, azure_creds_env: None,
        tmp_path: Path) -> None:
    """Azurite lists in UTF-16 order: a key above U+FFFF sorts before one in U+E000-U+FFFF
    there, after it in UTF-8. The merge with the state needs UTF-8 order: the source
    refuses, naming the key, instead of reading the prefix wrongly."""
    bucket = AzureBucket(azurite._client(), azure_container)
    for k in ("data/\ufb01", "data/\U0001f600"):
        bucket.put(k, b"x", {})
    config = AzureObjectSourceConfig.model_validate(
        {**azurite.store_fields(azure_container, "data"), "interval_s": 0.05})
    async with log_context(tmp_path, "objects-azure") as ctx, \
            AzureObjectSource(config, ctx) as src:
        await src.start(None)
        with pytest.raises(SourceError, match="UTF-8 byte order") as info:
            await _scan(src)
        assert not info.value.retriable
