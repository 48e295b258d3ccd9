"""The MLflow example config names every key of the MLflow source and sink."""

from __future__ import annotations

from pathlib import Path

import yaml

from drstream.connectors.mlflow.config import MlflowSinkConfig, MlflowSourceConfig, WebhookConfig
from drstream.daemon.config import load_config

EXAMPLE = Path(__file__).parents[2] / "configs" / "mlflow-dr.yaml"


def test_mlflow_example_shows_every_key() -> None:
    cfg = load_config(EXAMPLE)
    assert [s.type for s in cfg.sources] == ["mlflow"]
    assert [s.type for s in cfg.sinks] == ["mlflow"]
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert set(doc["sources"][0]) == set(MlflowSourceConfig.model_fields)
    assert set(doc["sources"][0]["webhook"]) == set(WebhookConfig.model_fields)
    assert set(doc["sinks"][0]) == set(MlflowSinkConfig.model_fields)
