"""What the Kafka source and sink share: client config, provenance headers."""

from __future__ import annotations

from typing import Any, Protocol

from drstream.daemon.secrets import read_secret

# Applied records carry where they came from, so a reverse flow never loops them back and
# group offsets can be translated exactly (by binary search over the standby partition).
ORIGIN_HEADER = "drstream.origin"
SOURCE_OFFSET_HEADER = "drstream.offset"


class ClientSettings(Protocol):
    @property
    def bootstrap_servers(self) -> str: ...
    @property
    def properties(self) -> dict[str, str | int | float | bool]: ...
    @property
    def secret_properties(self) -> dict[str, str]: ...


def client_config(config: ClientSettings) -> dict[str, Any]:
    conf: dict[str, Any] = {"bootstrap.servers": config.bootstrap_servers, **config.properties}
    for key, ref in config.secret_properties.items():
        conf[key] = read_secret(ref, f"secret_properties.{key}")
    return conf
