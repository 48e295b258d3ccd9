"""The `store` fixture: every Store implementation, each against its real backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drstream.connectors.file.store import FileStore, FileStoreConfig
from drstream.connectors.s3.store import S3Store, S3StoreConfig
from drstream.daemon.store import Store
from tests.infra.s3 import S3Server


@pytest.fixture(params=["file", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "file":
        impl: Store = FileStore(FileStoreConfig(type="file", path=str(tmp_path / "store")))
    else:
        s3: S3Server = request.getfixturevalue("s3")
        request.getfixturevalue("s3_creds_env")
        bucket = request.getfixturevalue("s3_bucket")
        config = S3StoreConfig.model_validate(s3.store_fields(bucket, prefix="drs/contract"))
        impl = S3Store(config)
    async with impl as opened:
        yield opened
