"""Config loading: unknown keys rejected, every error names field path and value."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from drstream.daemon.config import load_config, parse_config
from drstream.daemon.errors import ConfigError
from drstream.daemon.keyring import generate_key_file

GOOD = {
    "log_id": "east-1",
    "store": {"type": "file", "path": "/var/lib/drstream/log"},
    "keyring": {"active": "k1", "keys": {"k1": "file:/etc/drstream/k1.key"}},
}


def write(tmp_path: Path, data: object, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def errors_of(data: object) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return [(e.path, str(e)) for e in info.value.errors]


def test_good_config_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.log_id == "east-1"
    assert config.store.type == "file"
    assert config.store.path == "/var/lib/drstream/log"
    assert config.logging.level == "info"


@pytest.mark.parametrize(
    ("patch", "path", "shown"),
    [
        ({"surprise": 1}, "surprise", "got 1"),
        ({"store": {**GOOD["store"], "paht": "/x"}}, "store.paht", "'/x'"),
        ({"keyring": {**GOOD["keyring"], "actve": "k1"}}, "keyring.actve", "'k1'"),
        ({"logging": {"level": "loud"}}, "logging.level", "'loud'"),
        ({"log_id": 17}, "log_id", "got 17"),
        ({"log_id": "bad id/with slash"}, "log_id", "bad id/with slash"),
        ({"store": {"type": "ftp"}}, "store.type", "'ftp'"),
        ({"store": {"type": "file", "path": 5}}, "store.path", "got 5"),
    ],
)
def test_each_error_names_field_and_value(patch: dict, path: str, shown: str) -> None:
    errors = errors_of({**GOOD, **patch})
    assert [p for p, _ in errors] == [path]
    assert shown in errors[0][1]


def test_unknown_store_type_lists_valid_types() -> None:
    [(_, message)] = errors_of({**GOOD, "store": {"type": "ftp"}})
    assert "file" in message and "s3" in message


def test_all_errors_reported_at_once() -> None:
    errors = errors_of({"log_id": "", "store": {"type": "file"}, "bogus": True})
    paths = sorted(p for p, _ in errors)
    assert paths == ["bogus", "keyring", "log_id", "store.path"]


def test_inline_secret_is_refused_and_never_echoed() -> None:
    secret = "c3VwZXJzZWNyZXRrZXltYXRlcmlhbA=="
    errors = errors_of({**GOOD, "keyring": {"active": "k1", "keys": {"k1": secret}}})
    assert [p for p, _ in errors] == ["keyring.keys.k1"]
    assert secret not in errors[0][1]
    assert "env:NAME" in errors[0][1]


def test_active_key_must_exist() -> None:
    errors = errors_of({**GOOD, "keyring": {"active": "k2", "keys": {"k1": "env:K1"}}})
    assert errors[0][0] == "keyring"
    assert "'k2'" in errors[0][1]


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "log_id: a\nstore: [unclosed\n"))
    assert "line" in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "drstream.daemon.cli", *args], capture_output=True, text=True,
        timeout=60)


def test_validate_ok_exits_0(tmp_path: Path) -> None:
    key = tmp_path / "k1.key"
    generate_key_file(key)
    good = {**GOOD, "keyring": {"active": "k1", "keys": {"k1": f"file:{key}"}}}
    result = run_cli("validate", str(write(tmp_path, good)))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_validate_unknown_key_exits_2_naming_field_and_value(tmp_path: Path) -> None:
    result = run_cli("validate", str(write(tmp_path, {**GOOD, "flush_intervall": "5s"})))
    assert result.returncode == 2
    assert "flush_intervall" in result.stderr and "'5s'" in result.stderr


def test_validate_wrong_type_exits_2_naming_field_and_value(tmp_path: Path) -> None:
    bad = {**GOOD, "store": {"type": "file", "path": ["not", "a", "path"]}}
    result = run_cli("validate", str(write(tmp_path, bad)))
    assert result.returncode == 2
    assert "store.path" in result.stderr and "['not', 'a', 'path']" in result.stderr


def test_help_lists_only_working_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    commands = result.stdout.split("COMMAND", 2)[2].split("options:")[0]
    listed = [m.group(1) for m in re.finditer(r"^    (\S+)", commands, re.MULTILINE)]
    assert sorted(listed) == [
        "apply", "bench", "drill", "failover", "keys", "log", "prune", "replay", "shards",
        "ship", "status", "validate", "verify",
    ]


def test_allowed_regions_refuses_a_store_elsewhere_naming_both() -> None:
    data = {**GOOD, "allowed_regions": ["us-east-1"],
            "store": {"type": "s3", "bucket": "dr-log", "region": "eu-west-1"}}
    errors = errors_of(data)
    assert [p for p, _ in errors] == ["store.region"]
    assert "'eu-west-1'" in errors[0][1] and "us-east-1" in errors[0][1]


def test_allowed_regions_requires_a_declared_region() -> None:
    errors = errors_of({**GOOD, "allowed_regions": ["us-east-1"]})
    assert [p for p, _ in errors] == ["store.region"]
    parse_config({**GOOD, "allowed_regions": ["us-east-1"],
                  "store": {**GOOD["store"], "region": "us-east-1"}})
