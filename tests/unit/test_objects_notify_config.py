"""The object source's `notifications` section: off by default, typed, unknown keys and
bad values refused naming the field path and the value."""

from __future__ import annotations

from typing import Any

import pytest

from drstream.connectors.s3.objconfig import ObjectSourceConfig
from drstream.daemon.config import parse_config
from drstream.daemon.errors import ConfigError

QUEUE = "https://sqs.eu-west-1.amazonaws.com/123456789012/ml-data-events"


def _config(notifications: Any) -> dict[str, Any]:
    source: dict[str, Any] = {"type": "s3", "bucket": "ml-data", "prefix": "dvcstore",
                              "region": "eu-west-1"}
    if notifications is not None:
        source["notifications"] = notifications
    return {"log_id": "datasets-east", "store": {"type": "file", "path": "/var/lib/log"},
            "keyring": {"active": "k1", "keys": {"k1": "env:DRSTREAM_KEY"}},
            "sources": [source],
            "sinks": [{"type": "s3", "bucket": "ml-data-standby", "prefix": "dvcstore"}]}


def _source(notifications: Any) -> ObjectSourceConfig:
    source = parse_config(_config(notifications), "test").sources[0]
    assert isinstance(source, ObjectSourceConfig)
    return source


def test_off_by_default() -> None:
    assert _source(None).notifications is None


def test_defaults_endpoint_from_the_queue_url_region_from_the_source() -> None:
    hint = _source({"sqs_queue_url": QUEUE}).notifications
    assert hint is not None
    assert hint.wait_s == 20 and hint.region is None
    assert hint.endpoint() == "https://sqs.eu-west-1.amazonaws.com"
    hint = _source({"sqs_queue_url": "http://127.0.0.1:5000/123456789012/q",
                    "endpoint_url": "https://vpce-1.sqs.eu-west-1.vpce.amazonaws.com/",
                    "region": "eu-west-1", "wait_s": 1}).notifications
    assert hint is not None
    assert hint.endpoint() == "https://vpce-1.sqs.eu-west-1.vpce.amazonaws.com"


@pytest.mark.parametrize(("notifications", "path", "value"), [
    ({"sqs_queue_url": QUEUE, "queue": "x"}, "sources[0].notifications.queue", "'x'"),
    ({}, "sources[0].notifications.sqs_queue_url", "required"),
    ({"sqs_queue_url": "sqs://ml-data-events"}, "sources[0].notifications.sqs_queue_url",
     "'sqs://ml-data-events'"),
    ({"sqs_queue_url": "https://sqs.eu-west-1.amazonaws.com/"},
     "sources[0].notifications.sqs_queue_url", "amazonaws.com/'"),
    ({"sqs_queue_url": "https://k:s@sqs.eu-west-1.amazonaws.com/1/q"},
     "sources[0].notifications.sqs_queue_url", "credentials"),
    ({"sqs_queue_url": QUEUE + "?x=1"}, "sources[0].notifications.sqs_queue_url", "query"),
    ({"sqs_queue_url": QUEUE, "wait_s": 0}, "sources[0].notifications.wait_s", "0"),
    ({"sqs_queue_url": QUEUE, "wait_s": 21}, "sources[0].notifications.wait_s", "21"),
    ({"sqs_queue_url": QUEUE, "endpoint_url": "sqs.local"},
     "sources[0].notifications.endpoint_url", "'sqs.local'"),
    ("yes", "sources[0].notifications", "'yes'"),
], ids=["unknown-key", "no-queue", "not-http", "no-path", "credentials", "query", "wait-0",
        "wait-21", "endpoint-scheme", "not-a-section"])
def test_refused_naming_field_and_value(notifications: Any, path: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(_config(notifications), "test")
    assert path in str(e.value) and value in str(e.value)
