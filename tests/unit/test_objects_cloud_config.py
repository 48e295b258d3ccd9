"""The GCS and Azure object sources' configs (unknown keys rejected, named defaults,
errors naming field path and value) and their streams' kind: object streams, replayed,
drilled and verified like S3's."""

from __future__ import annotations

from typing import Any

import pytest

from drstream.connectors.s3.objconfig import ObjectSinkConfig
from drstream.daemon.config import parse_config
from drstream.daemon.errors import ConfigError, ConfigFieldError
from drstream.daemon.objsource import DEFAULT_CAPTURE_BUDGET_BYTES, DEFAULT_CHUNK_BYTES
from drstream.daemon.plugins import installed

BASE: dict[str, Any] = {
    "log_id": "east-1",
    "store": {"type": "file", "path": "/var/lib/drstream/log"},
    "keyring": {"active": "k1", "keys": {"k1": "file:/etc/drstream/k1.key"}},
}
GCS = {"type": "gcs", "bucket": "data-bucket", "prefix": "ds", "anonymous": True}
AZURE = {"type": "azure", "account": "devstoreaccount1", "container": "data",
         "prefix": "ds", "account_key": "env:AZ_KEY"}


def errors_of(source: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "sources": [source]})
    return [(e.path, str(e)) for e in info.value.errors]


@pytest.mark.parametrize("source", [GCS, AZURE], ids=["gcs", "azure"])
def test_defaults_and_stream(source: dict[str, Any]) -> None:
    config = parse_config({**BASE, "sources": [source]})
    (s,) = config.sources
    assert s.stream == f"{source['type']}:datasets"
    assert (s.chunk_bytes, s.capture_budget_bytes) == (DEFAULT_CHUNK_BYTES,
                                                       DEFAULT_CAPTURE_BUDGET_BYTES)
    # the S3 sink applies it
    assert ObjectSinkConfig.model_validate({"type": "s3", "bucket": "standby-bucket",
                                            "prefix": "r", "source": s.stream}).applies \
        == s.stream


@pytest.mark.parametrize(("source", "patch", "path", "shown"), [
    (GCS, {"colour": "red"}, "sources[0].colour", "red"),
    (GCS, {"chunk_bytes": 1 << 20}, "sources[0].chunk_bytes", "1048576"),
    (GCS, {"versions": "maybe"}, "sources[0].versions", "maybe"),
    (AZURE, {"versions": "on"}, "sources[0].versions", "on"),  # blob versions: not listed
    (GCS, {"object_retention": {"retain_days": 1, "mode": "Locked"}},
     "sources[0].object_retention", "retain_days"),  # a log store's field only
    (GCS, {"bucket": "Bad_Bucket"}, "sources[0].bucket", "Bad_Bucket"),
    (AZURE, {"interval_s": 0}, "sources[0].interval_s", "0"),
    (AZURE, {"account_key": "inline-secret"}, "sources[0].account_key", ""),
    (AZURE, {"container": "no--dash"}, "sources[0].container", "no--dash"),
    (AZURE, {"immutability": {"retain_days": 1, "mode": "Locked"}},
     "sources[0].immutability", "retain_days"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_each_error_names_field_and_value(source: dict[str, Any], patch: dict[str, Any],
                                          path: str, shown: str) -> None:
    errors = errors_of({**source, **patch})
    assert [p for p, _ in errors] == [path], errors
    assert shown in errors[0][1]
    assert "inline-secret" not in errors[0][1]


def test_gcs_and_azure_streams_are_object_streams() -> None:
    connectors = installed()
    objects = connectors.stream("s3:datasets")
    assert connectors.stream("gcs:datasets") is objects
    assert connectors.stream("azure:datasets") is objects
    with pytest.raises(ConfigFieldError, match="azure:<name>, gcs:<name>, kafka:<name>"):
        connectors.stream("ftp:x")


def test_gcs_generations_become_versions_newest_first_and_a_timed_delete() -> None:
    """A versioned GCS listing has no delete markers: a name whose generations are all
    noncurrent is a delete at the latest timeDeleted."""
    from drstream.connectors.gcs.objsource import GcsObjectSourceConfig, GcsReader

    reader = GcsReader(GcsObjectSourceConfig.model_validate(GCS))
    gen = {"name": "ds/a", "size": "3"}
    old = {**gen, "generation": "100", "timeCreated": "2026-01-01T00:00:01Z",
           "timeDeleted": "2026-01-01T00:00:05Z"}
    new = {**gen, "generation": "200", "timeCreated": "2026-01-01T00:00:05Z"}
    key, live = reader._key([old, new], versioned=True)
    assert key == "a"
    assert [(e.version_id, e.deleted) for e in live] == [("200", False), ("100", False)]
    gone = {**new, "timeDeleted": "2026-01-01T00:00:09Z"}
    _, deleted = reader._key([old, gone], versioned=True)
    assert [(e.version_id, e.deleted) for e in deleted] == [("", True), ("200", False),
                                                            ("100", False)]
    assert deleted[0].last_modified_ms == 1767225609000
    _, plain = reader._key([new], versioned=False)
    assert [(e.version_id, e.etag) for e in plain] == [("", "200")]
