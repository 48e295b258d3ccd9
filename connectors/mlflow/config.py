"""Typed config of the MLflow connector: the primary registry `ship` watches (source) and
the standby registry `apply` writes (sink)."""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from drstream.daemon.blobs import MAX_CHUNK
from drstream.daemon.plugins import MAX_SECONDS, ConnectorConfig, ListenAddress, SinkConfig
from drstream.daemon.secrets import SECRET_REF_HELP, is_secret_ref

NAME_RE = r"^[A-Za-z0-9._-]{1,64}$"
DEFAULT_INTERVAL_S = 30.0
DEFAULT_CHUNK_BYTES = 8 << 20
MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = MAX_CHUNK  # a chunk is one blob
DEFAULT_REQUEST_TIMEOUT_S = 60.0
DEFAULT_WEBHOOK_LISTEN = "127.0.0.1:0"
DEFAULT_WEBHOOK_TOLERANCE_S = 300.0
DEFAULT_ARTIFACT_PREFIX = "drstream"


def _secret_ref(value: str) -> str:
    if not is_secret_ref(value):
        raise ValueError(f"must be {SECRET_REF_HELP}")
    return value


SecretRef = Annotated[str, AfterValidator(_secret_ref)]


def _http_url(value: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError("must be an http:// or https:// URL of the tracking server")
    return value.rstrip("/")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSelection(_Strict):
    """Registered-model names chosen by full-match regexes (default: every model)."""

    include: list[str] = Field(default_factory=lambda: [".*"])
    exclude: list[str] = Field(default_factory=list)

    @field_validator("include", "exclude")
    @classmethod
    def _regexes(cls, patterns: list[str]) -> list[str]:
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"[{i}] {pattern!r} is not a valid regular expression: {e}") \
                    from e
        return patterns

    def matches(self, name: str) -> bool:
        if any(re.fullmatch(p, name) for p in self.exclude):
            return False
        return any(re.fullmatch(p, name) for p in self.include)


class WebhookConfig(_Strict):
    """Receive MLflow webhooks (a latency hint: reconcile at once on a valid one)."""

    listen: ListenAddress = Field(DEFAULT_WEBHOOK_LISTEN,
                                  description="host:port to listen on (port 0: any free port)")
    secret: SecretRef = Field(description="HMAC secret shared with the registry's webhook")
    tolerance_s: float = Field(DEFAULT_WEBHOOK_TOLERANCE_S, gt=0, le=86400,
                               description="reject deliveries whose timestamp is older")
    public_url: str | None = Field(
        None, description="URL the registry posts to (default http://<listen>/webhook)")

    @field_validator("public_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value)


class _Section(ConnectorConfig):
    """What a source and a sink both say of the registry they talk to."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["mlflow"]
    region: str | None = Field(None, description="where the registry runs (allowed_regions)")
    tracking_uri: str = Field(description="http(s) URL of the registry's tracking server")
    token: SecretRef | None = Field(None, description="bearer token, by reference")
    request_timeout_s: float = Field(DEFAULT_REQUEST_TIMEOUT_S, gt=0, le=MAX_SECONDS)

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return _http_url(value)


class MlflowSourceConfig(_Section):
    name: str = Field("primary", pattern=NAME_RE,
                      description="registry name; the stream is 'mlflow:<name>'")
    interval_s: float = Field(DEFAULT_INTERVAL_S, gt=0, le=86400,
                              description="reconcile the whole registry this often")
    chunk_bytes: int = Field(DEFAULT_CHUNK_BYTES, ge=MIN_CHUNK_BYTES, le=MAX_CHUNK_BYTES,
                             description="artifact files are shipped in blobs of this size")
    models: ModelSelection = Field(default_factory=lambda: ModelSelection.model_validate({}))
    webhook: WebhookConfig | None = None

    @property
    def stream(self) -> str:
        return f"mlflow:{self.name}"


class MlflowSinkConfig(_Section, SinkConfig):
    name: str = Field("standby", pattern=NAME_RE, description="this registry's name")
    source: str = Field("mlflow:primary", description="the stream in the log to apply")
    artifact_prefix: str = Field(DEFAULT_ARTIFACT_PREFIX, pattern=r"^[A-Za-z0-9._/-]{1,200}$",
                                 description="where replicated artifacts go in the standby's "
                                             "artifact store")
