"""S3 fixtures: one moto server process per test session, a fresh bucket per test.

A server that cannot start fails the run (ServiceStartError); it is never skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.infra.s3 import KEY_ENV, SECRET_ENV, S3Server, unique_bucket_name


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    server = S3Server.start_new("moto-s3")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3: S3Server) -> Iterator[str]:
    """A new, uniquely named, empty bucket; emptied and removed after the test."""
    name = s3.create_bucket(unique_bucket_name())
    yield name
    if s3.alive():
        s3.delete_bucket(name)


@pytest.fixture
def s3_buckets(s3: S3Server) -> Iterator[Callable[[], str]]:
    """Make new, uniquely named buckets; each is emptied and removed after the test."""
    made: list[str] = []

    def make() -> str:
        made.append(s3.create_bucket(unique_bucket_name()))
        return made[-1]

    yield make
    for name in made:
        if s3.alive():
            s3.delete_bucket(name)


@pytest.fixture
def s3_creds_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set the env variables that S3Server.store_fields() configs reference."""
    monkeypatch.setenv(KEY_ENV, s3.access_key)
    monkeypatch.setenv(SECRET_ENV, s3.secret_key)
