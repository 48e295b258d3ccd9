"""Shards of a log set (daemon/shards.py, docs/shards.md): the partition -> shard hash is
stable across processes and spread evenly, a shard's config names its own log, runs the
partitioned sources and sinks (shard 0 also the rest) and its own ports, and the command
line selects a shard with --shard K or K/N, naming the option on a bad value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from drstream.daemon.cli import main
from drstream.daemon.config import parse_config
from drstream.daemon.errors import ConfigError
from drstream.daemon.keyring import generate_key_file
from drstream.daemon.shards import Shard, parse_shard, shard_log_id, shard_of

BASE = {
    "log_id": "east-1",
    "store": {"type": "file", "path": "/var/lib/drstream/log"},
    "keyring": {"active": "k1", "keys": {"k1": "file:/etc/drstream/k1.key"}},
    "sources": [
        {"type": "kafka", "name": "primary", "bootstrap_servers": "p:9092",
         "topics": {"include": [".*"]}},
        {"type": "mlflow", "name": "primary", "tracking_uri": "http://mlflow-east:5000"},
    ],
    "sinks": [
        {"type": "kafka", "name": "standby", "bootstrap_servers": "s:9092"},
        {"type": "mlflow", "name": "standby", "tracking_uri": "http://mlflow-west:5000",
         "source": "mlflow:primary"},
    ],
    "service": {"ship_metrics_listen": "127.0.0.1:9464",
                "apply_metrics_listen": "127.0.0.1:9465"},
    "shards": {"count": 3, "port_stride": 10},
}

def owners_in_subprocess(seed: str, pairs: list[tuple[str, int]], count: int) -> list[int]:
    code = ("import json,sys; from drstream.daemon.shards import shard_of; "
            "pairs=json.loads(sys.argv[1]); "
            f"print(json.dumps([shard_of(t, p, {count}) for t, p in pairs]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(pairs)], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": seed})
    return list(json.loads(out.stdout))


def test_owner_is_the_same_in_every_process_whatever_the_hash_seed() -> None:
    pairs = [(f"topic-{i}", p) for i in range(20) for p in range(6)]
    here = [shard_of(t, p, 3) for t, p in pairs]
    assert owners_in_subprocess("1", pairs, 3) == here
    assert owners_in_subprocess("4242", pairs, 3) == here


def test_owner_values_are_pinned() -> None:
    """Written down once: a change here would make a restarted shard ship partitions
    another shard's log already holds, and leave others to nobody."""
    assert [shard_of("orders", p, 3) for p in range(8)] == [0, 1, 0, 2, 0, 1, 0, 2]
    assert [shard_of("orders", p, 2) for p in range(8)] == [0, 1, 0, 0, 0, 0, 1, 0]
    assert [shard_of("features.v2", p, 5) for p in range(8)] == [1, 1, 3, 0, 1, 3, 2, 0]
    assert shard_of("orders", 5, 1) == 0


def test_every_partition_has_one_owner_and_the_spread_is_even() -> None:
    counts = [0, 0, 0]
    for i in range(100):
        for p in range(12):
            owner = shard_of(f"t{i}", p, 3)
            owners = [k for k in range(3) if Shard(k, 3).owns(f"t{i}", p)]
            assert owners == [owner]
            counts[owner] += 1
    assert all(300 <= c <= 500 for c in counts), counts  # 1,200 partitions, 400 expected


@pytest.mark.parametrize(("value", "parsed"), [("0", (0, None)), ("2/3", (2, 3)),
                                               ("0/1", (0, 1))])
def test_parse_shard(value: str, parsed: tuple[int, int | None]) -> None:
    assert parse_shard(value) == parsed


@pytest.mark.parametrize("value", ["", "-1", "a", "3/3", "1/0", "1/", "/3", "1/300"])
def test_parse_shard_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        parse_shard(value)


def test_shard_config_names_its_log_runs_its_sources_and_ports() -> None:
    config = parse_config(BASE)
    assert config.shard_indexes() == [0, 1, 2]
    zero, two = config.for_shard(0), config.for_shard(2)
    assert (zero.log_id, two.log_id) == ("east-1-s0of3", "east-1-s2of3")
    assert shard_log_id("east-1", 0, 1) == "east-1"
    assert [s.stream for s in zero.sources] == ["kafka:primary", "mlflow:primary"]
    assert [s.stream for s in two.sources] == ["kafka:primary"]  # registry: shard 0 only
    assert [s.sink_name for s in two.sinks] == ["kafka:standby"]
    assert two.service.ship_metrics_listen == "127.0.0.1:9484"
    assert two.service.apply_metrics_listen == "127.0.0.1:9485"
    assert two.tip_address() == "127.0.0.1:9484"  # auto: the same shard's ship
    assert two.context().shard == Shard(2, 3)
    assert config.context().shard is None
    # the default transactional id and checkpoint key follow the shard's log id
    from drstream.connectors.kafka.sink import KafkaSink
    sink = KafkaSink(two.sinks[0], two.context())  # type: ignore[arg-type]
    assert sink.txn_id == "drstream-apply-east-1-s2of3-standby"


def test_tip_from_expands_the_shard() -> None:
    config = parse_config({**BASE, "apply": {"tip_from": "ship-{shard}.ship:9464"},
                           "shards": {"count": 3}})
    assert config.for_shard(1).tip_address() == "ship-1.ship:9464"


def test_a_set_of_one_is_the_plain_log() -> None:
    config = parse_config({**BASE, "shards": {"count": 1}})
    assert config.for_shard(0) is config
    assert config.for_shard(0).log_id == "east-1"


def test_shard_settings_are_checked() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "shards": {"count": 3, "index": 3}})
    assert [e.path for e in info.value.errors] == ["shards"]
    assert "index 3 is not below count 3" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "log_id": "x" * 125})
    assert "too long for a set of shards" in str(info.value)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    key = tmp_path / "k1.key"
    generate_key_file(key)
    raw = {**BASE, "keyring": {"active": "k1", "keys": {"k1": f"file:{key}"}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("command", ["ship", "apply"])
def test_ship_and_apply_of_a_set_need_a_shard(config_file: Path, command: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "--shard" in err and "shards.count is 3" in err


@pytest.mark.parametrize("value", ["3", "5/4", "x"])
def test_a_bad_shard_is_a_usage_error_naming_the_option(
        config_file: Path, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ship", "--config", str(config_file), "--shard", value]) == 2
    err = capsys.readouterr().err
    assert "--shard" in err and value in err


def test_validate_lists_every_shard(config_file: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "shard 0/3: log east-1-s0of3, sources ['kafka:primary', 'mlflow:primary']" in out
    assert "shard 2/3: log east-1-s2of3, sources ['kafka:primary']" in out
    assert main(["validate", str(config_file), "--shard", "1/2"]) == 0
    out = capsys.readouterr().out
    assert "shard 1/2: log east-1-s1of2" in out and "s0of2" not in out
