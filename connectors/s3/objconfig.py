"""Typed config of the object source and sink: a bucket prefix (datasets, DVC remotes) on
an S3 API endpoint, with the same connection fields as the S3 log store (store.py:
endpoint, region, credentials by reference, bounded retries)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from drstream.connectors.s3.notify import NotificationsConfig
from drstream.connectors.s3.store import BUCKET_RE, S3BucketConfig
from drstream.daemon.objsource import MIN_PART_BYTES, ObjectSourceFields
from drstream.daemon.plugins import SinkConfig

# The sink's names and its parts; the source's settings are every object source's
# (daemon/objsource.py).
NAME_RE = r"^[A-Za-z0-9._-]{1,64}$"
DEFAULT_PART_BYTES = 8 << 20
# S3 allows at most 10,000 parts; 8 MiB parts reach 78 GiB, 64 MiB parts 625 GiB.
MAX_PART_BYTES = 512 << 20
DEFAULT_CHECKPOINT_PREFIX = ".drstream-checkpoints"
# The object streams a sink applies: a bucket prefix on S3, GCS or Azure Blob Storage.
OBJECT_STREAM_RE = r"^(s3|gcs|azure):[A-Za-z0-9._-]{1,64}$"


class ObjectSourceConfig(ObjectSourceFields, S3BucketConfig):
    """The primary bucket prefix `ship` watches (stream `s3:<name>`)."""

    KIND = "s3"

    versions: Literal["auto", "on", "off"] = Field(
        "auto", description="list object versions (auto: when the bucket's versioning is "
                            "Enabled or Suspended)")
    notifications: NotificationsConfig | None = Field(
        None, description="an SQS queue of the bucket's events: list at once on one "
                          "(a latency hint; off by default)")


class ObjectSinkConfig(S3BucketConfig, SinkConfig):
    """The standby bucket prefix `apply` writes (same keys below its own prefix)."""

    name: str = Field("standby", pattern=NAME_RE, description="this sink's name")
    source: str = Field("s3:datasets", pattern=OBJECT_STREAM_RE,
                        description="the stream in the log to apply")
    part_bytes: int = Field(DEFAULT_PART_BYTES, ge=MIN_PART_BYTES, le=MAX_PART_BYTES,
                            description="objects larger than this go up in parts this size")
    checkpoint_bucket: str | None = Field(
        None, description="bucket of the checkpoint object (default: `bucket`)")
    checkpoint_prefix: str = Field(DEFAULT_CHECKPOINT_PREFIX, pattern=r"^[A-Za-z0-9._/-]{1,200}$",
                                   description="checkpoint: <this>/<log_id>/<prefix>/<name>.json")

    @model_validator(mode="after")
    def _checkpoint_outside(self) -> ObjectSinkConfig:
        if self.checkpoint_bucket is not None and not BUCKET_RE.match(self.checkpoint_bucket):
            raise ValueError(f"checkpoint_bucket {self.checkpoint_bucket!r} is not a valid "
                             "bucket name")
        same = self.checkpoint_bucket in (None, self.bucket)
        cp = self.checkpoint_prefix.strip("/") + "/"
        if same and (not self.prefix or cp.startswith(self.prefix + "/")):
            raise ValueError(f"checkpoint_prefix {self.checkpoint_prefix!r} lies inside the "
                             f"replicated prefix {self.prefix!r}: set prefix, or "
                             "checkpoint_bucket to another bucket")
        return self

    def checkpoint_key(self, log_id: str) -> str:
        """The checkpoint object of this sink for log `log_id`: one per target prefix, so
        replays of one name into several prefixes of a bucket keep apart."""
        where = f"{self.prefix}/" if self.prefix else ""
        return f"{self.checkpoint_prefix.strip('/')}/{log_id}/{where}{self.name}.json"
