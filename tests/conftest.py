"""Shared fixtures: real services come from tests/infra (never mocks)."""

pytest_plugins = [
    "tests.infra.emulator_fixtures",
    "tests.infra.kafka_fixtures",
    "tests.infra.mlflow_fixtures",
    "tests.infra.s3_fixtures",
]
