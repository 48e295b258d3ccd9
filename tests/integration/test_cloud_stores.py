"""GcsStore and AzureStore against their emulators (fake-gcs-server, Azurite, each its own
process): fencing, clear errors, config validation naming the field, URLs, and outages
through a TCP proxy (refuse / black-hole / mute) that lose nothing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from drstream.connectors.azure.store import AzureStoreConfig
from drstream.connectors.gcs.store import GcsStoreConfig
from drstream.daemon.config import parse_config
from drstream.daemon.errors import ConfigError, ConfigFieldError, StoreError, StoreUnavailableError
from drstream.daemon.plugins import installed
from drstream.daemon.store import Store
from tests.infra.emulators import (
    AZURE_KEY_ENV,
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    AzuriteServer,
    FakeGcsServer,
    _request,
)
from tests.infra.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

PREFIX = "drs"
SEG = "logs/shipper-1/00000000000000000001.seg"
KINDS = ["gcs", "azure"]


@dataclass
class Cloud:
    """One emulator and a fresh bucket (container) on it, as a test sees them."""

    kind: str
    server: FakeGcsServer | AzuriteServer
    bucket: str

    def fields(self, bucket: str | None = None, **overrides: Any) -> dict[str, Any]:
        return self.server.store_fields(bucket or self.bucket, prefix=PREFIX, **overrides)

    def open(self, bucket: str | None = None, **overrides: Any) -> Store:
        registry = installed()
        config = registry.stores[self.kind].config_model.model_validate(
            self.fields(bucket, **overrides))
        return registry.open_store(config)

    def stored(self) -> list[str]:
        """Names under the prefix, read directly from the emulator (no store, no proxy)."""
        if isinstance(self.server, FakeGcsServer):
            return self.server.object_names(self.bucket, PREFIX + "/")
        return self.server.blob_names(self.bucket, PREFIX + "/")

    def endpoint_through(self, proxy: TcpProxy) -> str:
        return proxy.url + ("" if self.kind == "gcs" else f"/{AZURITE_ACCOUNT}")


@pytest.fixture(params=KINDS)
def cloud(request: pytest.FixtureRequest) -> Cloud:
    return _cloud(request.param, request)


def _cloud(kind: str, request: pytest.FixtureRequest) -> Cloud:
    if kind == "gcs":
        return Cloud("gcs", request.getfixturevalue("gcs"),
                     request.getfixturevalue("gcs_bucket"))
    request.getfixturevalue("azure_creds_env")
    return Cloud("azure", request.getfixturevalue("azurite"),
                 request.getfixturevalue("azure_container"))


def container_sas(container: str) -> str:
    """A SAS for the log's container on Azurite: read, write, create, delete, list."""
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    return str(generate_container_sas(
        AZURITE_ACCOUNT, container, account_key=AZURITE_KEY, expiry=time.time() + 3600,
        permission=ContainerSasPermissions(read=True, write=True, delete=True, list=True,
                                           create=True)))


def retries(logs: list[MutableMapping[str, Any]]) -> int:
    return sum(1 for e in logs if e["event"] == "store_retry")


async def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- fencing ----------------------------------------------------------------------


async def test_second_writer_is_fenced(cloud: Cloud) -> None:
    async with cloud.open() as first, cloud.open() as second:
        assert await first.put_if_absent(SEG, b"writer one") is True
        assert await second.put_if_absent(SEG, b"writer two") is False
        assert await second.get(SEG) == b"writer one"
    assert cloud.stored() == [f"{PREFIX}/{SEG}"]


# -- errors that retrying cannot fix -----------------------------------------------


async def test_missing_bucket_is_named_and_not_retried(cloud: Cloud) -> None:
    store = cloud.open("no-such-bucket-here", max_attempts=5, backoff_base_s=1.0,
                       backoff_max_s=2.0)
    started = time.monotonic()
    with capture_logs() as logs, pytest.raises(StoreError) as err:
        async with store:
            pass
    assert type(err.value) is StoreError and not err.value.retriable
    assert "'no-such-bucket-here' does not exist" in str(err.value)
    assert cloud.server.endpoint_url in str(err.value)
    assert retries(logs) == 0 and time.monotonic() - started < 1.0


