"""Every example in configs/ validates, and the full example names every config key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from drstream.daemon.config import ApplyConfig, Config, LoggingConfig, ShipConfig, load_config
from drstream.daemon.plugins import installed

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_validates(path: Path) -> None:
    load_config(path)


def test_single_host_example_shows_every_key() -> None:
    doc = yaml.safe_load((Path(__file__).parents[2] / "configs" / "single-host.yaml").read_text())
    assert set(doc) == set(Config.model_fields)
    assert set(doc["ship"]) == set(ShipConfig.model_fields)
    assert set(doc["apply"]) == set(ApplyConfig.model_fields)
    assert set(doc["logging"]) == set(LoggingConfig.model_fields)
    assert set(doc["store"]) == set(installed().stores["file"].config_model.model_fields)
    from drstream.connectors.kafka.config import KafkaSinkConfig, KafkaSourceConfig

    assert set(doc["sources"][0]) == set(KafkaSourceConfig.model_fields)
    assert set(doc["sinks"][0]) == set(KafkaSinkConfig.model_fields)
    for kind in ("s3", "gcs", "azure"):
        path = Path(__file__).parents[2] / "configs" / f"ship-primary-{kind}.yaml"
        example = yaml.safe_load(path.read_text())
        assert set(example["store"]) == set(installed().stores[kind].config_model.model_fields)


def test_datasets_example_shows_every_source_and_sink_key() -> None:
    doc = yaml.safe_load((Path(__file__).parents[2] / "configs" / "datasets-s3.yaml").read_text())
    assert set(doc["sources"][0]) == set(installed().sources["s3"].config_model.model_fields)
    assert set(doc["sinks"][0]) == set(installed().sinks["s3"].config_model.model_fields)


@pytest.mark.parametrize("kind", ["gcs", "azure"])
def test_cloud_datasets_examples_show_every_source_key(kind: str) -> None:
    path = Path(__file__).parents[2] / "configs" / f"datasets-{kind}.yaml"
    doc = yaml.safe_load(path.read_text())
    assert set(doc["sources"][0]) == set(installed().sources[kind].config_model.model_fields)
    assert doc["sinks"][0]["source"] == f"{kind}:datasets"
