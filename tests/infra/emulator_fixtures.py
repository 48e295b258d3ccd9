"""GCS and Azure fixtures: one emulator process each per test session, a fresh bucket or
container per test. An emulator that cannot start fails the run; it is never skipped."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TypeVar

import pytest

from tests.infra.emulators import (
    AZURE_KEY_ENV,
    AZURITE_KEY,
    AzuriteServer,
    FakeGcsServer,
    unique_name,
)
from tests.infra.procs import attach_log_tails

_started: list[FakeGcsServer | AzuriteServer] = []
S = TypeVar("S", FakeGcsServer, AzuriteServer)


def _running(server: S) -> Iterator[S]:
    """The session's server: started, remembered for the leftover check, stopped at the end."""
    server.start()
    _started.append(server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs() -> Iterator[FakeGcsServer]:
    yield from _running(FakeGcsServer("fake-gcs"))


@pytest.fixture
def gcs_bucket(gcs: FakeGcsServer) -> Iterator[str]:
    """A new, uniquely named, empty bucket (no versioning, like s3_bucket); its objects and
    itself are removed after the test."""
    name = gcs.create_bucket(unique_name())
    yield name
    if gcs.alive():
        gcs.delete_bucket(name)


@pytest.fixture(scope="session")
def azurite() -> Iterator[AzuriteServer]:
    yield from _running(AzuriteServer("azurite"))


@pytest.fixture
def azure_container(azurite: AzuriteServer) -> Iterator[str]:
    name = azurite.create_container(unique_name())
    yield name
    if azurite.alive():
        azurite.delete_container(name)


@pytest.fixture
def azure_creds_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set the env variable that AzuriteServer.store_fields() configs reference."""
    monkeypatch.setenv(AZURE_KEY_ENV, AZURITE_KEY)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure of a test using an emulator, attach the tail of its log."""
    report = yield
    attach_log_tails(report, item, {"gcs", "gcs_bucket", "azurite", "azure_container"},
                     _started, "emulator")
    return report
