"""What the GCS and Azure Blob store connectors share: the config fields of a bucket-like
store over HTTP (prefix, endpoint, bounded retries, timeouts) and the retry loop that turns library
errors into StoreError / StoreUnavailableError at the connector edge.

Retries are ours, never a library's: one attempt is bounded by `request_timeout_s` (it
covers a stalled upload, which a read timeout does not), throttling, 5xx, timeouts and
broken connections are retried with capped, jittered back-off, and what a retry cannot
fix (credentials, permissions, a missing bucket) raises StoreError at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator

from drstream.daemon.errors import ConfigFieldError, StoreError, StoreUnavailableError
from drstream.daemon.logging import get_logger
from drstream.daemon.plugins import ConnectorConfig
from drstream.daemon.retry import Backoff, retrying
from drstream.daemon.secrets import SECRET_REF_HELP, is_secret_ref
from drstream.daemon.store import check_key

log = get_logger(__name__)
T = TypeVar("T")
C = TypeVar("C", bound=ConnectorConfig)

# HTTP answers that a later attempt may not get: timeout, throttling, server trouble.
RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class CloudStoreConfig(ConnectorConfig):
    """Fields every HTTP object store has; the store's own model adds where and who."""

    prefix: str = ""
    # None: the service's public endpoint; set it for an emulator or a private endpoint.
    endpoint_url: str | None = None
    max_attempts: int = Field(default=6, ge=1, le=100)
    backoff_base_s: float = Field(default=0.2, gt=0)
    backoff_max_s: float = Field(default=10.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Hard limit for one attempt, whatever stalls (an upload the server stops reading).
    request_timeout_s: float = Field(default=300.0, gt=0)

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

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url {v!r} must start with http:// or https://")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _backoff(self) -> CloudStoreConfig:
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must be >= backoff_base_s")
        return self


def secret_ref(v: str | None) -> str | None:
    """A credential field holds a reference, never the secret: the message carries
    SECRET_REF_HELP so the config loader hides the value."""
    if v is not None and not is_secret_ref(v):
        raise ValueError(f"must be {SECRET_REF_HELP}")
    return v


def config_from_url(model: type[C], url: str, fields: dict[str, object]) -> C:
    """Validate a URL's fields as `model`, a failure naming the `store` option and URL."""
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        reason = "; ".join(str(err["msg"]).removeprefix("Value error, ") for err in e.errors())
        raise ConfigFieldError("store", url, reason) from None


class Transient(Exception):
    """An attempt that may succeed when tried again; its __cause__ is what failed."""


async def with_retries(
    config: CloudStoreConfig, store_url: str, endpoint: str, op: str, key: str | None,
    attempt: Callable[[], Awaitable[T]], describe: Callable[[BaseException | None], str],
) -> T:
    """`attempt` (which raises Transient for what may pass, StoreError for what cannot)
    under the store's back-off; StoreUnavailableError naming the key when retries run out."""

    async def bounded() -> T:
        try:
            async with asyncio.timeout(config.request_timeout_s):
                return await attempt()
        except TimeoutError as e:
            raise Transient(e) from e

    def on_retry(e: Exception, n: int, delay: float) -> None:
        log.warning("store_retry", store=store_url, op=op, key=key, attempt=n,
                    delay_s=round(delay, 3), error=describe(e.__cause__))

    backoff = Backoff(config.backoff_base_s, config.backoff_max_s, attempts=config.max_attempts)
    try:
        return await retrying(bounded, backoff, on_retry=on_retry,
                              retriable=lambda e: isinstance(e, Transient))
    except Transient as e:
        what = f"{op} {key!r}" if key is not None else op
        raise StoreUnavailableError(
            f"store {store_url} at {endpoint} unavailable: {what} failed after "
            f"{config.max_attempts} attempts; last error {describe(e.__cause__)}",
            key=key, retriable=True,
        ) from e.__cause__
