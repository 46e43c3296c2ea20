"""`regbench postgres start|url|stop` (issue 22, item 5): a throwaway PostgreSQL in one command, used by a real worker,
which says once that its runs are not mirrored to MLflow when no tracking URI applies (item 3). Needs PostgreSQL's
server programs (CI installs them; elsewhere the test is skipped unless REGBENCH_REQUIRE_SERVICES=1)."""
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from helpers import need_postgres_driver, regbench_cli

from regbench.errors import ConfigError
from regbench.localpg import server_binaries


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster_dir():
    try:
        server_binaries()
    except ConfigError as exc:
        if os.environ.get("REGBENCH_REQUIRE_SERVICES") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    need_postgres_driver()
    # Directly under the temp dir: as root the cluster runs as the postgres user, which cannot enter pytest's
    # private (0700) tmp_path.
    folder = Path(tempfile.mkdtemp(prefix="regbench-pg-")) / "cluster"
    folder.parent.chmod(0o755)
    yield folder
    regbench_cli("postgres", "stop", "--dir", str(folder))
    shutil.rmtree(folder.parent, ignore_errors=True)


def test_postgres_start_serves_a_worker_then_stops(cluster_dir, tmp_path):
    port = _free_port()
    started = regbench_cli("postgres", "start", "--dir", str(cluster_dir), "--port", str(port), cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    url = started.stdout.strip()
    assert url == f"postgresql://postgres@127.0.0.1:{port}/regbench"
    assert regbench_cli("postgres", "url", "--dir", str(cluster_dir)).stdout.strip() == url  # port remembered
    again = regbench_cli("postgres", "start", "--dir", str(cluster_dir))  # already running: same URL, no error
    assert again.returncode == 0 and again.stdout.strip() == url, again.stderr

    out = tmp_path / "out"
    planned = regbench_cli("run", "--methods", "baseline", "--seeds", "1", "--dataset", "digits", "--model", "mlp",
                           "--epochs", "1", "--train-size", "100", "--quiet", "--storage", url, "--name", "pg1",
                           "--out", str(out), "--plan-only", cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    shutil.rmtree(out)  # the plan's MLflow store (OUT/mlflow.db) is not on "this machine" any more
    worker = regbench_cli("worker", "--storage", url, "--name", "pg1", "--checkpoint-dir", str(tmp_path / "ck"),
                          cwd=tmp_path)
    assert worker.returncode == 0, worker.stderr
    assert "[1/1] baseline seed 0" in worker.stderr
    notes = [line for line in worker.stderr.splitlines() if "not mirrored to MLflow" in line]
    assert len(notes) == 1 and f"regbench sync-mlflow --storage {url} --name pg1 --tracking-uri URI" in notes[0]

    stopped = regbench_cli("postgres", "stop", "--dir", str(cluster_dir), "--remove")
    assert stopped.returncode == 0 and not cluster_dir.exists(), stopped.stderr
    gone = regbench_cli("postgres", "url", "--dir", str(cluster_dir))
    assert gone.returncode == 2 and "no PostgreSQL is running" in gone.stderr


def test_each_user_has_a_server_of_their_own(tmp_path, monkeypatch):
    """Before: as root every session used /tmp/regbench-postgres and port 55433, so two users shared one server and
    either could stop it. Now: root's default folder is per user (who ran sudo), the port is a free one picked at the
    first start, and a folder another user created is refused (nothing in it is touched)."""
    from regbench import localpg

    if os.geteuid() == 0:
        monkeypatch.setenv("SUDO_USER", "alice")
        assert localpg.default_folder() == Path(tempfile.gettempdir()) / "regbench-postgres-alice"
        monkeypatch.delenv("SUDO_USER")
        assert localpg.default_folder() == Path(tempfile.gettempdir()) / "regbench-postgres-root"
    fresh = localpg.LocalPostgres(tmp_path / "mine")
    with socket.socket() as s:
        s.bind(("127.0.0.1", fresh.port))  # a free port, not a fixed one
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "owner").write_text("bob\n")
    for action in ("start", "stop", "url"):
        res = regbench_cli("postgres", action, "--dir", str(theirs))
        assert res.returncode == 2 and f"{theirs} holds the PostgreSQL of user 'bob', not yours" in res.stderr, \
            res.stderr
    assert sorted(p.name for p in theirs.iterdir()) == ["owner"]
