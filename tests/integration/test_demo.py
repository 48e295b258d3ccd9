"""`make demo` works: the demo (its own clusters, ship, apply, a short load) ends with the
standby equal to the primary, record by record, and cleans up after itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_demo_standby_equals_primary() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.demo", "--seconds", "5", "--rate", "500"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    output = f"--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 0, output
    assert "standby == primary: OK" in result.stdout, output
    assert "drstream ship: SIGTERM -> exit 0" in result.stdout, output
    assert "drstream apply: SIGTERM -> exit 0" in result.stdout, output
    work_line = next(line for line in result.stdout.splitlines() if line.startswith("work dir "))
    assert not Path(work_line.removeprefix("work dir ")).exists(), "work dir left behind"
