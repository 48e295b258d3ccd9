"""Key ring: loading keys by reference, file modes, key generation, HKDF inputs."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from drstream.daemon.errors import KeyRingError
from drstream.daemon.keyring import (
    KeyRing,
    derive_segment_key,
    generate_key_file,
    hkdf_info,
    load_key,
)

KEY = bytes(range(32))
KEY_B64 = base64.b64encode(KEY).decode()


def write_key(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# --------------------------------------------------------------------------- KeyRing


def test_keyring_basics() -> None:
    ring = KeyRing({"k1": KEY, "k2": b"\x01" * 32}, "k2")
    assert ring.active == "k2"
    assert set(ring.ids) == {"k1", "k2"}
    assert "k1" in ring and "nope" not in ring and 5 not in ring
    assert ring.key("k1") == KEY
    assert len(ring) == 2 and sorted(ring) == ["k1", "k2"]
    with pytest.raises(KeyRingError, match="'nope' is not in the key ring"):
        ring.key("nope")


def test_keyring_repr_hides_key_material() -> None:
    ring = KeyRing({"k1": KEY}, "k1")
    for text in (repr(ring), str(ring), f"{ring}"):
        assert "k1" in text
        assert KEY_B64 not in text and KEY.hex() not in text and repr(KEY) not in text


@pytest.mark.parametrize(
    ("keys", "active", "match"),
    [
        ({}, "k", "empty"),
        ({"k": b"short"}, "k", "32 bytes"),
        ({"k": "x" * 32}, "k", "32 bytes"),
        ({"bad id": KEY}, "bad id", "invalid key id"),
        ({"": KEY}, "", "invalid key id"),
        ({"x" * 65: KEY}, "x" * 65, "invalid key id"),
        ({"k": KEY}, "other", "active key id 'other'"),
    ],
)
def test_keyring_validation(keys: dict[str, bytes], active: str, match: str) -> None:
    with pytest.raises(KeyRingError, match=match) as info:
        KeyRing(keys, active)
    assert KEY_B64 not in str(info.value) and repr(KEY) not in str(info.value)


def test_key_id_charset() -> None:
    ring = KeyRing({"A-z_0.9": KEY, "x" * 64: KEY}, "A-z_0.9")
    assert "x" * 64 in ring


def test_from_refs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = write_key(tmp_path / "k1.key", KEY_B64 + "\n")
    monkeypatch.setenv("DRS_TEST_KEY", base64.b64encode(b"\x02" * 32).decode())
    ring = KeyRing.from_refs({"k1": f"file:{f}", "k2": "env:DRS_TEST_KEY"}, "k1")
    assert ring.key("k1") == KEY and ring.key("k2") == b"\x02" * 32


# --------------------------------------------------------------------------- load_key


def test_load_key_file(tmp_path: Path) -> None:
    assert load_key(f"file:{write_key(tmp_path / 'a', KEY_B64)}") == KEY
    assert load_key(f"file:{write_key(tmp_path / 'b', KEY_B64 + chr(10))}") == KEY
    assert load_key(f"file:{write_key(tmp_path / 'c', '  ' + KEY_B64 + ' ' + chr(10))}") == KEY
    assert load_key(f"file:{write_key(tmp_path / 'd', KEY_B64, 0o400)}") == KEY


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602, 0o620, 0o700 | 0o004])
def test_load_key_file_refuses_loose_modes(tmp_path: Path, mode: int) -> None:
    path = write_key(tmp_path / "loose.key", KEY_B64, mode)
    with pytest.raises(KeyRingError) as info:
        load_key(f"file:{path}")
    message = str(info.value)
    assert str(path) in message
    assert f"{mode:04o}" in message
    assert KEY_B64 not in message


def test_load_key_file_0644_names_path_and_mode(tmp_path: Path) -> None:
    path = write_key(tmp_path / "k.key", KEY_B64, 0o644)
    with pytest.raises(KeyRingError, match=r"k\.key has mode 0644"):
        load_key(f"file:{path}")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n",
        base64.b64encode(b"x" * 31).decode(),
        base64.b64encode(b"x" * 33).decode(),
        KEY_B64[:-1],
        KEY_B64 + "\n" + KEY_B64,
        KEY_B64[:20] + " " + KEY_B64[20:],
        base64.urlsafe_b64encode(b"\xfb" * 32).decode(),
        "not base64 at all!",
        KEY.hex(),
    ],
)
def test_load_key_file_bad_content(tmp_path: Path, text: str) -> None:
    path = write_key(tmp_path / "bad.key", text)
    with pytest.raises(KeyRingError) as info:
        load_key(f"file:{path}")
    message = str(info.value)
    assert f"file:{path}" in message
    if text.strip():
        assert text.strip() not in message  # never echo (possible) key material


def test_load_key_file_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyRingError, match="does not exist"):
        load_key(f"file:{tmp_path / 'missing'}")
    with pytest.raises(KeyRingError, match="not a regular file"):
        load_key(f"file:{tmp_path}")
    big = write_key(tmp_path / "big", "A" * 10_000)
    with pytest.raises(KeyRingError, match="too large"):
        load_key(f"file:{big}")
    with pytest.raises(KeyRingError, match="names no file"):
        load_key("file:")


def test_load_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRS_TEST_KEY", KEY_B64)
    assert load_key("env:DRS_TEST_KEY") == KEY
    monkeypatch.delenv("DRS_TEST_KEY")
    with pytest.raises(KeyRingError, match="environment variable DRS_TEST_KEY is not set"):
        load_key("env:DRS_TEST_KEY")
    monkeypatch.setenv("DRS_TEST_KEY", "c2hvcnQ=")
    with pytest.raises(KeyRingError, match="env:DRS_TEST_KEY decodes to 5 bytes") as info:
        load_key("env:DRS_TEST_KEY")
    assert "c2hvcnQ=" not in str(info.value)
    with pytest.raises(KeyRingError, match="names no environment variable"):
        load_key("env:")


def test_load_key_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(KeyRingError, match="CREDENTIALS_DIRECTORY is not set"):
        load_key("credential:drstream-key")
    write_key(tmp_path / "drstream-key", KEY_B64 + "\n", 0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert load_key("credential:drstream-key") == KEY
    with pytest.raises(KeyRingError, match="does not exist"):
        load_key("credential:other")
    for name in ("../etc/passwd", "a/b", "..", ""):
        with pytest.raises(KeyRingError, match="invalid credential name"):
            load_key(f"credential:{name}")


def test_load_key_unknown_scheme() -> None:
    with pytest.raises(KeyRingError, match=r"valid forms are file:\.\.\., env:\.\.\."):
        load_key("kms:arn:aws:kms:xyz")
    with pytest.raises(KeyRingError):
        load_key(KEY_B64)


# --------------------------------------------------------------------------- generate


def test_generate_key_file(tmp_path: Path) -> None:
    path = tmp_path / "new.key"
    generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 1 and len(text) == 45
    key = load_key(f"file:{path}")
    assert len(key) == 32
    assert os.listdir(tmp_path) == ["new.key"]  # no temporary file left behind


def test_generate_key_file_mode_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        generate_key_file(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


def test_generate_key_file_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "exists.key"
    generate_key_file(path)
    before = path.read_bytes()
    with pytest.raises(KeyRingError, match="refusing to overwrite"):
        generate_key_file(path)
    assert path.read_bytes() == before
    other = tmp_path / "other"
    other.write_text("precious")
    with pytest.raises(KeyRingError, match="refusing to overwrite"):
        generate_key_file(str(other))
    assert other.read_text() == "precious"
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(KeyRingError, match="refusing to overwrite"):
        generate_key_file(link)
    assert not (tmp_path / "nowhere").exists()


def test_generate_key_file_fresh_keys(tmp_path: Path) -> None:
    generate_key_file(tmp_path / "a")
    generate_key_file(tmp_path / "b")
    assert load_key(f"file:{tmp_path / 'a'}") != load_key(f"file:{tmp_path / 'b'}")


def test_generate_key_file_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyRingError, match="cannot create key file"):
        generate_key_file(tmp_path / "no" / "such" / "dir" / "k")


# --------------------------------------------------------------------------- HKDF


def test_hkdf_info_encoding() -> None:
    assert hkdf_info("log-a", 258) == (
        b"drstream/segment/v1" + b"\x05" + b"log-a" + b"\x00\x00\x00\x00\x00\x00\x01\x02"
    )


def test_derive_segment_key_matches_spec() -> None:
    salt = bytes(range(100, 116))
    expected = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=salt,
        info=b"drstream/segment/v1\x05log-a" + (7).to_bytes(8, "big"),
    ).derive(KEY)
    assert derive_segment_key(KEY, salt, "log-a", 7) == expected
    # Each input changes the key.
    assert derive_segment_key(KEY, salt, "log-a", 8) != expected
    assert derive_segment_key(KEY, salt, "log-b", 7) != expected
    assert derive_segment_key(KEY, bytes(16), "log-a", 7) != expected
    assert derive_segment_key(b"\x00" * 32, salt, "log-a", 7) != expected


def test_derive_segment_key_rejects_bad_inputs() -> None:
    with pytest.raises(KeyRingError):
        derive_segment_key(KEY, b"short", "log", 1)
    with pytest.raises(KeyRingError):
        derive_segment_key(b"short", bytes(16), "log", 1)
    with pytest.raises(KeyRingError):
        derive_segment_key(KEY, bytes(16), "log", 2**64)
