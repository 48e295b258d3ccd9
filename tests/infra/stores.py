"""A fresh, empty log store of any kind for a test: its raw `store:` config, built from
the fixtures of the kind's test server (file: a directory under tmp_path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# The fixtures of each remote store kind: its server, a fresh bucket (container) on it,
# and what puts its credentials where the config's references point.
REMOTE_STORES = {
    "s3": ("s3", "s3_bucket", "s3_creds_env"),
    "gcs": ("gcs", "gcs_bucket", None),
    "azure": ("azurite", "azure_container", "azure_creds_env"),
}


def store_server(kind: str, request: pytest.FixtureRequest) -> Any:
    """The test server behind a remote store kind (s3, gcs, azure)."""
    if kind not in REMOTE_STORES:
        raise ValueError(f"unknown store kind {kind!r}")
    return request.getfixturevalue(REMOTE_STORES[kind][0])


def store_fields(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
                 via: str | None = None, prefix: str = "dr") -> dict[str, Any]:
    """Raw `store:` config of a fresh, empty store of `kind` (file, s3, gcs, azure);
    `via` is a base URL to reach its server by instead (a proxy's)."""
    if kind == "file":
        return {"type": "file", "path": str(tmp_path / "log-store")}
    server = store_server(kind, request)
    _, bucket_fixture, creds_fixture = REMOTE_STORES[kind]
    bucket = request.getfixturevalue(bucket_fixture)
    if creds_fixture:
        request.getfixturevalue(creds_fixture)
    fields: dict[str, Any] = server.store_fields(bucket, prefix)
    if via is not None:  # the server's endpoint with the proxy's address (Azurite's path kept)
        fields["endpoint_url"] = fields["endpoint_url"].replace(server.endpoint_url, via)
    return fields
