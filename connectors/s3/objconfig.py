"""Typed config of the object source and sink: a bucket prefix (datasets, DVC remotes) on
an S3 API endpoint, with the same connection fields as the S3 log store (store.py:
endpoint, region, credentials by reference, bounded retries)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from drstream.connectors.s3.store import BUCKET_RE, S3BucketConfig
from drstream.daemon.blobs import MAX_CHUNK
from drstream.daemon.plugins import SinkConfig

NAME_RE = r"^[A-Za-z0-9._-]{1,64}$"
DEFAULT_INTERVAL_S = 30.0
# S3 refuses multipart parts under 5 MiB (the last excepted): an object's chunks become
# its parts on the standby, so a chunk is never smaller.
MIN_PART_BYTES = 5 << 20
DEFAULT_CHUNK_BYTES = 8 << 20
DEFAULT_PART_BYTES = 8 << 20
# S3 allows at most 10,000 parts; 8 MiB parts reach 78 GiB, 64 MiB parts 625 GiB.
MAX_PART_BYTES = 512 << 20
DEFAULT_CHECKPOINT_PREFIX = ".drstream-checkpoints"
# Object bytes captured before the source hands what it has to the log (one Delivery, so
# one segment): a long first sync is checkpointed in the log in steps this size.
DEFAULT_CAPTURE_BUDGET_BYTES = 256 << 20


class ObjectSourceConfig(S3BucketConfig):
    """The primary bucket prefix `ship` watches (stream `s3:<name>`)."""

    name: str = Field("datasets", pattern=NAME_RE,
                      description="the stream is 's3:<name>'")
    interval_s: float = Field(DEFAULT_INTERVAL_S, gt=0, le=86400,
                              description="list the whole prefix this often")
    versions: Literal["auto", "on", "off"] = Field(
        "auto", description="list object versions (auto: when the bucket's versioning is "
                            "Enabled or Suspended)")
    chunk_bytes: int = Field(DEFAULT_CHUNK_BYTES, ge=MIN_PART_BYTES, le=MAX_CHUNK,
                             description="objects are shipped in blobs of this size")
    capture_budget_bytes: int = Field(DEFAULT_CAPTURE_BUDGET_BYTES, ge=1 << 20, le=1 << 40)

    @property
    def stream(self) -> str:
        return f"s3:{self.name}"


class ObjectSinkConfig(S3BucketConfig, SinkConfig):
    """The standby bucket prefix `apply` writes (same keys below its own prefix)."""

    name: str = Field("standby", pattern=NAME_RE, description="this sink's name")
    source: str = Field("s3:datasets", pattern=r"^s3:[A-Za-z0-9._-]{1,64}$",
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
