"""S3Store against a real S3 API server (moto, its own process): fencing, Object Lock,
clear errors, and outages through a TCP proxy (refuse / black-hole / delay / mute)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from drstream.connectors.s3.store import S3Store, S3StoreConfig
from drstream.daemon.errors import ConfigFieldError, StoreError, StoreUnavailableError
from tests.infra.s3 import KEY_ENV, SECRET_ENV, S3Server
from tests.infra.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

PREFIX = "drs"
SEG = "logs/shipper-1/00000000000000000001.seg"


def config(s3: S3Server, bucket: str, **overrides: Any) -> S3StoreConfig:
    return S3StoreConfig.model_validate(s3.store_fields(bucket, prefix=PREFIX, **overrides))


def stored(s3: S3Server, bucket: str, key: str = SEG) -> bytes | None:
    """Read an object straight from the server, bypassing the store and any proxy."""
    try:
        body: bytes = s3.client.get_object(Bucket=bucket, Key=f"{PREFIX}/{key}")["Body"].read()
    except s3.client.exceptions.NoSuchKey:
        return None
    return body


async def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def retries(logs: list[MutableMapping[str, Any]]) -> int:
    return sum(1 for e in logs if e["event"] == "store_retry")


# -- fencing ----------------------------------------------------------------------


async def test_second_writer_is_fenced(s3: S3Server, s3_bucket: str, s3_creds_env: None) -> None:
    cfg = config(s3, s3_bucket)
    async with S3Store(cfg) as first, S3Store(cfg) as second:
        assert await first.put_if_absent(SEG, b"writer one") is True
        assert await second.put_if_absent(SEG, b"writer two") is False
        assert await second.get(SEG) == b"writer one"
    assert stored(s3, s3_bucket) == b"writer one"


# -- Object Lock --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["GOVERNANCE", "COMPLIANCE"])
async def test_object_lock_retains_segments(
    s3: S3Server, s3_creds_env: None, mode: str
) -> None:
    bucket = s3.create_bucket(object_lock=True)
    cfg = config(s3, bucket, object_lock={"mode": mode, "retain_days": 1})
    async with S3Store(cfg) as store:
        assert await store.put_if_absent(SEG, b"segment") is True
        head = s3.client.head_object(Bucket=bucket, Key=f"{PREFIX}/{SEG}")
        assert head["ObjectLockMode"] == mode
        retain = head["ObjectLockRetainUntilDate"] - dt.datetime.now(dt.UTC)
        assert dt.timedelta(hours=23) < retain <= dt.timedelta(days=1)

        version = await store.version_id(SEG)
        with pytest.raises(StoreError) as err:
            await store.delete_version(SEG)
        assert err.value.key == SEG and not err.value.retriable
        assert "access denied" in str(err.value) and repr(SEG) in str(err.value)

        assert await store.version_id(SEG) == version
        assert await store.get(SEG) == b"segment"
        assert await store.put_if_absent(SEG, b"other") is False  # still fenced
    versions = s3.client.list_object_versions(Bucket=bucket)["Versions"]
    assert [v["VersionId"] for v in versions] == [version]


async def test_object_lock_on_a_bucket_without_it_is_a_clear_error(
    s3: S3Server, s3_bucket: str, s3_creds_env: None
) -> None:
    cfg = config(s3, s3_bucket, object_lock={"mode": "COMPLIANCE", "retain_days": 1})
    async with S3Store(cfg) as store:
        with pytest.raises(StoreError) as err:
            await store.put_if_absent(SEG, b"segment")
    assert not err.value.retriable and "ObjectLockConfiguration" in str(err.value)
    assert stored(s3, s3_bucket) is None


# -- errors that retrying cannot fix -----------------------------------------------


async def test_missing_bucket_is_named_and_not_retried(s3: S3Server, s3_creds_env: None) -> None:
    cfg = config(s3, "no-such-bucket-here", max_attempts=5, backoff_base_s=1.0, backoff_max_s=2.0)
    started = time.monotonic()
    with capture_logs() as logs, pytest.raises(StoreError) as err:
        async with S3Store(cfg):
            pass
    assert type(err.value) is StoreError and not err.value.retriable
    assert "bucket 'no-such-bucket-here' does not exist" in str(err.value)
    assert s3.endpoint_url in str(err.value)
    assert retries(logs) == 0 and time.monotonic() - started < 1.0


async def test_bucket_deleted_under_an_open_store(s3: S3Server, s3_creds_env: None) -> None:
    bucket = s3.create_bucket()
    async with S3Store(config(s3, bucket, backoff_base_s=1.0, backoff_max_s=2.0)) as store:
        s3.delete_bucket(bucket)
        with capture_logs() as logs, pytest.raises(StoreError) as err:
            await store.put_if_absent(SEG, b"segment")
    assert type(err.value) is StoreError and err.value.key == SEG
    assert f"bucket {bucket!r} does not exist" in str(err.value)
    assert retries(logs) == 0


@pytest.fixture(scope="module")
def s3_with_auth() -> Iterator[tuple[S3Server, str, str, str]]:
    """A moto server of its own that checks signatures (moto skips auth by default)."""
    server = S3Server.start_new("moto-s3-auth")
    try:
        key_id, secret = server.create_iam_access_key()
        bucket = server.create_bucket()
        server.enable_iam_auth()
        yield server, bucket, key_id, secret
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("which", "code"),
    [("secret", "SignatureDoesNotMatch"), ("key_id", "InvalidAccessKeyId")],
)
async def test_wrong_credentials_are_a_clear_error_not_retried(
    s3_with_auth: tuple[S3Server, str, str, str], monkeypatch: pytest.MonkeyPatch,
    which: str, code: str,
) -> None:
    server, bucket, key_id, secret = s3_with_auth
    monkeypatch.setenv(KEY_ENV, key_id)
    monkeypatch.setenv(SECRET_ENV, secret)
    cfg = config(server, bucket, backoff_base_s=1.0, backoff_max_s=2.0)
    async with S3Store(cfg) as store:  # the right credentials work
        await store.put_if_absent(f"ok-{which}", b"x")

    monkeypatch.setenv(SECRET_ENV if which == "secret" else KEY_ENV, "WRONGWRONGWRONG")
    with capture_logs() as logs, pytest.raises(StoreError) as err:
        async with S3Store(cfg):
            pass
    assert type(err.value) is StoreError and not err.value.retriable
    assert f"credentials rejected by {server.endpoint_url} for bucket {bucket!r} ({code})" in str(
        err.value
    )
    assert secret not in str(err.value) and retries(logs) == 0


# -- secrets by reference -------------------------------------------------------------


async def test_secret_file_readable_by_others_is_refused(
    s3: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "s3-secret"
    secret_file.write_text(s3.secret_key + "\n")
    monkeypatch.setenv(KEY_ENV, s3.access_key)
    cfg = config(s3, s3_bucket, secret_access_key=f"file:{secret_file}")

    secret_file.chmod(0o644)
    with pytest.raises(ConfigFieldError) as err:
        async with S3Store(cfg):
            pass
    assert err.value.path == "store.secret_access_key" and "0644" in str(err.value)

    secret_file.chmod(0o600)
    async with S3Store(cfg) as store:  # trailing newline stripped, so the key signs
        assert await store.put_if_absent(SEG, b"x") is True


def test_inline_secret_is_refused_without_echoing_it(s3: S3Server, s3_bucket: str) -> None:
    fields = s3.store_fields(s3_bucket, access_key_id="AKIAINLINE", secret_access_key="sekrit")
    with pytest.raises(ValueError, match="secret reference"):
        S3StoreConfig.model_validate(fields)


# -- outages through the proxy -------------------------------------------------------


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[TcpProxy]:
    with TcpProxy(s3.port) as p:
        yield p


def proxied(s3: S3Server, proxy: TcpProxy, bucket: str, **overrides: Any) -> S3StoreConfig:
    fast = {"endpoint_url": proxy.url, "max_attempts": 4, "backoff_base_s": 0.1,
            "backoff_max_s": 0.4, "connect_timeout_s": 1.0, "read_timeout_s": 0.5}
    return config(s3, bucket, **{**fast, **overrides})


# Least total sleep of the equal-jitter backoff for 4 attempts: (0.1 + 0.2 + 0.4) / 2.
MIN_BACKOFF_S = 0.35


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
async def test_store_down_is_retried_then_unavailable(
    s3: S3Server, s3_bucket: str, s3_creds_env: None, proxy: TcpProxy, mode: str
) -> None:
    async with S3Store(proxied(s3, proxy, s3_bucket)) as store:
        proxy.set_mode(mode)  # type: ignore[arg-type]
        accepted = proxy.accepted
        started = time.monotonic()
        with capture_logs() as logs, pytest.raises(StoreUnavailableError) as err:
            await store.put_if_absent(SEG, b"segment")
        elapsed = time.monotonic() - started
    assert err.value.retriable and err.value.key == SEG
    assert repr(SEG) in str(err.value) and store.url in str(err.value)
    assert "after 4 attempts" in str(err.value)
    assert retries(logs) == 3 and elapsed >= MIN_BACKOFF_S
    # botocore does not retry underneath us (its default would be 3 tries per attempt);
    # aiohttp may reconnect once within an attempt after a reset on an idempotent PUT.
    assert 3 <= proxy.accepted - accepted <= 8
    if mode == "blackhole":
        assert elapsed >= 4 * 0.5  # every attempt waited out its read timeout
    assert s3.object_keys(s3_bucket) == []  # checked directly: nothing was written


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
async def test_store_back_during_retries_put_succeeds(
    s3: S3Server, s3_bucket: str, s3_creds_env: None, proxy: TcpProxy, mode: str
) -> None:
    async with S3Store(proxied(s3, proxy, s3_bucket, max_attempts=10)) as store:
        proxy.set_mode(mode)  # type: ignore[arg-type]
        with capture_logs() as logs:
            put = asyncio.create_task(store.put_if_absent(SEG, b"segment"))
            await eventually(lambda: retries(logs) >= 2)
            proxy.pass_through()
            assert await put is True
        assert await store.get(SEG) == b"segment"
    assert stored(s3, s3_bucket) == b"segment"


async def test_slow_store_within_timeouts_still_works(
    s3: S3Server, s3_bucket: str, s3_creds_env: None, proxy: TcpProxy
) -> None:
    cfg = proxied(s3, proxy, s3_bucket, read_timeout_s=1.0, max_attempts=2)
    async with S3Store(cfg) as store:
        proxy.delay(0.2)
        started = time.monotonic()
        with capture_logs() as logs:
            assert await store.put_if_absent(SEG, b"segment") is True
        assert time.monotonic() - started >= 0.2 and retries(logs) == 0
        proxy.delay(1.5)  # now slower than the read timeout
        with pytest.raises(StoreUnavailableError):
            await store.get(SEG)


@pytest.mark.parametrize("existing", [None, b"another writer"], ids=["own", "other"])
async def test_lost_answer_then_412_is_resolved_by_content(
    s3: S3Server, s3_bucket: str, s3_creds_env: None, proxy: TcpProxy, existing: bytes | None
) -> None:
    """The put lands but its answer is lost; the retry meets 412. Our own bytes there
    mean our write succeeded (True); another writer's bytes mean fenced (False)."""
    if existing is not None:
        s3.client.put_object(Bucket=s3_bucket, Key=f"{PREFIX}/{SEG}", Body=existing)
    async with S3Store(proxied(s3, proxy, s3_bucket)) as store:
        proxy.mute()
        with capture_logs() as logs:
            put = asyncio.create_task(store.put_if_absent(SEG, b"segment"))
            await eventually(lambda: retries(logs) >= 1)
            if existing is None:
                # the write landed (seen directly on the server); only its answer was lost
                await eventually(lambda: stored(s3, s3_bucket) == b"segment")
            proxy.pass_through()
            assert await put is (existing is None)
    assert stored(s3, s3_bucket) == (existing or b"segment")


def test_secret_values_never_in_repr(s3: S3Server, s3_bucket: str) -> None:
    store = S3Store(config(s3, s3_bucket))
    assert s3.secret_key not in repr(store) and "env:" not in repr(store)
