"""Connectors are imported only when a config (or a command) uses them: a Kafka-to-Kafka
config over the file store never imports the S3 or MLflow connector (their imports cost
about 0.2 s at every start, and aiobotocore's and MLflow's client memory)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from drstream.connectors import file as file_connector
from drstream.connectors import kafka as kafka_connector
from drstream.daemon.config import parse_config
from drstream.daemon.errors import ConfigError, DrstreamError
from drstream.daemon.plugins import Connector, Connectors

CONFIG = {
    "log_id": "east-1",
    "store": {"type": "file", "path": "/var/lib/drstream/log"},
    "keyring": {"active": "k1", "keys": {"k1": "env:DRSTREAM_KEY"}},
    "sources": [{"type": "kafka", "name": "primary", "bootstrap_servers": "p:9092",
                 "topics": {"include": ["orders"]}}],
    "sinks": [{"type": "kafka", "name": "standby", "bootstrap_servers": "s:9092"}],
}


def counting(loads: list[str], name: str, connector: Connector) -> object:
    def load() -> Connector:
        loads.append(name)
        return connector
    return load


def registry(loads: list[str]) -> Connectors:
    return Connectors(lazy={
        "file": counting(loads, "file", file_connector.CONNECTOR),
        "kafka": counting(loads, "kafka", kafka_connector.CONNECTOR),
        "spare": counting(loads, "spare", Connector(name="spare")),
    })


def test_a_config_loads_only_the_connectors_it_names() -> None:
    loads: list[str] = []
    config = parse_config(CONFIG, connectors=registry(loads))
    assert sorted(loads) == ["file", "kafka"]
    assert config.connectors.kind_of("kafka:primary") is not None
    assert sorted(loads) == ["file", "kafka"]


def test_an_unknown_type_lists_every_connectors_types() -> None:
    loads: list[str] = []
    with pytest.raises(ConfigError) as e:
        parse_config({**CONFIG, "store": {"type": "nfs"}}, connectors=registry(loads))
    assert "unknown type; valid: file (got 'nfs')" in str(e.value)
    assert sorted(loads) == ["file", "kafka", "spare"]


def test_an_entry_point_that_is_no_connector_is_refused() -> None:
    reg = Connectors(lazy={"bad": lambda: object()})
    with pytest.raises(DrstreamError, match=r"connector 'bad' .* is not a Connector"):
        reg.connector("bad")


def test_ship_and_apply_import_neither_s3_nor_mlflow(tmp_path: Path) -> None:
    """What `drstream ship|apply --config F` imports before it connects, in a fresh
    interpreter over the installed entry points."""
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(CONFIG))  # JSON is YAML
    probe = (
        "import sys\n"
        "from drstream.daemon.cli import build_parser\n"
        "from drstream.daemon.config import load_config\n"
        "from drstream.daemon.plugins import installed\n"
        "build_parser(installed(), stream_options=False).parse_args("
        f"['ship', '--config', {str(path)!r}])\n"
        f"load_config({str(path)!r})\n"
        "print(sorted({m.split('.')[2] for m in sys.modules "
        "if m.startswith('drstream.connectors.')}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "['file', 'kafka']", out.stdout + out.stderr
