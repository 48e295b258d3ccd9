"""The S3 log store (aiobotocore): create-if-absent with `If-None-Match: *`.

Retries are ours, not botocore's: botocore is set to a single attempt, and every
operation goes through the shared retry loop (daemon/remotestore.py), which backs off
(capped, jittered) on connection errors, timeouts, throttling and 5xx, and gives up after
`max_attempts` with a StoreUnavailableError naming the key. Errors that a retry cannot fix
(no such bucket, access denied, bad credentials) raise StoreError at once.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar
from urllib.parse import unquote

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import Field, field_validator, model_validator

from drstream.daemon import remotestore
from drstream.daemon.errors import StoreError
from drstream.daemon.plugins import MAX_SECONDS
from drstream.daemon.remotestore import Refusal, Transient
from drstream.daemon.secrets import read_secret
from drstream.daemon.store import ObjectInfo, ObjectTooLargeError, check_prefix

T = TypeVar("T")

BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
PAGE = 1000  # keys per list page (the API's maximum)

# Throttling and server-side trouble: the same request may succeed later.
_RETRIABLE_CODES = frozenset({
    "SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "TooManyRequests",
    "RequestLimitExceeded", "InternalError", "ServiceUnavailable",
    # A concurrent conditional write to the same key is in flight; AWS says retry: the
    # retry then gets 412 (the other writer won) or 200 (it failed).
    "ConditionalRequestConflict",
})
# The request may not have reached S3, or its answer was lost: transient by nature.
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    BotoConnectionError, HTTPClientError, aiohttp.ClientError, TimeoutError, OSError,
)
_CREDENTIAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
    "InvalidClientTokenId",
})
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class ObjectLockConfig(remotestore.RetentionConfig):
    mode: Literal["GOVERNANCE", "COMPLIANCE"]


class S3BucketConfig(remotestore.CloudStoreConfig):
    """Where a bucket prefix is and how to talk to it: what the log store, the object
    source and the object sink (objconfig.py) all say."""

    type: Literal["s3"]
    bucket: str
    region: str = "us-east-1"
    # Secret references (env:NAME, file:/path, credential:NAME), resolved at open;
    # both absent -> botocore's default credential chain.
    access_key_id: str | None = None
    secret_access_key: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    # aiohttp's connect/read timeouts do not cover writes: request_timeout_s bounds those.
    read_timeout_s: float = Field(default=30.0, gt=0, le=MAX_SECONDS)

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        if not BUCKET_RE.match(v) or ".." in v:
            raise ValueError(
                f"bucket name {v!r} is not valid (3-63 of a-z 0-9 . -, starting and "
                "ending with a letter or digit)"
            )
        return v

    _refs = field_validator("access_key_id", "secret_access_key")(remotestore.secret_ref)

    @model_validator(mode="after")
    def _consistent(self) -> S3BucketConfig:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError(
                "access_key_id and secret_access_key go together (or leave both out to "
                "use the default AWS credential chain)"
            )
        return self


class S3StoreConfig(S3BucketConfig):
    object_lock: ObjectLockConfig | None = None


def retain_days(config: S3StoreConfig) -> int | None:
    """Days a written object stays under Object Lock (prune never tries to delete it)."""
    return config.object_lock.retain_days if config.object_lock is not None else None


def s3_config_from_url(url: str) -> S3StoreConfig:
    """`s3://bucket/prefix`; endpoint, region and credentials come from AWS_* env vars."""
    parts = remotestore.split_url(url, "s3", "s3://bucket/prefix")
    env = os.environ
    return remotestore.config_from_url(S3StoreConfig, url, {
        "type": "s3", "bucket": parts.netloc, "prefix": unquote(parts.path),
        "endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
        "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
    })


def _no_expect_continue(params: dict[str, Any], **_: Any) -> None:
    # botocore asks for "Expect: 100-continue" on puts, and aiohttp waits for the 100
    # with no timeout at all: a server that accepts and never answers would hang us.
    params.get("headers", {}).pop("Expect", None)


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def is_missing(e: BaseException) -> bool:
    """A StoreError (or ClientError) that says the key or version does not exist."""
    cause = e if isinstance(e, ClientError) else e.__cause__
    return isinstance(cause, ClientError) and (
        _code(cause) in _MISSING_KEY_CODES or _code(cause) == "NoSuchVersion")


def credentials(c: S3BucketConfig, where: str) -> dict[str, str]:
    """The client's key pair read from its references (empty: botocore's default chain);
    `where` names the config section in a secret's error."""
    if not (c.access_key_id and c.secret_access_key):
        return {}
    return {"aws_access_key_id": read_secret(c.access_key_id, f"{where}.access_key_id"),
            "aws_secret_access_key": read_secret(c.secret_access_key,
                                                 f"{where}.secret_access_key")}


