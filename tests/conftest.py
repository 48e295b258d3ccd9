"""Shared fixtures: real services come from tests/infra (never mocks)."""

import pytest

pytest_plugins = [
    "tests.infra.emulator_fixtures",
    "tests.infra.kafka_fixtures",
    "tests.infra.mlflow_fixtures",
    "tests.infra.s3_fixtures",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true",
                     help="run the kill -9 crash tests at full length (`make soak`): more "
                          "kills per test; `make test` runs each with fewer")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `soak` (minutes each) run only under --soak: `make soak`."""
    if config.getoption("--soak"):
        return
    kept = [i for i in items if i.get_closest_marker("soak") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    """True under --soak: crash tests use their full kill counts."""
    return bool(request.config.getoption("--soak"))
