"""Config of the MLflow connector: defaults, bounds, secrets by reference, the daemon's
config file with an mlflow source."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from drstream.connectors.mlflow.config import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_INTERVAL_S,
    MlflowSinkConfig,
    MlflowSourceConfig,
)
from drstream.daemon.config import parse_config
from drstream.daemon.errors import ConfigError

BASE = {"type": "mlflow", "tracking_uri": "http://mlflow.internal:5000/"}


def source(**kw: Any) -> MlflowSourceConfig:
    return MlflowSourceConfig.model_validate({**BASE, **kw})


def test_source_defaults() -> None:
    c = source()
    assert c.stream == "mlflow:primary" and c.tracking_uri == "http://mlflow.internal:5000"
    assert (c.interval_s, c.chunk_bytes, c.webhook, c.token) == (
        DEFAULT_INTERVAL_S, DEFAULT_CHUNK_BYTES, None, None)
    assert c.models.matches("anything")


def test_selection_and_webhook() -> None:
    c = source(name="eu", models={"include": ["fraud-.*", "churn"], "exclude": ["fraud-tmp.*"]},
               webhook={"secret": "env:WH_SECRET", "listen": "0.0.0.0:8088",
                        "public_url": "https://drs.example.com/webhook"})
    assert c.stream == "mlflow:eu"
    assert c.models.matches("fraud-x") and c.models.matches("churn")
    assert not c.models.matches("fraud-tmp1") and not c.models.matches("churn2")
    assert c.webhook is not None and c.webhook.tolerance_s == 300


@pytest.mark.parametrize("bad", [
    {"chunk_bytes": 1024}, {"chunk_bytes": (16 << 20) + 1}, {"interval_s": 0},
    {"tracking_uri": "file:///tmp/mlruns"}, {"token": "plaintext-token"},
    {"webhook": {"secret": "hunter2"}}, {"webhook": {"secret": "env:X", "listen": "8080"}},
    {"models": {"include": ["("]}}, {"unknown": 1}, {"name": "has space"},
])
def test_source_rejects(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        source(**bad)


def test_sink_defaults_and_rejects() -> None:
    s = MlflowSinkConfig.model_validate(BASE)
    assert (s.name, s.source, s.artifact_prefix, s.request_timeout_s) == (
        "standby", "mlflow:primary", "drstream", 60.0)
    with pytest.raises(ValidationError):
        MlflowSinkConfig.model_validate({**BASE, "token": "raw"})
    with pytest.raises(ValidationError):
        MlflowSinkConfig.model_validate({**BASE, "extra": True})


def test_daemon_config_with_mlflow_source(tmp_path: Any) -> None:
    doc = {"log_id": "reg", "store": {"type": "file", "path": str(tmp_path)},
           "keyring": {"active": "k1", "keys": {"k1": "env:K1"}},
           "sources": [{**BASE, "interval_s": 5, "webhook": {"secret": "env:WH"}}]}
    cfg = parse_config(doc)
    assert isinstance(cfg.sources[0], MlflowSourceConfig)
    bad = {**doc, "sources": [{**BASE, "token": "s3cr3t-value"}]}
    with pytest.raises(ConfigError) as err:
        parse_config(bad)
    assert "sources[0].token" in str(err.value) and "s3cr3t-value" not in str(err.value)