def _retriable(e: ClientError) -> bool:
    return _code(e) in _RETRIABLE_CODES or _status(e) >= 500 or _status(e) == 429


def _ms(when: Any) -> int:
    """A datetime from botocore as ms since the epoch (0 when the server sent none)."""
    return int(when.timestamp() * 1000) if isinstance(when, dt.datetime) else 0


class S3Store(remotestore.RemoteStore[S3BucketConfig, Any]):  # aiobotocore's client is untyped
    """A Store over one bucket and key prefix of an S3 API endpoint; fencing rests on
    `If-None-Match: *`."""

    CREDENTIAL_FIELDS = "access_key_id/secret_access_key"
    RETENTION = "an Object Lock retention"

    def __init__(self, config: S3BucketConfig, where: str = "store") -> None:
        self.where = where  # the config section, in secret errors
        super().__init__(config, f"s3://{config.bucket}/{config.prefix}",
                         config.endpoint_url or f"AWS S3 ({config.region})",
                         f"bucket {config.bucket!r}")
        self.bucket = config.bucket

    # -- lifecycle ---------------------------------------------------------------

    async def _connect(self) -> None:
        c = self.config
        creds = credentials(c, self.where)
        boto_config = AioConfig(
            connect_timeout=c.connect_timeout_s,
            read_timeout=c.read_timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},  # our loop retries
            s3={"addressing_style": c.addressing_style},
        )
        self._client = await self._opened.enter_async_context(
            get_session().create_client(
                "s3", region_name=c.region, endpoint_url=c.endpoint_url,
                config=boto_config, **creds,
            )
        )
        self._c.meta.events.register_last("before-call.s3", _no_expect_continue)
        await self._check_bucket()

    async def _check_bucket(self) -> None:
        """Fail at open, clearly, on a missing bucket or refused credentials.

        HEAD answers have no body, so later a HEAD on a missing bucket would just look
        like a missing key; checking once here keeps `exists` honest.
        """
        try:
            await self._retrying("open", None, lambda: self._c.head_bucket(Bucket=self.bucket))
        except StoreError as e:
            cause = e.__cause__
            if not isinstance(cause, ClientError) or _status(cause) not in (403, 404):
                raise
            if _status(cause) == 404:
                raise self._refused("open", None, Refusal.MISSING, "") from cause
            # A 403 HEAD does not say why; a LIST answer has a body naming the cause
            # (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied) and raises it.
            await self._retrying("open", None, lambda: self._c.list_objects_v2(
                Bucket=self.bucket, Prefix=self._prefix, MaxKeys=1))
            raise StoreError(
                f"store {self.url}: access to bucket {self.bucket!r} at {self.endpoint} "
                "denied (HEAD bucket: 403)"
            ) from cause

    @property
    def client(self) -> Any:
        """The open aiobotocore client (for the object source and sink)."""
        return self._c

    async def request(self, op: str, key: str | None, call: Callable[[], Awaitable[T]]) -> T:
        """`call` (a request on `client`) under this store's retries and error mapping;
        a missing key raises StoreError whose cause `is_missing` recognises."""
        return await self._retrying(op, key, call)

    # -- error mapping ---------------------------------------------------------------

    @staticmethod
    def _service_error(e: BaseException | None) -> str | None:
        if not isinstance(e, ClientError):
            return None
        return f"{_code(e) or _status(e)}: {e.response.get('Error', {}).get('Message', '')}"

    def _attempt_error(self, op: str, key: str | None, e: Exception) -> Exception | None:
        if isinstance(e, ClientError):
            return Transient(e) if _retriable(e) else self._client_error(op, key, e)
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return StoreError(
                f"store {self.url}: no usable AWS credentials ({e}); set access_key_id/"
                "secret_access_key or configure the default AWS credential chain", key=key)
        if isinstance(e, _TRANSIENT_ERRORS):
            return Transient(e)
        if isinstance(e, BotoCoreError):  # e.g. bad parameters: retrying cannot help
            return StoreError(f"store {self.url}: {op} failed: {e}", key=key)
        return None

    def _client_error(self, op: str, key: str | None, e: ClientError) -> StoreError:
        code = _code(e)
        if code == "NoSuchBucket":
            return self._refused(op, key, Refusal.MISSING, code)
        region = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(
            "x-amz-bucket-region"
        )
        if _status(e) == 301 and region:
            return StoreError(
                f"store {self.url}: bucket {self.bucket!r} is in region {region!r}, "
                f"not {self.config.region!r}; set region", key=key,
            )
        if code in _CREDENTIAL_CODES:
            return self._refused(op, key, Refusal.CREDENTIALS, code)
        if code == "AccessDenied" or _status(e) == 403:
            return self._refused(op, key, Refusal.DENIED, code or str(_status(e)))
        return self._refused(op, key, Refusal.FAILED, self._describe(e))

    # -- the Store interface ------------------------------------------------------

    def _put_args(self, key: str, data: bytes, retain: bool = True) -> dict[str, Any]:
        # Content-MD5: S3 requires it (or a checksum) for Object Lock puts, and it gets
        # the bytes verified end to end on every put.
        md5 = hashlib.md5(data, usedforsecurity=False).digest()
        args: dict[str, Any] = {
            "Bucket": self.bucket, "Key": self._full(key), "Body": data,
            "IfNoneMatch": "*", "ContentMD5": base64.b64encode(md5).decode(),
        }
        lock = getattr(self.config, "object_lock", None)  # a log store's (S3StoreConfig)
        if lock is not None and retain:
            args["ObjectLockMode"] = lock.mode
            args["ObjectLockRetainUntilDate"] = dt.datetime.now(dt.UTC) + dt.timedelta(
                days=lock.retain_days
            )
        return args

    def _create_once(self, key: str, data: bytes, retain: bool) -> Callable[[], Awaitable[bool]]:
        args = self._put_args(key, data, retain)

        async def put() -> bool:
            try:
                await self._c.put_object(**args)
            except ClientError as e:
                if _code(e) == "PreconditionFailed" or _status(e) == 412:
                    return False
                raise
            return True

        return put

    async def get(self, key: str, max_bytes: int | None = None) -> bytes | None:
        full = self._full(key)

        # With a limit, ask for one byte past it: an object over the limit then costs at
        # most that much transfer (closing an unread body still lets the server push what
        # the socket buffers hold), and the answer's Content-Range names its full size.
        bounded = {} if max_bytes is None else {"Range": f"bytes=0-{max_bytes}"}

        async def get() -> bytes | None:
            try:
                resp = await self._c.get_object(Bucket=self.bucket, Key=full, **bounded)
            except ClientError as e:
                if _code(e) in _MISSING_KEY_CODES:
                    return None
                if bounded and _code(e) == "InvalidRange":  # an empty object has no byte 0
                    return b""
                raise
            async with resp["Body"] as body:  # read inside the retry: streams can break
                total = str(resp.get("ContentRange", "")).rpartition("/")[2]
                size = int(total) if total.isdigit() else int(resp.get("ContentLength", 0))
                if max_bytes is not None and size > max_bytes:  # from the answer's headers
                    raise ObjectTooLargeError(self.url, key, size, max_bytes)
                data: bytes = await body.read()
            return data

        return await self._retrying("get", key, get)

    async def get_prefix(self, key: str, length: int) -> tuple[bytes, int] | None:
        full = self._full(key)

        async def get() -> tuple[bytes, int] | None:
            try:
                resp = await self._c.get_object(Bucket=self.bucket, Key=full,
                                                Range=f"bytes=0-{max(length, 1) - 1}")
            except ClientError as e:
                if _code(e) in _MISSING_KEY_CODES:
                    return None
                if _code(e) == "InvalidRange":  # an empty object has no byte 0
                    return b"", 0
                raise
            async with resp["Body"] as body:
                data: bytes = await body.read(length)
            total = str(resp.get("ContentRange", "")).rpartition("/")[2]
            return data[:length], int(total) if total.isdigit() else len(data)

        return await self._retrying("get", key, get)

    async def head(self, key: str) -> ObjectInfo | None:
        resp = await self._head_object(key)
        if resp is None:
            return None
        until = resp.get("ObjectLockRetainUntilDate")
        return ObjectInfo(size=int(resp.get("ContentLength", 0)),
                          modified_ms=_ms(resp.get("LastModified")),
                          retain_until_ms=None if until is None else _ms(until))

    async def exists(self, key: str) -> bool:
        return await self.version_id(key) is not None

    async def version_id(self, key: str) -> str | None:
        """The current version id of `key` ('null' when unversioned), None when absent."""
        resp = await self._head_object(key)
        return None if resp is None else str(resp.get("VersionId") or "null")

    async def _head_object(self, key: str) -> dict[str, Any] | None:
        """HEAD `key` (retried), None when absent."""
        full = self._full(key)

        async def head() -> dict[str, Any] | None:
            try:
                resp: dict[str, Any] = await self._c.head_object(Bucket=self.bucket, Key=full)
            except ClientError as e:
                if _code(e) in _MISSING_KEY_CODES:
                    return None
                raise
            return resp

        return await self._retrying("head", key, head)

    async def delete(self, key: str) -> None:
        """Delete `key` (in a versioned bucket: add a delete marker; versions stay)."""
        full = self._full(key)
        await self._retrying(
            "delete", key, lambda: self._c.delete_object(Bucket=self.bucket, Key=full)
        )

    async def delete_version(self, key: str, version_id: str | None = None) -> None:
        """Permanently delete one version (default: the current one) of `key`.

        A version under Object Lock retention is refused by the server: StoreError.
        """
        version = version_id or await self.version_id(key)
        if version is None:
            return
        full = self._full(key)
        await self._retrying(
            "delete version", key,
            lambda: self._c.delete_object(Bucket=self.bucket, Key=full, VersionId=version),
        )

    async def purge(self, key: str) -> None:
        """Delete every version and delete marker of `key` (what a plain delete leaves in
        a versioned bucket); a version under retention is refused: StoreError."""
        full = self._full(key)
        page = await self._retrying("list versions", key, lambda: self._c.list_object_versions(
            Bucket=self.bucket, Prefix=full))
        for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
            if v["Key"] == full:
                await self.delete_version(key, v["VersionId"])
        if not page.get("Versions") and not page.get("DeleteMarkers"):
            await self.delete(key)  # an unversioned bucket lists no versions on some servers

    async def hidden(self, prefix: str, start_after: str | None = None) -> AsyncIterator[str]:
        """Keys whose newest version is a delete marker while older versions still hold
        bytes: deleted in a versioned bucket, but restorable (and still there to see)."""
        check_prefix(prefix)
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._prefix + prefix}
        if start_after:
            args["KeyMarker"] = self._prefix + start_after
        while True:
            page = await self._retrying("list versions", prefix, functools.partial(
                self._c.list_object_versions, **args))
            marked = {m["Key"] for m in page.get("DeleteMarkers", []) if m.get("IsLatest")}
            kept = {v["Key"] for v in page.get("Versions", [])}
            for full in sorted(marked & kept):
                yield self._key(full)
            if not page.get("IsTruncated"):
                return
            args["KeyMarker"] = page["NextKeyMarker"]
            args["VersionIdMarker"] = page.get("NextVersionIdMarker")
            if not args["VersionIdMarker"]:
                args.pop("VersionIdMarker")

    async def _names(self, prefix: str, start_after: str | None, limit: int | None
                     ) -> AsyncIterator[str]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._prefix + prefix,
                                "MaxKeys": min(PAGE, limit or PAGE)}
        if start_after:  # exclusive
            args["StartAfter"] = self._prefix + start_after
        while True:
            page = await self._retrying(
                "list", prefix, functools.partial(self._c.list_objects_v2, **args)
            )
            for obj in page.get("Contents", []):
                yield obj["Key"]
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]
            args.pop("StartAfter", None)
