"""One contract, every store: the file store on tmp_path, S3 on a real moto server, GCS on
fake-gcs-server and Azure Blob on Azurite.

Known difference, deliberately outside the contract: a file store cannot hold both
`a` and `a/b` (a path is a file or a directory); S3 can. Log keys never need that.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drstream.connectors.file.store import TMP_PREFIX, FileStore, FileStoreConfig
from drstream.connectors.s3.store import S3StoreConfig
from drstream.daemon.errors import StoreError
from drstream.daemon.plugins import installed
from drstream.daemon.store import Store

MiB = 1024 * 1024


async def collect(store: Store, prefix: str, start_after: str | None = None,
                  limit: int | None = None) -> list[str]:
    return [k async for k in store.list(prefix, start_after=start_after, limit=limit)]


@pytest.mark.parametrize(
    "data",
    [b"", bytes(range(256)) * 4, os.urandom(5 * MiB)],
    ids=["empty", "binary", "5MiB"],
)
async def test_put_then_get_roundtrip(store: Store, data: bytes) -> None:
    assert await store.put_if_absent("logs/a/00000000000000000001.seg", data) is True
    assert await store.get("logs/a/00000000000000000001.seg") == data
    assert await store.exists("logs/a/00000000000000000001.seg") is True


async def test_second_put_is_refused_and_keeps_original(store: Store) -> None:
    assert await store.put_if_absent("logs/a/1.seg", b"first") is True
    assert await store.put_if_absent("logs/a/1.seg", b"second writer") is False
    assert await store.get("logs/a/1.seg") == b"first"


async def test_missing_key(store: Store) -> None:
    assert await store.get("logs/none/1.seg") is None
    assert await store.exists("logs/none/1.seg") is False
    assert await collect(store, "logs/none/") == []


# '-' and '.' sort before '/', so 'a-b/x' < 'a/1': a naive directory walk gets this wrong.
NESTED = [
    "logs/a/00000000000000000001.seg", "logs/a/00000000000000000002.seg",
    "logs/a/00000000000000000010.seg", "logs/a/sub/y", "logs/a-b/x", "logs/a.c",
    "logs/ab", "logs/b/1", "blobs/ff00", "audit/2024-01-01T00:00:00Z-replay.json",
]


@pytest.mark.parametrize(
    ("prefix", "start_after", "limit"),
    [
        ("", None, None), ("logs/", None, None), ("logs/a", None, None),
        ("logs/a/", None, None), ("logs/a/0000", None, 2),
        ("logs/", "logs/a/00000000000000000001.seg", None), ("logs/", "logs/a/", None),
        ("logs/", "logs/a", 3), ("logs/", "logs/a-b/x", None), ("logs/", "logs/zzz", None),
        ("", "b", None), ("logs/a/", "a", 1), ("nothing/", None, None), ("logs/", None, 0),
    ],
)
async def test_list_order_prefix_start_after_limit(
    store: Store, prefix: str, start_after: str | None, limit: int | None
) -> None:
    for key in NESTED:
        assert await store.put_if_absent(key, key.encode())
    expected = sorted(k for k in NESTED if k.startswith(prefix)
                      and (start_after is None or k > start_after))
    expected = expected[:limit] if limit is not None else expected
    assert await collect(store, prefix, start_after, limit) == expected


async def test_list_pages_past_one_response(store: Store) -> None:
    keys = [f"logs/p/{i:020d}.seg" for i in range(1, 1101)]  # > 1000: S3 pages
    sem = asyncio.Semaphore(16)

    async def put(k: str) -> None:
        async with sem:
            assert await store.put_if_absent(k, b"x")

    await asyncio.gather(*(put(k) for k in keys))
    assert await collect(store, "logs/p/") == keys
    assert await collect(store, "logs/p/", start_after=keys[499], limit=600) == keys[500:1100]


async def test_delete(store: Store) -> None:
    await store.put_if_absent("logs/d/1.seg", b"one")
    await store.delete("logs/d/1.seg")
    assert await store.get("logs/d/1.seg") is None
    assert await store.exists("logs/d/1.seg") is False
    assert await collect(store, "logs/d/") == []
    await store.delete("logs/d/1.seg")  # absent: not an error
    await store.delete("never/was/there")
    assert await store.put_if_absent("logs/d/1.seg", b"again") is True
    assert await store.get("logs/d/1.seg") == b"again"


async def test_concurrent_put_exactly_one_wins(store: Store) -> None:
    payloads = [f"writer {i} ".encode() * (1000 + i) for i in range(8)]
    results = await asyncio.gather(
        *(store.put_if_absent("logs/race/1.seg", p) for p in payloads)
    )
    assert results.count(True) == 1
    winner = payloads[results.index(True)]
    assert await store.get("logs/race/1.seg") == winner


ODD_KEYS = [
    "odd/with space", "odd/ünïcödé-ключ-鍵", "odd/plus+eq=at@comma,semi;colon:bang!",
    "odd/percent%20hash#amp&dollar$", "odd/quote'dq\"paren()star*", "odd/brackets[]{}~^`|",
    "odd/.hidden", "odd/a.b/c_d", "odd/emoji-\U0001f600",
]


async def test_odd_but_legal_keys(store: Store) -> None:
    for key in ODD_KEYS:
        assert await store.put_if_absent(key, key.encode()) is True, key
    for key in ODD_KEYS:
        assert await store.get(key) == key.encode(), key
        assert await store.exists(key), key
    assert await collect(store, "odd/") == sorted(ODD_KEYS)


@pytest.mark.parametrize(
    "key", ["", "/abs", "../escape", "a/../../b", "a//b", "a/./b", "dir/", "a\x00b",
            f"logs/{TMP_PREFIX}x"],
)
async def test_invalid_keys_are_rejected_naming_the_key(store: Store, key: str) -> None:
    with pytest.raises(StoreError) as err:
        await store.put_if_absent(key, b"x")
    assert err.value.key == key
    assert repr(key) in str(err.value)
    with pytest.raises(StoreError):
        await store.get(key)


_segment = st.text(alphabet="ab-._ Zé0", min_size=1, max_size=3).filter(
    lambda s: s not in (".", "..") and ".." not in s and not s.endswith("~")
)
# Leaves end with '~' and directories never do, so no key is another key's directory.
_key = st.builds(
    lambda dirs, leaf: "/".join([*dirs, leaf + "~"]),
    st.lists(_segment, max_size=2), _segment,
)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.sets(_key, max_size=12), cut=st.integers(0, 12))
async def test_list_is_exactly_the_keys_put_sorted(
    store: Store, keys: set[str], cut: int
) -> None:
    base = f"prop/{uuid.uuid4().hex}/"  # the store outlives each example: isolate them
    await asyncio.gather(*(store.put_if_absent(base + k, b"") for k in keys))
    listed = await collect(store, base)
    assert listed == sorted(base + k for k in keys)
    if 0 < cut <= len(listed):
        assert await collect(store, base, start_after=listed[cut - 1]) == listed[cut:]


async def test_file_store_ignores_crash_leftovers(tmp_path: Path) -> None:
    """A temp file left by a crash mid-write is never listed, read, or in the way."""
    async with FileStore(FileStoreConfig(type="file", path=str(tmp_path))) as store:
        (tmp_path / "logs").mkdir()
        (tmp_path / "logs" / f"{TMP_PREFIX}deadbeef").write_bytes(b"half a segm")
        assert await collect(store, "") == []
        assert await store.put_if_absent("logs/1.seg", b"whole") is True
        assert await collect(store, "") == ["logs/1.seg"]
        assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
            f"{TMP_PREFIX}deadbeef", "1.seg",
        ]


def test_store_urls_and_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file_cfg = installed().store_config_from_url(f"file://{tmp_path}/st%20ore")
    assert file_cfg == FileStoreConfig(type="file", path=f"{tmp_path}/st ore")
    assert isinstance(installed().open_store(file_cfg), FileStore)

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    s3_cfg = installed().store_config_from_url("s3://my-bucket/dr/prod/")
    assert s3_cfg == S3StoreConfig(
        type="s3", bucket="my-bucket", prefix="dr/prod", endpoint_url="http://127.0.0.1:9",
        region="eu-west-1",
    )
    assert installed().open_store(s3_cfg).url == "s3://my-bucket/dr/prod"
