"""kill -9 of `drstream ship` and `drstream apply` while large objects are captured and
uploaded in parts: the standby ends equal to the primary object by object, never shows a
partial object under a final key (watched the whole time), keeps no multipart upload, and
the log's store holds each chunk once, every one of them named by a segment."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from drstream.daemon.objsource import DEFAULT_CHUNK_BYTES
from tests.infra.s3 import S3Server
from tests.integration.applylib import (
    DrProcess,
    DrSetup,
    ProcessPool,
    process_pool,
    seeded_rng,
)
from tests.integration.objectslib import MiB, put_big, view, wait_equal, write_objects_config
from tests.support.procs import drstream, show

pytestmark = pytest.mark.integration

KILLS = 3  # per process, at least
BIG = 12 * MiB  # three 5 MiB chunks, three parts on the standby


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


def test_kill_ship_and_apply_during_large_uploads(
        s3: S3Server, s3_creds_env: None, s3_buckets: Callable[[], str], pool: ProcessPool,
        tmp_path: Path) -> None:
    rng = seeded_rng()
    primary, standby = s3_buckets(), s3_buckets()
    setup = write_objects_config(tmp_path, s3, source_bucket=primary, standby_bucket=standby,
                                 source={"capture_budget_bytes": MiB})
    written: dict[str, set[str]] = {}  # key -> sha256 of every content it ever had

    def history() -> None:
        for i in range(6):
            key = f"big/{i % 4}.bin"  # 4 and 5 overwrite 0 and 1
            sha = put_big(s3, primary, f"data/{key}", BIG + i * 1000, seed=i)
            written.setdefault(key, set()).add(sha)
            for j in range(3):
                data = f"small {i} {j}".encode()
                s3.client.put_object(Bucket=primary, Key=f"data/small/{i}-{j}", Body=data)
                written.setdefault(f"small/{i}-{j}", set()).add(hashlib.sha256(data).hexdigest())
            time.sleep(0.5)

    partial: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        """Every object the standby shows is one the primary had, whole."""
        while not stop.is_set():
            for key, obj in view(s3, standby, "replica").items():
                if obj["sha256"] not in written.get(key, set()):
                    partial.append(f"{key}: {obj['size']} bytes, sha256 {obj['sha256']}")
            time.sleep(0.2)

    procs: dict[str, DrProcess] = {"ship": pool.ship(setup, "ship-1"),
                                   "apply": pool.apply(setup, "apply-1")}
    procs["ship"].wait_ready(60)
    procs["apply"].wait_ready(60)
    writer = threading.Thread(target=history, daemon=True)
    watcher = threading.Thread(target=watch, daemon=True)
    writer.start()
    watcher.start()
    kills = {"ship": 0, "apply": 0}
    in_upload = 0
    while writer.is_alive() or min(kills.values()) < KILLS:
        time.sleep(rng.uniform(0.2, 1.2))
        which = rng.choice(sorted(kills)) if writer.is_alive() \
            else min(sorted(kills), key=lambda k: kills[k])
        if which == "apply" and _uploading(procs["apply"], timeout=2):
            in_upload += 1
        _kill_and_restart(procs, which, kills, pool, setup)
    writer.join(120)
    final = wait_equal(s3, (primary, "data"), (standby, "replica"), procs.values(),
                       timeout=180)
    stop.set()
    watcher.join(10)
    print(f"kills {kills}, {in_upload} of apply's in a multipart upload")
    assert min(kills.values()) >= KILLS
    assert not partial, f"partial objects on the standby: {partial[:5]}"
    assert len(final) == 4 + 18
    assert not s3.client.list_multipart_uploads(Bucket=standby).get("Uploads")
    for p in procs.values():
        p.stop_ok()
    _each_chunk_once(setup, tmp_path, kills["ship"])


def _uploading(apply: DrProcess, timeout: float) -> bool:
    """Wait until apply is inside a multipart upload (started, not completed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and apply.alive():
        out = apply.output()
        if out.count('"object_upload_started"') > out.count('"object_uploaded"'):
            return True
        time.sleep(0.02)
    return False


def _kill_and_restart(procs: dict[str, DrProcess], which: str, kills: dict[str, int],
                      pool: ProcessPool, setup: DrSetup) -> None:
    proc = procs[which]
    if not proc.alive():
        raise AssertionError(f"{which} exited on its own\n{proc.describe()}")
    proc.kill()
    kills[which] += 1
    procs[which] = pool.start(which, setup, f"{which}-{kills[which] + 1}")
    procs[which].wait_ready(60)


def _each_chunk_once(setup: DrSetup, tmp_path: Path, ship_kills: int) -> None:
    """Content addressing: a chunk is stored under its sha256 once; and every stored blob
    is named by a segment, but for the chunks of the object each killed ship was
    capturing (uploaded before a segment named them; if that content was overwritten
    before the restart it is never shipped again; prune's blob sweep removes such
    leftovers after --blob-grace)."""
    res = drstream("verify", "--config", str(setup.path), "--deep", "--json")
    assert res.returncode == 0, show(res)
    doc = json.loads(res.stdout)
    reports = doc if isinstance(doc, list) else [doc]
    named = sum(int(r["blobs"]) for r in reports)
    stored = [p for p in (tmp_path / "store" / "blobs" / setup.log_id).rglob("*") if p.is_file()]
    in_flight = ship_kills * -(-(BIG + 5000) // DEFAULT_CHUNK_BYTES)  # chunks of one object
    assert named <= len(stored) <= named + in_flight, \
        f"{len(stored)} blobs stored, {named} named by segments, {ship_kills} ship kills"
