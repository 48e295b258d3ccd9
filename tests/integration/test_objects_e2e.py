"""Dataset replication end to end: a primary bucket prefix on the S3 API server ->
`drstream ship` -> log -> `drstream apply` -> a standby bucket prefix, all real processes
and a real S3 API server (moto); then `replay --until` and `drill` from the same log.

The scripted history (objectslib.History) creates, overwrites, deletes and re-creates
objects with user metadata and content types, a key with unicode and spaces, an empty
object and a large object written in parts. The standby must equal the primary object by
object (key, size, sha256, content type, user metadata).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.infra.s3 import S3Server
from tests.integration.applylib import ProcessPool, process_pool
from tests.integration.objectslib import (
    BIG_OBJECT_MB,
    UNICODE_KEY,
    History,
    MiB,
    view,
    wait_equal,
    write_objects_config,
)
from tests.support.buckets import S3Bucket
from tests.support.procs import drstream, show

pytestmark = pytest.mark.integration


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


@pytest.fixture
def buckets(s3: S3Server, s3_creds_env: None, s3_buckets: Callable[[], str],
            monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, str]:
    """Primary, standby and scratch buckets; AWS_* point s3:// URLs at the server."""
    for k, v in s3.store_env().items():
        monkeypatch.setenv(k, v)
    return s3_buckets(), s3_buckets(), s3_buckets()


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


@pytest.mark.parametrize("versioned", [False, True], ids=["unversioned", "versioned"])
def test_scripted_history_then_replay_until_and_drill(
        s3: S3Server, buckets: tuple[str, str, str], pool: ProcessPool, tmp_path: Path,
        versioned: bool) -> None:
    primary, standby, scratch = buckets
    if versioned:
        s3.client.put_bucket_versioning(Bucket=primary,
                                        VersioningConfiguration={"Status": "Enabled"})
    setup = write_objects_config(tmp_path, s3, source_bucket=primary, standby_bucket=standby)
    ship, apply = pool.ship(setup), pool.apply(setup)
    ship.wait_ready(60)
    apply.wait_ready(60)
    history = History(S3Bucket(s3.client, primary), "data", BIG_OBJECT_MB * MiB)
    middle = 6  # after "delete b": a, the unicode key and c exist
    mid_view, mid_ms, mid_seq = None, 0, 0
    started = time.monotonic()
    for i, (_label, step) in enumerate(history.steps):
        step()
        if i + 1 == middle:
            # the ship saw every change so far (the standby shows it), then time passes
            mid_view = wait_equal(s3, (primary, "data"), (standby, "replica"), [ship, apply])
            mid_seq = _head_seq(setup.path)
            time.sleep(1.2)  # S3 times are kept to the millisecond, listings to the second
            mid_ms = int(time.time() * 1000)
            time.sleep(1.2)
        time.sleep(0.2)
    final = wait_equal(s3, (primary, "data"), (standby, "replica"), [ship, apply], timeout=180)
    print(f"{len(history.steps)} steps equal on the standby "
          f"{time.monotonic() - started:.1f}s after the first")
    assert set(final) == {"a.txt", "dir/b.bin", UNICODE_KEY, "big/model.bin", "empty"}
    assert final["a.txt"]["metadata"] == {"owner": "team-y", "rev": "2"}
    assert final["dir/b.bin"]["metadata"] == {"again": "yes"}
    assert final[UNICODE_KEY]["content_type"] == "text/plain; charset=utf-8"
    assert final["big/model.bin"]["size"] == BIG_OBJECT_MB * MiB
    # no multipart upload is left behind on the standby
    assert not s3.client.list_multipart_uploads(Bucket=standby).get("Uploads")
    ship.stop_ok()
    apply.stop_ok()

    # replay into another bucket: the prefix exactly as it was at the middle of the history
    assert mid_view is not None and set(mid_view) == {"a.txt", UNICODE_KEY, "c.csv"}
    res = drstream("replay", "--config", str(setup.path), "--stream", "s3:datasets",
                   "--target-s3", f"s3://{scratch}/restored", "--until", _iso(mid_ms))
    assert res.returncode == 0, show(res)
    assert view(s3, scratch, "restored") == mid_view
    # and through the segment that was the log's head then
    res = drstream("replay", "--config", str(setup.path), "--stream", "s3:datasets",
                   "--target-s3", f"s3://{scratch}/by-seq", "--until-seq", str(mid_seq))
    assert res.returncode == 0, show(res)
    assert view(s3, scratch, "by-seq") == mid_view

    # a drill over the whole log compares a scratch restore object by object
    res = drstream("drill", "--config", str(setup.path), "--stream", "s3:datasets",
                   "--target-s3", f"s3://{scratch}/drill", "--json")
    report = json.loads(res.stdout)
    assert res.returncode == 0 and report["ok"], show(res)
    assert report["objects"] == len(final) and report["mismatches"] == []
    assert view(s3, scratch, "drill") == {}  # cleaned without --keep

    # verify --deep decrypts every blob the segments name, object chunks and state chunks
    res = drstream("verify", "--config", str(setup.path), "--deep", "--json")
    assert res.returncode == 0, show(res)
    checked = json.loads(res.stdout)
    blobs = sorted((tmp_path / "store" / "blobs" / setup.log_id).rglob("*"))
    blobs = [b for b in blobs if b.is_file()]
    assert sum(r["blobs"] for r in _reports(checked)) == len(blobs)
    # one flipped byte in the large object's first chunk: verify --deep names the blob
    big = blobs[0]
    raw = bytearray(big.read_bytes())
    raw[len(raw) // 2] ^= 1
    big.write_bytes(bytes(raw))
    res = drstream("verify", "--config", str(setup.path), "--deep")
    assert res.returncode != 0 and big.name in res.stdout + res.stderr, show(res)


def _head_seq(config: Path) -> int:
    res = drstream("status", "--config", str(config), "--json")
    seq: int = json.loads(res.stdout)["durable_head_seq"]
    return seq


def _reports(doc: object) -> list[dict[str, object]]:
    return doc if isinstance(doc, list) else [doc]  # type: ignore[list-item, return-value]


def test_status_shows_the_pending_objects_and_the_rpo(
        s3: S3Server, buckets: tuple[str, str, str], pool: ProcessPool,
        tmp_path: Path) -> None:
    primary, standby, _ = buckets
    setup = write_objects_config(tmp_path, s3, source_bucket=primary, standby_bucket=standby)
    s3.client.put_object(Bucket=primary, Key="data/shipped", Body=b"1")
    ship, apply = pool.ship(setup), pool.apply(setup)
    ship.wait_ready(60)
    apply.wait_ready(60)
    wait_equal(s3, (primary, "data"), (standby, "replica"), [ship, apply])
    ship.stop_ok()
    apply.stop_ok()

    def status() -> dict[str, Any]:
        res = drstream("status", "--config", str(setup.path), "--json")
        doc: dict[str, Any] = json.loads(res.stdout)["streams"]["s3:datasets"]
        return doc

    caught_up = status()
    assert (caught_up["pending_records"], caught_up["rpo_s"]) == (0, 0.0), caught_up
    s3.client.put_object(Bucket=primary, Key="data/new one", Body=b"2")
    s3.client.delete_object(Bucket=primary, Key="data/shipped")
    time.sleep(1.5)
    behind = status()
    assert behind["pending_records"] == 2, behind
    assert behind["rpo_s"] >= 1.0, behind
