"""The MLflow sink has a handler for every registry event type the log can carry."""

from __future__ import annotations

from drstream.connectors.mlflow.config import MlflowSinkConfig
from drstream.connectors.mlflow.events import EVENT_FIELDS
from drstream.connectors.mlflow.sink import MlflowSink
from drstream.daemon.plugins import Context


def test_every_event_type_has_a_handler() -> None:
    sink = MlflowSink(MlflowSinkConfig(type="mlflow", tracking_uri="http://127.0.0.1:9"),
                      Context(log_id="handlers"))
    assert set(sink.handlers()) == set(EVENT_FIELDS)
    assert all(callable(h) for h in sink.handlers().values())
