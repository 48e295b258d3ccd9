"""MLflow fixtures: a primary, a standby and a scratch tracking server, real processes.

Starting a server takes ~6-8 s on this machine (more under load), so each is shared by
the session and starts the first time a test asks for it (a test of the source alone
never starts the standby; only drills of a live flow need the scratch server). Tests use
unique model names (`mlflow_model_name`). A test
that stops the primary must start it again (`server.start()`, same port and data).
Tests that need a server of their own (kill/restart at will) use
`mlflow_server_factory`. A server that cannot start makes the test error, never skip.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator

import pytest

from tests.infra.mlflow import MlflowServer
from tests.infra.procs import attach_log_tails, unique_test_name

MLFLOW_FIXTURES = {"mlflow_primary", "mlflow_standby", "mlflow_scratch", "mlflow_server_factory"}

_running: list[MlflowServer] = []


def _finish(servers: list[MlflowServer], keep_logs: bool) -> None:
    for s in servers:
        if s in _running:
            _running.remove(s)
        if keep_logs:
            s.stop()
        else:
            s.remove()


def _session_server(request: pytest.FixtureRequest, role: str) -> Iterator[MlflowServer]:
    server = MlflowServer.start_new(f"mlflow-{role}")
    _running.append(server)
    try:
        yield server
    finally:
        _finish([server], request.session.testsfailed > 0)


@pytest.fixture(scope="session")
def _mlflow_primary_server(request: pytest.FixtureRequest) -> Iterator[MlflowServer]:
    yield from _session_server(request, "primary")


@pytest.fixture(scope="session")
def _mlflow_standby_server(request: pytest.FixtureRequest) -> Iterator[MlflowServer]:
    yield from _session_server(request, "standby")


@pytest.fixture(scope="session")
def _mlflow_scratch_server(request: pytest.FixtureRequest) -> Iterator[MlflowServer]:
    yield from _session_server(request, "scratch")


def _alive(server: MlflowServer) -> MlflowServer:
    if not server.alive():  # a test stopped it and failed before starting it again
        server.start()
    return server


@pytest.fixture
def mlflow_primary(_mlflow_primary_server: MlflowServer) -> MlflowServer:
    return _alive(_mlflow_primary_server)


@pytest.fixture
def mlflow_standby(_mlflow_standby_server: MlflowServer) -> MlflowServer:
    return _alive(_mlflow_standby_server)


@pytest.fixture
def mlflow_scratch(_mlflow_scratch_server: MlflowServer) -> MlflowServer:
    """A third registry for drills (a drill never goes into the standby)."""
    return _alive(_mlflow_scratch_server)


@pytest.fixture
def mlflow_server_factory(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[[str], MlflowServer]]:
    """Start private servers for one test; all are stopped (and removed) after it."""
    mine: list[MlflowServer] = []

    def make(name: str = "mlflow") -> MlflowServer:
        server = MlflowServer(name)
        mine.append(server)
        _running.append(server)
        return server.start()

    yield make
    _finish(mine, request.session.testsfailed > 0)


@pytest.fixture
def mlflow_model_name(request: pytest.FixtureRequest) -> str:
    """A registered-model name no other test uses (the servers live for the session)."""
    return unique_test_name(request.node.name, 60)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure of a test using MLflow servers, attach the tail of each server's log."""
    report = yield
    attach_log_tails(report, item, MLFLOW_FIXTURES, list(_running), "mlflow")
    return report
