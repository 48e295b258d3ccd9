"""Helpers of the object-stream tests: a config for one flow primary bucket prefix ->
log -> standby bucket prefix, a scripted history of object changes, and object-by-object
views of a prefix read straight from the S3 server (boto3, not drstream's code)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from drstream.daemon.keyring import generate_key_file
from tests.infra.s3 import S3Server
from tests.integration.applylib import DrSetup, unique
from tests.support.procs import DrstreamProcess

MiB = 1 << 20
KEY_ID = "k1"
# The large object of the scripted history: DRSTREAM_BIG_OBJECT_MB=500 for the issue's
# measurement; the suite's copy is small enough to stay fast.
BIG_OBJECT_MB = int(os.environ.get("DRSTREAM_BIG_OBJECT_MB", "24"))

View = dict[str, dict[str, Any]]


def write_objects_config(tmp_path: Path, s3: S3Server, *, source_bucket: str,
                         standby_bucket: str, prefix: str = "data",
                         standby_prefix: str = "replica", source: dict[str, Any] | None = None,
                         sink: dict[str, Any] | None = None,
                         ship: dict[str, Any] | None = None) -> DrSetup:
    """A config whose source is `source_bucket/prefix` and whose sink writes
    `standby_bucket/standby_prefix`; the log is a file store under tmp_path."""
    log_id = unique("objects")
    key_path = tmp_path / f"{log_id}.key"
    generate_key_file(key_path)
    conn = {k: v for k, v in s3.store_fields("unused").items() if k not in ("type", "bucket",
                                                                           "prefix")}
    raw: dict[str, Any] = {
        "log_id": log_id,
        "store": {"type": "file", "path": str(tmp_path / "store")},
        "keyring": {"active": KEY_ID, "keys": {KEY_ID: f"file:{key_path}"}},
        "sources": [{"type": "s3", "name": "datasets", "bucket": source_bucket,
                     "prefix": prefix, "interval_s": 0.5, "chunk_bytes": 5 * MiB,
                     **conn, **(source or {})}],
        "ship": {"heartbeat_interval_s": 1, "flush_interval_s": 0.2, **(ship or {})},
        "sinks": [{"type": "s3", "name": "standby", "source": "s3:datasets",
                   "bucket": standby_bucket, "prefix": standby_prefix, "part_bytes": 5 * MiB,
                   **conn, **(sink or {})}],
        "apply": {"poll_max_s": 0.3},
        "service": {"ship_metrics_listen": None, "apply_metrics_listen": None},
        "logging": {"level": "info", "format": "json"},
    }
    path = tmp_path / f"{log_id}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return DrSetup(path, raw)


def view(s3: S3Server, bucket: str, prefix: str) -> View:
    """Every object under `prefix/`: size, sha256, content type and user metadata (one
    deleted between the listing and its read is left out)."""
    c = s3.client
    out: View = {}
    base = prefix + "/" if prefix else ""
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        for o in page.get("Contents", []):
            try:
                resp = c.get_object(Bucket=bucket, Key=o["Key"])
            except c.exceptions.NoSuchKey:
                continue  # deleted since the listing (apply is running)
            h, size = hashlib.sha256(), 0
            for piece in resp["Body"].iter_chunks(MiB):
                h.update(piece)
                size += len(piece)
            out[o["Key"][len(base):]] = {"size": size, "sha256": h.hexdigest(),
                                         "content_type": resp.get("ContentType"),
                                         "metadata": resp.get("Metadata") or {}}
    return out


def wait_equal(s3: S3Server, primary: tuple[str, str], standby: tuple[str, str],
               procs: Iterable[DrstreamProcess], timeout: float = 120) -> View:
    """Wait until the standby prefix equals the primary object by object; the view."""
    deadline = time.monotonic() + timeout
    want = view(s3, *primary)
    while True:
        have = view(s3, *standby)
        if have == want:
            return want
        for p in procs:
            if not p.alive():
                raise AssertionError(f"{p.command} exited\n{p.describe(60)}")
        if time.monotonic() > deadline:
            differ = sorted(k for k in set(want) & set(have) if want[k] != have[k])
            raise AssertionError(f"standby differs after {timeout:.0f}s: only on primary "
                                 f"{sorted(set(want) - set(have))[:10]}, only on standby "
                                 f"{sorted(set(have) - set(want))[:10]}, different "
                                 f"{differ[:10]}")
        time.sleep(0.5)
        want = view(s3, *primary)


def put_big(s3: S3Server, bucket: str, key: str, size: int, seed: int,
            part: int = 8 * MiB, metadata: dict[str, str] | None = None) -> str:
    """Upload `size` pseudo-random bytes in parts (never whole in memory); its sha256."""
    c = s3.client
    up = c.create_multipart_upload(Bucket=bucket, Key=key, ContentType="application/x-big",
                                   Metadata=metadata or {})
    h = hashlib.sha256()
    parts, n, sent = [], 1, 0
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    while sent < size:
        take = min(part, size - sent)
        data = (block * (take // MiB + 1))[:take]
        data = bytes([n % 251]) + data[1:]  # parts differ
        h.update(data)
        resp = c.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=n,
                             Body=data)
        parts.append({"ETag": resp["ETag"], "PartNumber": n})
        sent += take
        n += 1
    c.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"],
                                MultipartUpload={"Parts": parts})
    return h.hexdigest()


UNICODE_KEY = "päth with spaces/日本語 ファイル #1.txt"


class History:
    """The scripted history of a primary prefix: create, overwrite, delete, re-create,
    user metadata, a key with unicode and spaces, a large object written in parts."""

    def __init__(self, s3: S3Server, bucket: str, prefix: str, big_bytes: int) -> None:
        self.s3, self.bucket, self.prefix, self.big_bytes = s3, bucket, prefix, big_bytes
        self.steps: list[tuple[str, Callable[[], None]]] = [
            ("create a", lambda: self.put("a.txt", b"first a", {"owner": "team-x"})),
            ("create b", lambda: self.put("dir/b.bin", os.urandom(3000), {}, "application/x-b")),
            ("unicode key", lambda: self.put(UNICODE_KEY, "ünïcödé ✓".encode(),
                                             {"lang": "ja"}, "text/plain; charset=utf-8")),
            ("overwrite a", lambda: self.put("a.txt", b"second a, longer", {"owner": "team-y",
                                                                          "rev": "2"})),
            ("create c", lambda: self.put("c.csv", b"x,y\n1,2\n", {}, "text/csv")),
            ("delete b", lambda: self.s3.client.delete_object(Bucket=bucket,
                                                              Key=self.full("dir/b.bin"))),
            ("big object", lambda: put_big(s3, bucket, self.full("big/model.bin"), big_bytes,
                                           seed=1, metadata={"kind": "weights"})),
            ("re-create b", lambda: self.put("dir/b.bin", b"b is back", {"again": "yes"})),
            ("delete c", lambda: self.s3.client.delete_object(Bucket=bucket,
                                                              Key=self.full("c.csv"))),
            ("empty object", lambda: self.put("empty", b"", {})),
        ]

    def full(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def put(self, rel: str, data: bytes, metadata: dict[str, str],
            content_type: str = "text/plain") -> None:
        self.s3.client.put_object(Bucket=self.bucket, Key=self.full(rel), Body=data,
                                  Metadata=metadata, ContentType=content_type)
