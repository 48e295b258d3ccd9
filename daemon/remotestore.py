"""What the S3, GCS and Azure Blob store connectors share: the config fields of a
bucket-like store over HTTP (prefix, endpoint, bounded retries, timeouts), the retry loop
that turns library errors into StoreError / StoreUnavailableError at the connector edge,
the error messages, create-if-absent that survives a lost answer, and the
`start_after`/`limit` walk of a listing.

Retries are ours, never a library's: one attempt is bounded by `request_timeout_s` (it
covers a stalled upload, which a read timeout does not), throttling, 5xx, timeouts and
broken connections are retried with capped, jittered back-off, and what a retry cannot
fix (credentials, permissions, a missing bucket) raises StoreError at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ClassVar, Generic, TypeVar, cast
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drstream.daemon.errors import ConfigFieldError, StoreError, StoreUnavailableError
from drstream.daemon.lifecycle import Starting
from drstream.daemon.logging import get_logger
from drstream.daemon.plugins import MAX_SECONDS, ConnectorConfig
from drstream.daemon.retry import Backoff, retrying
from drstream.daemon.secrets import SECRET_REF_HELP, is_secret_ref
from drstream.daemon.store import Store, check_key, check_prefix, probe_create_if_absent

log = get_logger(__name__)
T = TypeVar("T")
C = TypeVar("C", bound=ConnectorConfig)

# HTTP answers that a later attempt may not get: timeout, throttling, server trouble.
RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def http_endpoint(v: str | None) -> str | None:
    """An endpoint is an http(s) URL; kept without its trailing slash."""
    if v is not None and not v.startswith(("http://", "https://")):
        raise ValueError(f"endpoint_url {v!r} must start with http:// or https://")
    return v.rstrip("/") if v else v


class CloudStoreConfig(ConnectorConfig):
    """Fields every HTTP object store has; the store's own model adds where and who."""

    prefix: str = ""
    # None: the service's public endpoint; set it for an emulator or a private endpoint.
    endpoint_url: str | None = None
    max_attempts: int = Field(default=6, ge=1, le=100)
    backoff_base_s: float = Field(default=0.2, gt=0, le=MAX_SECONDS)
    backoff_max_s: float = Field(default=10.0, gt=0, le=MAX_SECONDS)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=MAX_SECONDS)
    # Hard limit for one attempt, whatever stalls (an upload the server stops reading).
    request_timeout_s: float = Field(default=300.0, gt=0, le=MAX_SECONDS)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.strip("/")
        if v:
            try:
                check_key(v)
            except StoreError as e:
                raise ValueError(str(e).replace("object key", "prefix")) from None
        return v

    _endpoint = field_validator("endpoint_url")(http_endpoint)

    @model_validator(mode="after")
    def _backoff(self) -> CloudStoreConfig:
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must be >= backoff_base_s")
        return self


class RetentionConfig(BaseModel):
    """Write-once retention every object written gets (retain-until = now + retain_days,
    on a bucket that has it enabled); the store's own model adds the modes it knows."""

    model_config = ConfigDict(extra="forbid")

    retain_days: int = Field(gt=0, le=36500)


def secret_ref(v: str | None) -> str | None:
    """A credential field holds a reference, never the secret: the message carries
    SECRET_REF_HELP so the config loader hides the value."""
    if v is not None and not is_secret_ref(v):
        raise ValueError(f"must be {SECRET_REF_HELP}")
    return v


def split_url(url: str, scheme: str, expected: str) -> SplitResult:
    """`url`'s parts once it is `scheme://host/...` with no credentials, query or fragment;
    else ConfigFieldError naming the `store` option and what was `expected`."""
    parts = urlsplit(url)
    if "@" in parts.netloc:  # never echo a URL that may embed credentials
        raise ConfigFieldError("store", f"{scheme}://(hidden)", "credentials do not go in the URL")
    if parts.scheme != scheme or not parts.netloc or parts.query or parts.fragment:
        raise ConfigFieldError("store", url, f"expected {expected}")
    return parts


def config_from_url(model: type[C], url: str, fields: dict[str, object]) -> C:
    """Validate a URL's fields as `model`, a failure naming the `store` option and URL."""
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        reason = "; ".join(str(err["msg"]).removeprefix("Value error, ") for err in e.errors())
        raise ConfigFieldError("store", url, reason) from None


