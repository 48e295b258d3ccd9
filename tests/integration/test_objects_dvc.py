"""A real DVC repository whose remote is replicated: `dvc push` to the primary remote (a
prefix of a bucket on the S3 API server), `drstream ship` and `drstream apply` copy it to
the standby remote, and `dvc pull` from the standby remote in a fresh clone restores
identical files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.infra.s3 import S3Server
from tests.integration.applylib import ProcessPool, process_pool
from tests.integration.objectslib import MiB, wait_equal, write_objects_config

pytestmark = pytest.mark.integration


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    with process_pool(tmp_path) as p:
        yield p


def _run(cwd: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    cmd = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else list(args)
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, f"{' '.join(args)}: exit {res.returncode}\n{res.stdout}\n" \
                                f"{res.stderr}"
    return res.stdout


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_dvc_pull_from_the_standby_remote_restores_identical_files(
        s3: S3Server, s3_creds_env: None, s3_buckets: Callable[[], str], pool: ProcessPool,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3.store_env().items():
        monkeypatch.setenv(k, v)
    primary, standby = s3_buckets(), s3_buckets()
    setup = write_objects_config(tmp_path, s3, source_bucket=primary, standby_bucket=standby,
                                 prefix="dvcstore", standby_prefix="dvcstore")
    ship, apply = pool.ship(setup), pool.apply(setup)
    ship.wait_ready(60)
    apply.wait_ready(60)

    repo = tmp_path / "repo"
    data = repo / "data"
    (data / "images").mkdir(parents=True)
    for i in range(20):
        (data / "images" / f"img-{i:02d}.bin").write_bytes(os.urandom(1000 + i))
    (data / "train data ü.csv").write_text("x,y\n" + "1,2\n" * 1000)
    (data / "weights.bin").write_bytes(os.urandom(7 * MiB))  # above one 5 MiB part
    (data / "copy-of-img-00.bin").write_bytes((data / "images" / "img-00.bin").read_bytes())
    _run(repo, "git", "init", "-q")
    _run(repo, "dvc", "init", "-q")
    for name, bucket in (("primary", primary), ("standby", standby)):
        _run(repo, "dvc", "remote", "add", name, f"s3://{bucket}/dvcstore")
        _run(repo, "dvc", "remote", "modify", name, "endpointurl", s3.endpoint_url)
    _run(repo, "dvc", "add", "data")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "data")
    _run(repo, "dvc", "push", "-r", "primary")

    pushed = wait_equal(s3, (primary, "dvcstore"), (standby, "dvcstore"), [ship, apply],
                        timeout=120)
    assert len(pushed) == 23  # each content once (two files share one) plus the .dir
    ship.stop_ok()
    apply.stop_ok()

    clone = tmp_path / "clone"
    _run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    _run(clone, "dvc", "pull", "-r", "standby")
    assert _files(clone / "data") == _files(data)
