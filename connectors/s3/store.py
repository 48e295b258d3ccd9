"""The S3 log store (aiobotocore): create-if-absent with `If-None-Match: *`.

Retries are ours, not botocore's: botocore is set to a single attempt, and every
operation goes through `_retrying`, which backs off (capped, jittered) on connection
errors, timeouts, throttling and 5xx, and gives up after `max_attempts` with a
StoreUnavailableError naming the key. Errors that a retry cannot fix (no such bucket,
access denied, bad credentials) raise StoreError at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import functools
import hashlib
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit

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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drstream.daemon.errors import ConfigFieldError, StoreError, StoreUnavailableError
from drstream.daemon.lifecycle import Starting
from drstream.daemon.logging import get_logger
from drstream.daemon.plugins import MAX_SECONDS, ConnectorConfig
from drstream.daemon.retry import Backoff, retrying
from drstream.daemon.secrets import SECRET_REF_HELP, is_secret_ref, read_secret
from drstream.daemon.store import (
    ObjectInfo,
    ObjectTooLargeError,
    check_key,
    check_prefix,
    probe_create_if_absent,
)

log = get_logger(__name__)
T = TypeVar("T")

BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

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


class ObjectLockConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["GOVERNANCE", "COMPLIANCE"]
    retain_days: int = Field(gt=0, le=36500)


class S3StoreConfig(ConnectorConfig):
    type: Literal["s3"]
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    # Secret references (env:NAME, file:/path, credential:NAME), resolved at open;
    # both absent -> botocore's default credential chain.
    access_key_id: str | None = None
    secret_access_key: str | None = None
    object_lock: ObjectLockConfig | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    max_attempts: int = Field(default=6, ge=1, le=100)
    backoff_base_s: float = Field(default=0.2, gt=0, le=MAX_SECONDS)
    backoff_max_s: float = Field(default=10.0, gt=0, le=MAX_SECONDS)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=MAX_SECONDS)
    read_timeout_s: float = Field(default=30.0, gt=0, le=MAX_SECONDS)
    # Hard limit for one attempt, whatever stalls (an upload the server stops reading):
    # aiohttp's connect/read timeouts do not cover writes.
    request_timeout_s: float = Field(default=300.0, gt=0, le=MAX_SECONDS)

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        if not BUCKET_RE.match(v) or ".." in v:
            raise ValueError(
                f"bucket name {v!r} is not valid (3-63 of a-z 0-9 . -, starting and "
                "ending with a letter or digit)"
            )
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.strip("/")
        if v:
            check_prefix_or_value_error(v)
        return v

    @field_validator("access_key_id", "secret_access_key")
    @classmethod
    def _secret_ref(cls, v: str | None) -> str | None:
        # The message carries SECRET_REF_HELP so the config loader hides the value.
        if v is not None and not is_secret_ref(v):
            raise ValueError(f"must be {SECRET_REF_HELP}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> S3StoreConfig:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError(
                "access_key_id and secret_access_key go together (or leave both out to "
                "use the default AWS credential chain)"
            )
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must be >= backoff_base_s")
        return self


def retain_days(config: S3StoreConfig) -> int | None:
    """Days a written object stays under Object Lock (prune never tries to delete it)."""
    return config.object_lock.retain_days if config.object_lock is not None else None


def check_prefix_or_value_error(prefix: str) -> None:
    try:
        check_key(prefix)
    except StoreError as e:
        raise ValueError(str(e).replace("object key", "prefix")) from None


def s3_config_from_url(url: str) -> S3StoreConfig:
    """`s3://bucket/prefix`; endpoint, region and credentials come from AWS_* env vars."""
    parts = urlsplit(url)
    if "@" in parts.netloc:  # never echo a URL that may embed credentials
        raise ConfigFieldError("store", "s3://(hidden)", "credentials do not go in the URL")
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ConfigFieldError("store", url, "expected s3://bucket/prefix")
    env = os.environ
    try:
        return S3StoreConfig(
            type="s3", bucket=parts.netloc, prefix=unquote(parts.path),
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        )
    except ValidationError as e:
        reason = "; ".join(str(err["msg"]).removeprefix("Value error, ") for err in e.errors())
        raise ConfigFieldError("store", url, reason) from None


class _Transient(Exception):
    """An attempt that may succeed when tried again; its __cause__ is what failed."""


def _no_expect_continue(params: dict[str, Any], **_: Any) -> None:
    # botocore asks for "Expect: 100-continue" on puts, and aiohttp waits for the 100
    # with no timeout at all: a server that accepts and never answers would hang us.
    params.get("headers", {}).pop("Expect", None)


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _retriable(e: ClientError) -> bool:
    return _code(e) in _RETRIABLE_CODES or _status(e) >= 500 or _status(e) == 429


def _ms(when: Any) -> int:
    """A datetime from botocore as ms since the epoch (0 when the server sent none)."""
    return int(when.timestamp() * 1000) if isinstance(when, dt.datetime) else 0


def _describe(e: BaseException | None) -> str:
    if isinstance(e, ClientError):
        return f"{_code(e) or _status(e)}: {e.response.get('Error', {}).get('Message', '')}"
    return f"{type(e).__name__}: {e}"


class S3Store(Starting):
    """A Store over one bucket and key prefix of an S3 API endpoint."""

    def __init__(self, config: S3StoreConfig) -> None:
        self.config = config
        self.bucket = config.bucket
        self._prefix = config.prefix + "/" if config.prefix else ""
        self.url = f"s3://{config.bucket}/{config.prefix}"
        self.endpoint = config.endpoint_url or f"AWS S3 ({config.region})"
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None

    def __repr__(self) -> str:
        return f"S3Store({self.url} at {self.endpoint})"

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Connect and check the bucket (a second call while open does nothing)."""
        if self._client is not None:
            return
        c = self.config
        creds: dict[str, str] = {}
        if c.access_key_id and c.secret_access_key:
            creds = {
                "aws_access_key_id": read_secret(c.access_key_id, "store.access_key_id"),
                "aws_secret_access_key": read_secret(
                    c.secret_access_key, "store.secret_access_key"
                ),
            }
        boto_config = AioConfig(
            connect_timeout=c.connect_timeout_s,
            read_timeout=c.read_timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},  # our loop retries
            s3={"addressing_style": c.addressing_style},
        )
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                get_session().create_client(
                    "s3", region_name=c.region, endpoint_url=c.endpoint_url,
                    config=boto_config, **creds,
                )
            )
            self._stack = stack
            self._client.meta.events.register_last("before-call.s3", _no_expect_continue)
            await self._check_bucket()
        except BaseException:
            await stack.aclose()
            self._client, self._stack = None, None
            raise

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

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
                raise self._no_bucket_error(None) from cause
            # A 403 HEAD does not say why; a LIST answer has a body naming the cause
            # (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied) and raises it.
            await self._retrying("open", None, lambda: self._c.list_objects_v2(
                Bucket=self.bucket, Prefix=self._prefix, MaxKeys=1))
            raise StoreError(
                f"store {self.url}: access to bucket {self.bucket!r} at {self.endpoint} "
                "denied (HEAD bucket: 403)"
            ) from cause

    @property
    def _c(self) -> Any:
        if self._client is None:
            raise StoreError(f"store {self.url} is not open (use 'async with')")
        return self._client

    # -- retries and error mapping -----------------------------------------------

    async def _retrying(
        self, op: str, key: str | None, call: Callable[[], Awaitable[T]]
    ) -> T:
        """`call` under the store's back-off: throttling, 5xx and transport errors are
        retried; what a retry cannot fix raises StoreError at once."""

        async def attempt() -> T:
            try:
                async with asyncio.timeout(self.config.request_timeout_s):
                    return await call()
            except ClientError as e:
                if not _retriable(e):
                    raise self._client_error(op, key, e) from e
                raise _Transient(e) from e
            except (NoCredentialsError, PartialCredentialsError) as e:
                raise StoreError(
                    f"store {self.url}: no usable AWS credentials ({e}); set access_key_id/"
                    "secret_access_key or configure the default AWS credential chain",
                    key=key,
                ) from e
            except _TRANSIENT_ERRORS as e:
                raise _Transient(e) from e
            except BotoCoreError as e:  # e.g. bad parameters: retrying cannot help
                raise StoreError(f"store {self.url}: {op} failed: {e}", key=key) from e

        def on_retry(e: Exception, attempt: int, delay: float) -> None:
            log.warning("store_retry", store=self.url, op=op, key=key, attempt=attempt,
                        delay_s=round(delay, 3), error=_describe(e.__cause__))

        c = self.config
        backoff = Backoff(c.backoff_base_s, c.backoff_max_s, attempts=c.max_attempts)
        try:
            return await retrying(attempt, backoff, on_retry=on_retry,
                                  retriable=lambda e: isinstance(e, _Transient))
        except _Transient as e:
            what = f"{op} {key!r}" if key is not None else op
            raise StoreUnavailableError(
                f"store {self.url} at {self.endpoint} unavailable: {what} failed after "
                f"{c.max_attempts} attempts; last error {_describe(e.__cause__)}",
                # explicit: StoreError.__init__'s retriable=False default overrides the class's
                key=key, retriable=True,
            ) from e.__cause__

    def _no_bucket_error(self, key: str | None) -> StoreError:
        return StoreError(
            f"store {self.url}: bucket {self.bucket!r} does not exist at endpoint "
            f"{self.endpoint}", key=key,
        )

    def _client_error(self, op: str, key: str | None, e: ClientError) -> StoreError:
        code, what = _code(e), f"{op} {key!r}" if key is not None else op
        if code == "NoSuchBucket":
            return self._no_bucket_error(key)
        region = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(
            "x-amz-bucket-region"
        )
        if _status(e) == 301 and region:
            return StoreError(
                f"store {self.url}: bucket {self.bucket!r} is in region {region!r}, "
                f"not {self.config.region!r}; set region", key=key,
            )
        if code in _CREDENTIAL_CODES:
            msg = (f"credentials rejected by {self.endpoint} for bucket {self.bucket!r} "
                   f"({code}); check access_key_id/secret_access_key")
        elif code == "AccessDenied" or _status(e) == 403:
            msg = (f"access denied: {what} in bucket {self.bucket!r} at {self.endpoint} "
                   "(missing permission, or an Object Lock retention forbids it)")
        else:
            msg = f"{what} in bucket {self.bucket!r} failed: {_describe(e)}"
        return StoreError(f"store {self.url}: {msg}", key=key)

    # -- the Store interface ------------------------------------------------------

    def _full(self, key: str) -> str:
        return self._prefix + check_key(key)

    def _put_args(self, key: str, data: bytes) -> dict[str, Any]:
        # Content-MD5: S3 requires it (or a checksum) for Object Lock puts, and it gets
        # the bytes verified end to end on every put.
        md5 = hashlib.md5(data, usedforsecurity=False).digest()
        args: dict[str, Any] = {
            "Bucket": self.bucket, "Key": self._full(key), "Body": data,
            "IfNoneMatch": "*", "ContentMD5": base64.b64encode(md5).decode(),
        }
        lock = self.config.object_lock
        if lock is not None:
            args["ObjectLockMode"] = lock.mode
            args["ObjectLockRetainUntilDate"] = dt.datetime.now(dt.UTC) + dt.timedelta(
                days=lock.retain_days
            )
        return args

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        args = self._put_args(key, bytes(data))
        attempts = 0

        async def put() -> bool:
            nonlocal attempts
            attempts += 1
            return await self._create(args)

        created = await self._retrying("put", key, put)
        if created or attempts == 1:
            return created
        # An earlier attempt may have been written and only its answer lost; then the
        # object holding our exact bytes is our own write, not another writer's.
        return await self.get(key) == bytes(data)

    async def _create(self, args: dict[str, Any]) -> bool:
        """One conditional PUT: False when the key exists (412)."""
        try:
            await self._c.put_object(**args)
        except ClientError as e:
            if _code(e) == "PreconditionFailed" or _status(e) == 412:
                return False
            raise
        return True

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
                yield full[len(self._prefix):]
            if not page.get("IsTruncated"):
                return
            args["KeyMarker"] = page["NextKeyMarker"]
            args["VersionIdMarker"] = page.get("NextVersionIdMarker")
            if not args["VersionIdMarker"]:
                args.pop("VersionIdMarker")

    async def check_create_if_absent(self, probe_key: str) -> None:
        """Fencing rests on `If-None-Match: *`: prove the endpoint refuses a second create
        (probe objects carry no Object Lock, so they can be removed again)."""

        async def put(key: str, data: bytes) -> bool:
            args = {k: v for k, v in self._put_args(key, data).items()
                    if not k.startswith("ObjectLock")}

            return await self._retrying("put", key, lambda: self._create(args))

        await probe_create_if_absent(self, probe_key, put)

    async def list(
        self, prefix: str, start_after: str | None = None, limit: int | None = None
    ) -> AsyncIterator[str]:
        check_prefix(prefix)
        remaining = limit
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._prefix + prefix}
        if start_after:
            args["StartAfter"] = self._prefix + start_after
        while remaining is None or remaining > 0:
            args["MaxKeys"] = min(1000, remaining if remaining is not None else 1000)
            page = await self._retrying(
                "list", prefix, functools.partial(self._c.list_objects_v2, **args)
            )
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self._prefix) :]
            if remaining is not None:
                remaining -= len(page.get("Contents", []))
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]
            args.pop("StartAfter", None)
