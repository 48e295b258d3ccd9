"""Shared pieces of the log-integrity tests: a 40-segment log in a real store (the file
store or the moto S3 server), a config and key file that the `drstream` command can take,
and the store's contents to compare before and after (to show nothing was changed)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from drstream.daemon.config import Config, parse_config
from drstream.daemon.deltalog import LogWriter, segment_key
from drstream.daemon.keyring import KeyRing, generate_key_file, load_key
from drstream.daemon.plugins import installed
from drstream.daemon.segment import parse_header
from drstream.daemon.store import Store
from tests.contract.test_deltalog_contract import body
from tests.infra.s3 import S3Server, unique_bucket_name
from tests.infra.stores import store_fields

LOG = "east-1"
STREAM = "kafka:primary"
# `ship` opens the log before it reaches its sources: one that is never reached will do
DEAD_SOURCE = {"sources": [{"type": "kafka", "bootstrap_servers": "127.0.0.1:9",
                            "topics": {"include": ["x"]}}]}


@dataclass
class LogSetup:
    """A log in a store: the opened store, its raw `store:` fields, a key and a config."""

    kind: str
    store: Store
    fields: dict[str, Any]
    keyring: KeyRing
    config_path: Path

    @property
    def config(self) -> Config:
        raw = yaml.safe_load(self.config_path.read_text())
        return parse_config(raw, str(self.config_path))

    def key(self, seq: int) -> str:
        return segment_key(LOG, seq)


def s3_fields(request: pytest.FixtureRequest, bucket: str | None = None,
              **overrides: Any) -> dict[str, Any]:
    s3: S3Server = request.getfixturevalue("s3")
    request.getfixturevalue("s3_creds_env")
    bucket = bucket or request.getfixturevalue("s3_bucket")
    fields: dict[str, Any] = s3.store_fields(bucket, prefix="drs/integrity", **overrides)
    return fields


def versioned_bucket(s3: S3Server) -> str:
    name = s3.create_bucket(unique_bucket_name())
    s3.client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def write_config(tmp_path: Path, fields: dict[str, Any], **extra: Any) -> tuple[Path, KeyRing]:
    key = tmp_path / f"k1-{os.urandom(3).hex()}.key"
    generate_key_file(key)
    raw = {"log_id": LOG, "store": fields,
           "keyring": {"active": "k1", "keys": {"k1": f"file:{key}"}},
           "logging": {"level": "info", "format": "json"},
           "service": {"ship_metrics_listen": "127.0.0.1:0", "apply_metrics_listen": "127.0.0.1:0"},
           **extra}
    path = tmp_path / f"drstream-{os.urandom(3).hex()}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, KeyRing({"k1": load_key(f"file:{key}")}, "k1")


@contextlib.asynccontextmanager
async def open_setup(kind: str, fields: dict[str, Any], tmp_path: Path, **extra: Any
                     ) -> AsyncIterator[LogSetup]:
    path, keyring = write_config(tmp_path, fields, **extra)
    registry = installed()
    config = registry.stores[fields["type"]].config_model.model_validate(fields)
    async with registry.open_store(config) as store:
        yield LogSetup(kind, store, fields, keyring, path)


@contextlib.asynccontextmanager
async def param_setup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LogSetup]:
    """open_setup on the store `request.param` names (file, s3, gcs, azure)."""
    fields = store_fields(request.param, request, tmp_path, prefix="drs/integrity")
    async with open_setup(request.param, fields, tmp_path) as s:
        yield s


async def make_log(setup: LogSetup, n: int = 40, max_in_flight: int = 4,
                   topic: str = "orders") -> None:
    """n segments of 2 records each (offsets 0, 1, 2, ... of `topic` partition 0), their
    timestamps now (a Kafka cluster they are replayed into keeps them)."""
    writer = LogWriter(setup.store, LOG, setup.keyring, max_in_flight=max_in_flight)
    await writer.open()
    now = int(time.time() * 1000)
    for i in range(n):
        b = body(2, start=2 * i, topic=topic)
        for batch in b.batches:
            for r in getattr(batch, "records", []):
                r.timestamp = now
        b.manifest.min_timestamp_ms = b.manifest.max_timestamp_ms = now
        await writer.append(b)
    await writer.flush()


async def contents(store: Store) -> dict[str, str]:
    """Every object under logs/ with the SHA-256 of its bytes."""
    out = {}
    async for key in store.list("logs/"):
        data = await store.get(key)
        out[key] = hashlib.sha256(data or b"").hexdigest()
    return out


async def replace(store: Store, key: str, data: bytes) -> None:
    await store.purge(key)
    assert await store.put_if_absent(key, data)


async def rename(store: Store, src: str, dst: str) -> None:
    data = await store.get(src)
    assert data is not None
    await store.purge(src)
    assert await store.put_if_absent(dst, data)


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def prev_digest_offset(data: bytes) -> int:
    """Index of the first byte of the header's prev_digest (just before body_len)."""
    _, hlen = parse_header(data)
    return hlen - 4 - 32