S = TypeVar("S", bound=CloudStoreConfig)
K = TypeVar("K")  # the library's client


class Transient(Exception):
    """An attempt that may succeed when tried again; its __cause__ is what failed."""


class Refusal(enum.Enum):
    """Why a request failed for good, for its message."""

    MISSING = "missing"  # the bucket or container itself
    CREDENTIALS = "credentials"
    DENIED = "denied"
    FAILED = "failed"


def _what(op: str, key: str | None) -> str:
    return f"{op} {key!r}" if key is not None else op


class RemoteStore(Starting, Generic[S, K]):
    """A Store over one bucket (or container) and name prefix of an HTTP object store.

    A subclass opens its library's client in `_connect` (entering into `self._opened`
    what close() must release), makes one request in its hooks (`_create_once`, `_names`,
    `_versions`, and the reads) and says what a library error of one attempt is
    (`_attempt_error`, `_service_error`); this class runs every attempt under the retries,
    words the errors and holds the parts of the Store interface that are the same
    everywhere."""

    CREDENTIAL_FIELDS: ClassVar[str]  # the config fields to check when they are rejected
    RETENTION: ClassVar[str]  # what, besides a missing permission, can forbid a delete

    def __init__(self, config: S, url: str, endpoint: str, place: str) -> None:
        self.config = config
        self.url = url
        self.endpoint = endpoint
        self.place = place  # e.g. "bucket 'b'", for messages
        self._prefix = config.prefix + "/" if config.prefix else ""
        self._started = False
        self._client: K | None = None  # set by _connect
        self._opened = contextlib.AsyncExitStack()  # what _connect opened, however far

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url} at {self.endpoint})"

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and check the bucket (a second call while open does nothing)."""
        if self._started:
            return
        self._started = True
        try:
            await self._connect()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self._started = False
        self._client = None
        opened, self._opened = self._opened, contextlib.AsyncExitStack()
        await opened.aclose()

    async def _connect(self) -> None:
        """Open the client and fail, clearly, on a missing bucket or refused credentials."""
        raise NotImplementedError

    @property
    def key_prefix(self) -> str:
        """What every key of this store starts with in the bucket ("" or "prefix/")."""
        return self._prefix

    def _full(self, key: str) -> str:
        return self._prefix + check_key(key)

    def _key(self, name: str) -> str:
        return name[len(self._prefix):]

    @property
    def _c(self) -> K:
        if self._client is None:
            raise StoreError(f"store {self.url} is not open (use 'async with')")
        return self._client

    # -- errors ----------------------------------------------------------------------

    def _missing(self) -> str:
        return f"{self.place} does not exist at {self.endpoint}"

    def _refused(self, op: str, key: str | None, why: Refusal, detail: str) -> StoreError:
        """The StoreError of a request that failed for good; `detail` is the service's
        error code or message."""
        if why is Refusal.MISSING:
            msg = self._missing()
        elif why is Refusal.CREDENTIALS:
            msg = (f"credentials rejected by {self.endpoint} for {self.place} ({detail}); "
                   f"check {self.CREDENTIAL_FIELDS}")
        elif why is Refusal.DENIED:
            msg = (f"access denied: {_what(op, key)} in {self.place} ({detail}; missing "
                   f"permission, or {self.RETENTION} forbids it)")
        else:
            msg = f"{_what(op, key)} in {self.place} failed: {detail}"
        return StoreError(f"store {self.url}: {msg}", key=key)

    @classmethod
    def _describe(cls, e: BaseException | None) -> str:
        """One line for an attempt's error, in retry logs and the final message."""
        return cls._service_error(e) or f"{type(e).__name__}: {str(e)[:200]}"

    @staticmethod
    def _service_error(e: BaseException | None) -> str | None:
        """The service's own words for an error answer (status, code, message); None
        for any other error."""
        return None

    def _attempt_error(self, op: str, key: str | None, e: Exception) -> Exception | None:
        """What a library error of one attempt becomes: Transient (try again), a
        StoreError, or None (raise it as it is)."""
        return None

    # -- retries ---------------------------------------------------------------------

    async def _retrying(self, op: str, key: str | None, call: Callable[[], Awaitable[T]]) -> T:
        """`call` under the store's back-off, each attempt bounded by request_timeout_s;
        StoreUnavailableError naming the key when the retries run out."""
        c = self.config

        async def attempt() -> T:
            try:
                async with asyncio.timeout(c.request_timeout_s):
                    return await call()
            except TimeoutError as e:
                raise Transient(e) from e
            except Exception as e:
                mapped = self._attempt_error(op, key, e)
                if mapped is None:
                    raise
                raise mapped from e

        def on_retry(e: Exception, n: int, delay: float) -> None:
            log.warning("store_retry", store=self.url, op=op, key=key, attempt=n,
                        delay_s=round(delay, 3), error=self._describe(e.__cause__))

        backoff = Backoff(c.backoff_base_s, c.backoff_max_s, attempts=c.max_attempts)
        try:
            return await retrying(attempt, backoff, on_retry=on_retry,
                                  retriable=lambda e: isinstance(e, Transient))
        except Transient as e:
            raise StoreUnavailableError(
                f"store {self.url} at {self.endpoint} unavailable: {_what(op, key)} failed "
                f"after {c.max_attempts} attempts; last error {self._describe(e.__cause__)}",
                # explicit: StoreError.__init__'s retriable=False default overrides the class's
                key=key, retriable=True,
            ) from e.__cause__

    # -- create-if-absent ------------------------------------------------------------

    def _create_once(self, key: str, data: bytes, retain: bool) -> Callable[[], Awaitable[bool]]:
        """One attempt at creating `key` unless it exists (False then), with the object's
        retention unless `retain` is False; what it sends is prepared once, here."""
        raise NotImplementedError

    async def _create(self, key: str, data: bytes, retain: bool = True) -> tuple[bool, int]:
        """One create-if-absent under retries: (created, attempts made)."""
        create = self._create_once(key, data, retain)
        attempts = 0

        async def attempt() -> bool:
            nonlocal attempts
            attempts += 1
            return await create()

        return await self._retrying("put", key, attempt), attempts

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        data = bytes(data)
        created, attempts = await self._create(key, data)
        if created or attempts == 1:
            return created
        # An earlier attempt may have been written and only its answer lost; then the
        # object holding our exact bytes is our own write, not another writer's.
        return await self.get(key) == data

    async def check_create_if_absent(self, probe_key: str) -> None:
        """Fencing rests on the conditional create: prove the endpoint refuses a second
        one (probe objects carry no retention, so they can be removed again)."""

        async def put(key: str, data: bytes) -> bool:
            return (await self._create(key, data, retain=False))[0]

        # a subclass is a whole Store; this class holds only the parts they share
        await probe_create_if_absent(cast(Store, self), probe_key, put)

    async def get(self, key: str, max_bytes: int | None = None) -> bytes | None:
        raise NotImplementedError

    # -- listings --------------------------------------------------------------------

    def _names(self, prefix: str, start_after: str | None, limit: int | None
               ) -> AsyncIterator[str]:
        """Full object names under `prefix` in order, from `start_after` (inclusive or
        not: `list` skips it); `limit` is how many the caller wants at most, a page-size
        hint."""
        raise NotImplementedError

    async def list(
        self, prefix: str, start_after: str | None = None, limit: int | None = None
    ) -> AsyncIterator[str]:
        check_prefix(prefix)
        remaining = limit
        if remaining is not None and remaining <= 0:
            return
        async for name in self._names(prefix, start_after, limit):
            key = self._key(name)
            if start_after is not None and key <= start_after:
                continue
            yield key
            if remaining is not None:
                remaining -= 1
                if remaining == 0:
                    return

    def _versions(self, prefix: str, start_after: str | None
                  ) -> AsyncIterator[tuple[str, bool]]:
        """(full name, current) of every version of every object under `prefix`."""
        raise NotImplementedError

    async def hidden(self, prefix: str, start_after: str | None = None) -> AsyncIterator[str]:
        """Names with earlier versions but no current one: deleted in a versioned bucket,
        but restorable (and still there to see). None where versioning is off."""
        check_prefix(prefix)
        live: dict[str, bool] = {}
        async for name, current in self._versions(prefix, start_after):
            live[name] = live.get(name, False) or current
        for name in sorted(n for n, is_live in live.items() if not is_live):
            key = self._key(name)
            if start_after is None or key > start_after:
                yield key
