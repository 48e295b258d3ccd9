"""The `store` fixture: every Store implementation, each against its real backend; and
`log_context`, the Context (with a blob store on disk) the source and sink suites build
their connectors with."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drstream.connectors.azure.store import AzureStore, AzureStoreConfig
from drstream.connectors.file.store import FileStore, FileStoreConfig
from drstream.connectors.gcs.store import GcsStore, GcsStoreConfig
from drstream.connectors.s3.store import S3Store, S3StoreConfig
from drstream.daemon.blobs import BlobStore
from drstream.daemon.keyring import KeyRing
from drstream.daemon.plugins import Context, installed
from drstream.daemon.store import Store
from tests.infra.s3 import S3Server


def open_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """An unopened store of `kind` on a fresh, empty bucket (or directory, container)."""
    if kind == "file":
        return FileStore(FileStoreConfig(type="file", path=str(tmp_path / "store")))
    if kind == "gcs":
        fields = request.getfixturevalue("gcs").store_fields(
            request.getfixturevalue("gcs_bucket"), prefix="drs/contract")
        return GcsStore(GcsStoreConfig.model_validate(fields))
    if kind == "azure":
        request.getfixturevalue("azure_creds_env")
        fields = request.getfixturevalue("azurite").store_fields(
            request.getfixturevalue("azure_container"), prefix="drs/contract")
        return AzureStore(AzureStoreConfig.model_validate(fields))
    if kind == "s3":
        s3: S3Server = request.getfixturevalue("s3")
        request.getfixturevalue("s3_creds_env")
        bucket = request.getfixturevalue("s3_bucket")
        return S3Store(S3StoreConfig.model_validate(s3.store_fields(bucket, prefix="drs/contract")))
    raise ValueError(f"unknown store kind {kind!r}")


@pytest.fixture(params=["file", "s3", "gcs", "azure"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(request.param, request, tmp_path) as opened:
        yield opened


@contextlib.asynccontextmanager
async def log_context(tmp_path: Path, log_id: str) -> AsyncIterator[Context]:
    """A Context for log `log_id` whose blobs are in a file store under tmp_path."""
    registry = installed()
    config = registry.store_config_from_url(f"file://{tmp_path / 'store'}")
    async with registry.open_store(config) as store:
        blobs = BlobStore(store, log_id, KeyRing({"k1": os.urandom(32)}, "k1"))
        yield Context(log_id=log_id, blobs=blobs, buffer_max_bytes=64 << 20)
