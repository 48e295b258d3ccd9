"""What the Kafka source, sink and the operator commands share: client config (one way
for every client to get its cluster's properties and secrets), provenance headers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import KafkaException, Producer

from drstream.daemon.logging import library_logger
from drstream.daemon.secrets import read_secret

# Applied records carry where they came from, so a reverse flow never loops them back and
# group offsets can be translated exactly (by binary search over the standby partition).
ORIGIN_HEADER = "drstream.origin"
SOURCE_OFFSET_HEADER = "drstream.offset"

# librdkafka's answers (message texts): to a property name it does not know, and to a
# client it cannot build from properties that are each fine (they are checked together)
_UNKNOWN_PROPERTY = "No such configuration property"
_CANNOT_BUILD = "Failed to create"
# A client built only to check properties: no broker, no log lines (syslog level 0)
_CHECK_BASE = {"bootstrap.servers": "", "log_level": 0}


class ClientSettings(Protocol):
    @property
    def bootstrap_servers(self) -> str: ...
    @property
    def properties(self) -> dict[str, str | int | float | bool]: ...
    @property
    def secret_properties(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class Cluster:
    """Client settings of a cluster that no config section describes (a test's, a
    benchmark's): an address and, optionally, properties."""

    bootstrap_servers: str
    properties: dict[str, str | int | float | bool] = field(default_factory=dict)
    secret_properties: dict[str, str] = field(default_factory=dict)


def client_config(config: ClientSettings) -> dict[str, Any]:
    """The librdkafka config of a cluster: its address, `properties`, the resolved
    `secret_properties`, and its log lines routed through structlog."""
    conf: dict[str, Any] = {"bootstrap.servers": config.bootstrap_servers, **config.properties}
    for key, ref in config.secret_properties.items():
        conf[key] = read_secret(ref, f"secret_properties.{key}")
    conf["logger"] = library_logger("librdkafka")
    return conf


def _check(conf: Mapping[str, Any]) -> str | None:
    """librdkafka's objection to `conf` (checked by building a client that connects to
    nothing), or None."""
    try:
        Producer({**_CHECK_BASE, **conf})
    except KafkaException as e:
        err = e.args[0] if e.args else e
        return str(err.str() if hasattr(err, "str") else err)
    return None


def property_errors(props: Mapping[str, Any], *, secret: bool) -> list[str]:
    """What librdkafka says about each property, one message per bad key. Secret
    properties are given by reference, so only their names can be checked here."""
    errors = []
    for key, value in props.items():
        reason = _check({key: "x" if secret else value})
        if reason is None or reason.startswith(_CANNOT_BUILD):
            continue  # a name and value librdkafka takes; combined_error checks the rest
        if not secret or _UNKNOWN_PROPERTY in reason:
            errors.append(f"{key}: {reason}")
    return errors


def combined_error(props: Mapping[str, Any], secret_props: Mapping[str, str]) -> str | None:
    """What librdkafka says about the properties together (ssl.* files are read only with
    an SSL protocol, SASL PLAIN wants its password): secrets take a placeholder where any
    value will do."""
    conf = dict(props)
    conf.update({k: "x" for k in secret_props if _check({k: "x"}) is None})
    return _check(conf) if conf else None
