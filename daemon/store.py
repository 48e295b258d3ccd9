"""The object-store interface every log store implements, and the store registry.

Keys are '/'-separated paths relative to the store's root (the store URL's prefix).
Stores are async context managers; `open_store` builds one from its typed config.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel

from daemon.errors import ConfigFieldError, DrstreamError


@runtime_checkable
class Store(Protocol):
    url: str

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` with `data` atomically; False (and nothing written) if it exists."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The whole object, or None when it does not exist."""
        ...

    async def exists(self, key: str) -> bool: ...

    def list(
        self, prefix: str, start_after: str | None = None, limit: int | None = None
    ) -> AsyncIterator[str]:
        """Keys under `prefix`, in lexicographic order, strictly after `start_after`."""
        ...

    async def delete(self, key: str) -> None:
        """Remove `key`; absent keys are not an error."""
        ...

    async def __aenter__(self) -> Store: ...

    async def __aexit__(self, *exc: object) -> None: ...


@dataclass(frozen=True)
class StoreType:
    name: str
    config_model: type[BaseModel]
    factory: Callable[[Any], Store]
    from_url: Callable[[str], BaseModel]
    schemes: tuple[str, ...]


STORE_TYPES: dict[str, StoreType] = {}


def register_store(store_type: StoreType) -> None:
    STORE_TYPES[store_type.name] = store_type


def load_builtin_connectors() -> None:
    """Import the built-in connector packages so they register themselves."""
    import connectors.file
    import connectors.kafka
    import connectors.mlflow
    import connectors.s3  # noqa: F401


def store_config_from_url(url: str) -> BaseModel:
    load_builtin_connectors()
    scheme = url.split("://", 1)[0] if "://" in url else ""
    for st in STORE_TYPES.values():
        if scheme in st.schemes:
            return st.from_url(url)
    valid = ", ".join(sorted(f"{s}://" for t in STORE_TYPES.values() for s in t.schemes))
    raise ConfigFieldError("store", url, f"unknown store URL scheme; valid: {valid}")


def open_store(config: BaseModel) -> Store:
    load_builtin_connectors()
    name = getattr(config, "type", None)
    if not isinstance(name, str) or name not in STORE_TYPES:
        valid = ", ".join(sorted(STORE_TYPES))
        raise DrstreamError(f"unknown store type {name!r}; valid types: {valid}")
    return STORE_TYPES[name].factory(config)