async def test_azure_wrong_key_is_a_credentials_error_without_the_key(
    azurite: AzuriteServer, azure_container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "d3Jvbmcga2V5IG9mIHRoZSByaWdodCBsZW5ndGggZm9yIGFuIGFjY291bnQ="
    monkeypatch.setenv(AZURE_KEY_ENV, wrong)
    config = AzureStoreConfig.model_validate(azurite.store_fields(azure_container))
    with capture_logs() as logs, pytest.raises(StoreError) as err:
        async with installed().open_store(config):
            pass
    assert not err.value.retriable and "credentials rejected" in str(err.value)
    assert "account_key" in str(err.value) and retries(logs) == 0
    assert wrong not in str(err.value) and AZURITE_KEY not in str(err.value)


async def test_azure_connection_string_and_sas_token(
    azurite: AzuriteServer, azure_container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRS_TEST_AZURE_CS", azurite.connection_string())
    monkeypatch.setenv("DRS_TEST_AZURE_SAS", container_sas(azure_container))
    base = azurite.store_fields(azure_container, prefix=PREFIX, account_key=None)
    by_cs = {**base, "connection_string": "env:DRS_TEST_AZURE_CS", "endpoint_url": None}
    by_sas = {**base, "sas_token": "env:DRS_TEST_AZURE_SAS"}
    for n, fields in enumerate([by_cs, by_sas]):
        config = AzureStoreConfig.model_validate(fields)
        async with installed().open_store(config) as store:
            assert await store.put_if_absent(f"k/{n}", b"x") is True
            assert await store.put_if_absent(f"k/{n}", b"y") is False
    assert azurite.blob_names(azure_container) == [f"{PREFIX}/k/0", f"{PREFIX}/k/1"]


def test_gcs_service_account_that_is_not_json_names_the_field(
    gcs: FakeGcsServer, gcs_bucket: str, tmp_path: Path
) -> None:
    sa = tmp_path / "sa.json"
    sa.write_text("not json at all")
    sa.chmod(0o600)
    fields = gcs.store_fields(gcs_bucket, anonymous=False, service_account=f"file:{sa}")
    store = installed().open_store(GcsStoreConfig.model_validate(fields))
    with pytest.raises(ConfigFieldError) as err:
        asyncio.run(store.start())
    assert err.value.path == "store.service_account" and "not json at all" not in str(err.value)


async def test_gcs_static_token_is_sent(gcs: FakeGcsServer, gcs_bucket: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A token reference works end to end (the emulator accepts any bearer token)."""
    monkeypatch.setenv("DRS_TEST_GCS_TOKEN", "ya29.test-token")
    fields = gcs.store_fields(gcs_bucket, anonymous=False, token="env:DRS_TEST_GCS_TOKEN")
    async with installed().open_store(GcsStoreConfig.model_validate(fields)) as store:
        assert await store.put_if_absent(SEG, b"x") is True
        assert "ya29" not in repr(store)


# -- config: field paths, references, URLs --------------------------------------------


@pytest.mark.parametrize(("store", "path", "shown"), [
    ({"type": "gcs", "bucket": "UPPER"}, "store.bucket", "'UPPER'"),
    ({"type": "gcs", "bucket": "b-1", "token": "ya29.inline"}, "store.token", None),
    ({"type": "gcs", "bucket": "b-1", "retries": 3}, "store.retries", "3"),
    ({"type": "gcs", "bucket": "b-1", "object_retention": {"mode": "Locked"}},
     "store.object_retention.retain_days", None),
    ({"type": "gcs", "bucket": "b-1", "endpoint_url": "localhost:1"}, "store.endpoint_url",
     "'localhost:1'"),
    ({"type": "azure", "account": "acct", "container": "Bad_Name", "account_key": "env:K"},
     "store.container", "'Bad_Name'"),
    ({"type": "azure", "account": "acct", "container": "c-1", "account_key": "inline=="},
     "store.account_key", None),
    ({"type": "azure", "account": "acct", "container": "c-1", "prefix": "a/../b",
      "account_key": "env:K"}, "store.prefix", "'a/../b'"),
    ({"type": "azure", "account": "acct", "container": "c-1", "immutability": {
        "mode": "Forever", "retain_days": 1}, "account_key": "env:K"},
     "store.immutability.mode", "'Forever'"),
])
def test_config_errors_name_the_field(store: dict[str, Any], path: str,
                                      shown: str | None) -> None:
    data = {"log_id": "east-1", "store": store,
            "keyring": {"active": "k1", "keys": {"k1": "file:/etc/drstream/k1.key"}}}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    errors = {e.path: str(e) for e in info.value.errors}
    assert path in errors, errors
    if shown is None:  # an inline secret is never echoed
        assert "inline" not in errors[path] and "ya29" not in errors[path]
    else:
        assert shown in errors[path]


def test_azure_needs_exactly_one_credential() -> None:
    with pytest.raises(ValueError, match="exactly one of account_key, sas_token"):
        AzureStoreConfig.model_validate({"type": "azure", "account": "acct",
                                         "container": "c-1"})
    with pytest.raises(ValueError, match="got account_key, sas_token"):
        AzureStoreConfig.model_validate({"type": "azure", "account": "acct", "container": "c-1",
                                         "account_key": "env:A", "sas_token": "env:B"})


def test_store_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = installed()
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    gcs = registry.store_config_from_url("gs://my-bucket/dr/prod/")
    assert gcs == GcsStoreConfig(type="gcs", bucket="my-bucket", prefix="dr/prod")
    assert registry.open_store(gcs).url == "gs://my-bucket/dr/prod"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:4443")
    emulated = registry.store_config_from_url("gs://my-bucket/dr")
    assert emulated.endpoint_url == "http://127.0.0.1:4443" and emulated.anonymous

    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_KEY", "a2V5")
    az = registry.store_config_from_url("az://acct1/logs/dr/prod")
    assert az == AzureStoreConfig(type="azure", account="acct1", container="logs",
                                  prefix="dr/prod", account_key="env:AZURE_STORAGE_KEY")
    assert registry.open_store(az).url == "az://acct1/logs/dr/prod"

    for url, reason in [("gs://user:pw@bucket/x", "credentials do not go in the URL"),
                        ("az://acct1", "expected az://account/container/prefix"),
                        ("gs://b/x?versions=1", "expected gs://bucket/prefix")]:
        with pytest.raises(ConfigFieldError) as err:
            registry.store_config_from_url(url)
        assert err.value.path == "store" and reason in str(err.value)
        assert "pw" not in str(err.value)
    monkeypatch.delenv("AZURE_STORAGE_KEY")
    with pytest.raises(ConfigFieldError, match="no Azure credential"):
        registry.store_config_from_url("az://acct1/logs")


# -- retention ------------------------------------------------------------------------


async def test_gcs_object_retention_is_written_with_each_object(
    gcs: FakeGcsServer, gcs_bucket: str
) -> None:
    fields = gcs.store_fields(gcs_bucket, object_retention={"mode": "Locked", "retain_days": 2})
    config = GcsStoreConfig.model_validate(fields)
    assert installed().stores["gcs"].retain_days(config) == 2
    async with installed().open_store(config) as store:
        assert await store.put_if_absent("logs/a/1.seg", b"x") is True
    status, body = _request(gcs.port, "GET", f"/storage/v1/b/{gcs_bucket}/o/logs%2Fa%2F1.seg")
    retention = json.loads(body)["retention"]
    assert status == 200 and retention["mode"] == "Locked"
    until = time.mktime(time.strptime(retention["retainUntilTime"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert 1.9 * 86400 < until - time.mktime(time.gmtime()) <= 2 * 86400


# -- outages through the proxy -------------------------------------------------------


@pytest.fixture
def proxy(cloud: Cloud) -> Iterator[TcpProxy]:
    with TcpProxy(cloud.server.port) as p:
        yield p


def proxied(cloud: Cloud, proxy: TcpProxy, **overrides: Any) -> Store:
    fast = {"endpoint_url": cloud.endpoint_through(proxy), "max_attempts": 4,
            "backoff_base_s": 0.1, "backoff_max_s": 0.4, "connect_timeout_s": 1.0,
            "request_timeout_s": 1.0}
    return cloud.open(**{**fast, **overrides})


# Least total sleep of the equal-jitter backoff for 4 attempts: (0.1 + 0.2 + 0.4) / 2.
MIN_BACKOFF_S = 0.35


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
async def test_store_down_is_retried_then_unavailable(
    cloud: Cloud, proxy: TcpProxy, mode: str
) -> None:
    async with proxied(cloud, proxy) as store:
        proxy.set_mode(mode)  # type: ignore[arg-type]
        started = time.monotonic()
        with capture_logs() as logs, pytest.raises(StoreUnavailableError) as err:
            await store.put_if_absent(SEG, b"segment")
        elapsed = time.monotonic() - started
    assert err.value.retriable and err.value.key == SEG
    assert repr(SEG) in str(err.value) and store.url in str(err.value)
    assert "after 4 attempts" in str(err.value)
    assert retries(logs) == 3 and elapsed >= MIN_BACKOFF_S
    if mode == "blackhole":
        # every attempt but the first waited out its request timeout (the first may meet
        # the reset of its pooled connection that the mode switch makes)
        assert elapsed >= 3 * 1.0
    assert cloud.stored() == []  # checked directly: nothing was written
    assert AZURITE_KEY not in json.dumps([dict(e) for e in logs], default=str)


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
async def test_store_back_during_retries_nothing_lost(
    cloud: Cloud, proxy: TcpProxy, mode: str
) -> None:
    """Puts in flight when the store goes away all land once it is back."""
    async with proxied(cloud, proxy, max_attempts=30) as store:
        assert await store.put_if_absent("logs/a/0", b"before") is True
        proxy.set_mode(mode)  # type: ignore[arg-type]
        with capture_logs() as logs:
            puts = [asyncio.create_task(store.put_if_absent(f"logs/a/{i}", b"seg %d" % i))
                    for i in range(1, 6)]

            async def retried() -> bool:
                return retries(logs) >= 5

            await eventually(retried)
            proxy.pass_through()
            assert await asyncio.gather(*puts) == [True] * 5
        keys = [k async for k in store.list("logs/a/")]
        assert keys == [f"logs/a/{i}" for i in range(6)]
        for i in range(1, 6):
            assert await store.get(f"logs/a/{i}") == b"seg %d" % i
    assert len(cloud.stored()) == 6


@pytest.mark.parametrize("existing", [None, b"another writer"], ids=["own", "other"])
async def test_lost_answer_then_conflict_is_resolved_by_content(
    cloud: Cloud, proxy: TcpProxy, existing: bytes | None
) -> None:
    """The put lands but its answer is lost; the retry meets 'exists'. Our own bytes there
    mean our write succeeded (True); another writer's bytes mean fenced (False)."""
    async with cloud.open() as direct, proxied(cloud, proxy, max_attempts=10) as store:
        if existing is not None:
            assert await direct.put_if_absent(SEG, existing) is True
        proxy.mute()
        with capture_logs() as logs:
            put = asyncio.create_task(store.put_if_absent(SEG, b"segment"))

            async def retried() -> bool:
                return retries(logs) >= 1

            await eventually(retried)
            if existing is None:
                async def landed() -> bool:
                    return await direct.get(SEG) == b"segment"

                await eventually(landed)  # the write landed; only its answer was lost
            proxy.pass_through()
            assert await put is (existing is None)
        assert await direct.get(SEG) == (existing or b"segment")


@pytest.mark.parametrize("store", [
    {"type": "gcs", "bucket": "b-1"},
    {"type": "azure", "account": "acct", "container": "c-1", "account_key": "env:K"},
], ids=["gcs", "azure"])
def test_allowed_regions_covers_the_new_stores(store: dict[str, Any]) -> None:
    data = {"log_id": "east-1", "allowed_regions": ["europe-west1"], "store": store,
            "keyring": {"active": "k1", "keys": {"k1": "file:/etc/drstream/k1.key"}}}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert [e.path for e in info.value.errors] == ["store.region"]
    assert parse_config({**data, "store": {**store, "region": "europe-west1"}}).store.region \
        == "europe-west1"


@pytest.mark.parametrize(("kind", "retention"), [
    ("gcs", None), ("gcs", 30),
    # Azurite takes a blob's immutability policy but never reports it back: only without
    ("azure", None),
])
async def test_prune_respects_retention(request: pytest.FixtureRequest, tmp_path: Path,
                                        kind: str, retention: int | None) -> None:
    """Segments past the prune cutoff but under the retain-until date the service reports
    are kept (the service would refuse their delete); without retention they go."""
    from drstream.daemon.prune import prune
    from tests.contract.integrity import LOG, make_log, open_setup

    cloud = _cloud(kind, request)
    option = "object_retention" if cloud.kind == "gcs" else "immutability"
    fields = cloud.fields()
    if retention is not None:
        fields[option] = {"mode": "Unlocked", "retain_days": retention}
    async with open_setup(cloud.kind, fields, tmp_path) as s:
        await make_log(s, 4, max_in_flight=1)  # seq 4 names seq 3 durable: may go first
        info = await s.store.head(s.key(1))
        assert info is not None and info.size > 0
        if retention is not None:
            assert info.retain_until_ms is not None
            assert info.retain_until_ms > (time.time() + (retention - 1) * 86400) * 1000
        await asyncio.sleep(0.01)
        result = await prune(s.config, s.store, s.keyring, older_than_s=0)
        left = [k async for k in s.store.list(f"logs/{LOG}/")]
    if retention is None:
        assert result.deleted == [1, 2, 3] and len(left) == 1
    else:
        assert result.deleted == [] and result.locked == [1] and len(left) == 4


async def test_gcs_hidden_and_purge_in_a_versioned_bucket(gcs: FakeGcsServer) -> None:
    """A delete in a versioned bucket keeps a noncurrent generation: hidden names it;
    purge removes every generation."""
    bucket = gcs.create_bucket(versioning=True)
    config = GcsStoreConfig.model_validate(gcs.store_fields(bucket, prefix=PREFIX))
    async with installed().open_store(config) as store:
        for k in ("logs/a/1", "logs/a/2", "logs/a/3"):
            assert await store.put_if_absent(k, b"x")
        await store.delete("logs/a/2")
        assert [k async for k in store.list("logs/a/")] == ["logs/a/1", "logs/a/3"]
        assert [k async for k in store.hidden("logs/a/")] == ["logs/a/2"]
        assert [k async for k in store.hidden("logs/a/", start_after="logs/a/2")] == []
        await store.purge("logs/a/2")
        await store.purge("logs/a/3")
        assert [k async for k in store.hidden("logs/a/")] == []
        assert [k async for k in store.list("logs/a/")] == ["logs/a/1"]
    assert gcs.object_names(bucket) == [f"{PREFIX}/logs/a/1"]
    gcs.delete_bucket(bucket)


async def test_purge_removes_every_trace(cloud: Cloud) -> None:
    async with cloud.open() as store:
        assert await store.put_if_absent("logs/a/1", b"x")
        await store.purge("logs/a/1")
        await store.purge("logs/a/never")
        assert [k async for k in store.list("logs/")] == []
        assert [k async for k in store.hidden("logs/")] == []
        assert await store.put_if_absent("logs/a/1", b"y")  # gone entirely


@pytest.mark.parametrize(("kind", "header"), [
    ("gcs", (b"ifGenerationMatch=", b"xfGenerationMatch=")),
    ("azure", (b"If-None-Match:", b"X-Ignored-Hdr:")),
])
async def test_an_endpoint_that_ignores_the_precondition_is_refused(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str, header: tuple[bytes, bytes]
) -> None:
    """The start-up probe: a second create that is not refused stops the writer before
    it writes anything (fencing would not hold)."""
    from drstream.daemon.deltalog import LogWriter
    from tests.contract.integrity import LOG, contents, open_setup
    from tests.infra.stores import store_fields, store_server

    with TcpProxy(store_server(kind, request).port) as proxy:
        proxy.rewrite = header  # the server never sees the precondition
        fields = store_fields(kind, request, tmp_path, via=proxy.url)
        if kind == "azure":  # SharedKey signs If-None-Match; a SAS does not sign headers
            monkeypatch = request.getfixturevalue("monkeypatch")
            monkeypatch.setenv("DRS_TEST_AZURE_SAS", container_sas(fields["container"]))
            fields = {**fields, "account_key": None, "sas_token": "env:DRS_TEST_AZURE_SAS"}
        async with open_setup(kind, fields, tmp_path) as s:
            with pytest.raises(StoreError, match=r"does not honour create-if-absent"):
                await LogWriter(s.store, LOG, s.keyring).open()
            assert await contents(s.store) == {}
