"""`drstream bench` against the test clusters, through a running ship and apply: every
record it produced arrives exactly once, the bench topic is created and removed by it,
and its lag agrees with the benchmark harness's reader (benchmarks/lag, `_read`) timing
the same records on the same standby at the same time. No timing asserts: the two
measurements of one run are compared with each other."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.lag.analysis import match_records
from benchmarks.lag.base import StatusFile
from benchmarks.lag.read import load_arrivals
from drstream.connectors.kafka.common import Cluster
from drstream.connectors.kafka.verify import delete_topics
from drstream.daemon.bench import summarize_ms
from tests.infra.kafka import KafkaCluster
from tests.integration.applylib import (
    ProcessPool,
    file_store,
    process_pool,
    topic_exists,
    unique,
    write_dr_config,
)
from tests.support.procs import ROOT, drstream, show, wait_for

pytestmark = pytest.mark.integration

RATE, SECONDS, PARTITIONS = 300, 6, 3
# Two readers of one standby, each polling every <= 50 ms: their arrival times of a record
# differ by about that, and by the scheduling of two processes on a shared machine.
AGREE_MS = 100
AGREE_FRACTION = 0.25


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


def test_bench_counts_every_record_and_agrees_with_the_harness_reader(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path,
    pool: ProcessPool,
) -> None:
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    prefix = unique("benchcli")
    topic = f"{prefix}-load"
    setup = write_dr_config(tmp_path, store=file_store(tmp_path), source_bootstrap=primary,
                            sink_bootstrap=standby, include=[f"{prefix}-.*"])
    ship, apply = pool.ship(setup), pool.apply(setup)
    ship.wait_ready()
    apply.wait_ready()

    status = StatusFile(tmp_path / "reader.status.json")
    arrivals = tmp_path / "arrivals.bin"
    spec = {"bootstrap": standby, "topic": topic, "partitions": PARTITIONS}
    with (tmp_path / "reader.log").open("wb") as out:
        reader = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.lag", "_read", "--spec", json.dumps(spec),
             "--status", str(status.path), "--out", str(arrivals)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: bool(status.read()), 30, "the harness reader to start")
        # --keep: the harness reader may still be reading when the bench is done
        res = drstream("bench", "--config", str(setup.path), "--topic", topic,
                       "--rate", str(RATE), "--duration", str(SECONDS),
                       "--partitions", str(PARTITIONS), "--keep", "--json", "--out",
                       str(tmp_path / "bench.json"), timeout=240)
        assert res.returncode == 0, show(res)
        # the load is paced by time: a loaded machine may produce a few records fewer
        produced = json.loads(res.stdout)["records"]["produced"]
        assert 0.9 * RATE * SECONDS <= produced <= RATE * SECONDS, res.stdout
        wait_for(lambda: status.read().get("seen", 0) >= produced, 60,
                 f"the harness reader to see every record: {status.read()}\n{res.stdout}"
                 f"\n{res.stderr}")
    finally:
        reader.send_signal(signal.SIGTERM)
        reader.wait(timeout=60)
        delete_topics(Cluster(primary), [topic])
        delete_topics(Cluster(standby), [topic])
    report = json.loads(res.stdout)
    assert json.loads((tmp_path / "bench.json").read_text()) == report
    check_counts(report, produced)
    assert report["rpo_ms"]["count"] == produced and report["rpo_unseen_records"] == 0
    assert 0 < report["rpo_ms"]["p50"] <= report["lag_ms"]["p50"] + AGREE_MS, report

    # the harness reader timed the same records: stamps are the bench's produce times
    arrival, stamp = load_arrivals(arrivals)
    harness = match_records(stamp, arrival, stamp)
    assert harness["produced"] == harness["arrived"] == produced, harness
    assert status.read()["dups"] == 0 and status.read()["unmatched"] == 0
    theirs = summarize_ms([x for x in harness["lags"] if x is not None])
    ours = report["lag_ms"]
    print(f"bench lag {ours}\nharness lag {theirs}")
    for q in ("p50", "p95"):
        assert abs(ours[q] - theirs[q]) <= max(AGREE_MS, AGREE_FRACTION * theirs[q]), (q, ours,
                                                                                     theirs)


def check_counts(report: dict[str, Any], expected: int) -> None:
    rec = report["records"]
    assert report["ok"] and rec["produced"] == rec["arrived"] == expected, report
    assert (rec["missing"], rec["duplicates"], rec["unknown"], rec["failed"]) == (0, 0, 0, 0)
    assert report["lag_ms"]["count"] == expected and report["lag_ms"]["p50"] > 0


def test_bench_creates_and_removes_its_topic_on_both_clusters(
    primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path,
    pool: ProcessPool,
) -> None:
    primary, standby = primary_kafka.bootstrap_servers, standby_kafka.bootstrap_servers
    prefix = unique("benchrm")
    setup = write_dr_config(tmp_path, store=file_store(tmp_path), source_bootstrap=primary,
                            sink_bootstrap=standby, include=[f"{prefix}-.*"])
    ship, apply = pool.ship(setup), pool.apply(setup)
    ship.wait_ready()
    apply.wait_ready()
    config = ["bench", "--config", str(setup.path), "--rate", "100", "--duration", "1"]
    outside = drstream(*config, "--topic", "not-selected")  # ship would never read it
    assert outside.returncode == 2 and "--topic" in outside.stderr, show(outside)
    topic = f"{prefix}-load"
    res = drstream(*config, "--topic", topic, "--json", timeout=240)
    assert res.returncode == 0, show(res)
    report = json.loads(res.stdout)
    check_counts(report, 100)
    assert len(report["removed"]) == 2, report
    assert not topic_exists(primary, topic) and not topic_exists(standby, topic)
    assert not topic_exists(primary, "not-selected")
