"""The lag benchmark's numbers are honest: on a tiny case against the session's clusters,
drstream (ship + apply) and MirrorMaker 2 each deliver every produced record to the standby
reader, which matches each one by its stamp (id + produce time) exactly once; and the
matching itself notices a missing, a mis-stamped or an unknown record. No timing asserts."""

from __future__ import annotations

import array
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.lag import load_case, match_records, run_cases, write_report
from tests.infra.kafka import KafkaCluster

pytestmark = pytest.mark.integration

TINY = {
    "name": "tiny",
    "description": "a few seconds at a small rate, for the honesty test",
    "partitions": 3,
    "phases": [{"seconds": 1, "records_per_s": 100, "warmup": True},
               {"seconds": 3, "records_per_s": 150}],
    "settle_s": 0.5,
    "drain_timeout_s": 90,
    "mm2": {"tasks": 1},
}


def test_match_records_notices_missing_mismatched_and_unknown_records() -> None:
    produced = array.array("q", [100, 200, 300, 400])
    arrival = array.array("q", [150, 0, 390, 470, 0, 999])  # id 1 missing, id 5 unknown
    stamp = array.array("q", [100, 0, 301, 400, 0, 7])  # id 2 carries another produce time
    m = match_records(produced, arrival, stamp)
    assert (m["produced"], m["missing"], m["stamp_mismatch"], m["unknown_ids"]) == (4, 1, 1, 1)
    assert m["lags"] == [pytest.approx(50e-6), None, None, pytest.approx(70e-6)]


def check_honest(r: dict[str, Any], expected: int) -> None:
    rec = r["records"]
    where = f"{r['system']}: {json.dumps({k: v for k, v in r.items() if k != 'timeline'})}"
    assert r["caught_up"], where
    assert rec["produced"] == expected, where
    assert rec["arrived"] == rec["produced"], where
    assert (rec["missing"], rec["stamp_mismatch"], rec["unknown_ids"]) == (0, 0, 0), where
    assert r["duplicates"] == 0, where
    assert r["unmatched_on_standby"] == 0, where
    assert r["drstream_offset_mismatch"] == 0, where
    # Every measured record has a lag (arrival - its own produce time), none negative.
    assert r["lag_ms"]["count"] == r["measured_records"] > 0, where
    assert r["lag_ms"]["p50"] > 0, where
    assert sum(row[1] for row in r["timeline"]) == expected, where


def test_tiny_case_every_record_arrives_once_matched_by_its_stamp(
        primary_kafka: KafkaCluster, standby_kafka: KafkaCluster, tmp_path: Path) -> None:
    case_file = tmp_path / "tiny.json"
    case_file.write_text(json.dumps(TINY))
    case = load_case(case_file)
    report = run_cases([case], ["drstream", "mm2"], primary=primary_kafka.bootstrap_servers,
                       standby=standby_kafka.bootstrap_servers)
    assert report["failures"] == []
    assert [r["system"] for r in report["results"]] == ["drstream", "mm2"]
    for r in report["results"]:
        expected = sum(ph["records"] for ph in r["phases"])
        check_honest(r, expected)
        assert r["warmup_records"] == r["phases"][0]["records"] > 0
    drstream = report["results"][0]
    store = drstream["store"]
    assert store["rpo_unmapped_records"] == 0
    assert store["rpo_ms"]["count"] == drstream["measured_records"]
    assert store["data_segments"] > 0 and store["requests_per_min"]["PUT"] > 0
    assert all(v["exit_code"] == 0 for v in drstream["stop"].values()), drstream["stop"]

    report["command"] = "test"
    paths = write_report(report, tmp_path / "results", plot_png=False)
    assert [p.name for p in paths] == ["lag.json", "lag.md"]
    md = (tmp_path / "results" / "lag.md").read_text()
    assert "| tiny | drstream |" in md and "| tiny | MirrorMaker 2 |" in md
