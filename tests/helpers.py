"""Helpers shared by the test modules (importable: pytest puts tests/ on sys.path)."""
import contextlib
import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["--epochs", "2", "--seeds", "2", "--quiet"]


def snapshot(folder: Path) -> dict:
    """Every file under folder with its bytes' hash: equal snapshots mean nothing was written."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def regbench_cli(*args: str, env_extra: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    script = Path(sys.executable).parent / "regbench"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "regbench.cli"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(env_extra or {})
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def with_ctrl_c():
    """Popen's ``preexec_fn`` for a child that a test sends SIGINT: restores SIGINT's default disposition, which a
    test run started in the background by a non-interactive shell (``cmd &``, nohup) inherits as ignored. Python,
    and so ``regbench``, keeps an ignored SIGINT ignored, as background jobs should."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def attached(method, model_name: str = "mlp", input_shape=(1, 40)):
    """``method`` attached to a real model through the engine's real context; returns the capture keys it asked for."""
    from regbench import engine, models

    model = models.create_model(model_name, 10, input_shape)
    capture = engine.ActivationCapture(model)
    method.attach(model, engine.ModelContext(model, capture, 10, input_shape))
    return capture.keys()


def trial_states(db: Path, study: str) -> list[str]:
    """A study's trial states by number, read through a read-only sqlite3 connection ([] until the schema exists).
    For polling a store that a run under test is writing: opening it with Optuna would write to it (schema, version
    row) and race the run."""
    if not db.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            rows = con.execute("SELECT t.state FROM trials t JOIN studies s ON t.study_id = s.study_id "
                               "WHERE s.study_name = ? ORDER BY t.number", (study,)).fetchall()
    except sqlite3.OperationalError:  # schema not created yet
        return []
    return [state for (state,) in rows]


def running_epochs(db: Path, study: str) -> int:
    """Epochs the study's running trial has reported (0 when none runs or the schema is not there yet), read like
    ``trial_states``: a test signals a run only once it is inside its training loop, with epochs still to go."""
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            [(count,)] = con.execute(
                "SELECT COUNT(*) FROM trial_intermediate_values v JOIN trials t ON v.trial_id = t.trial_id "
                "JOIN studies s ON t.study_id = s.study_id WHERE s.study_name = ? AND t.state = 'RUNNING'",
                (study,)).fetchall()
    except sqlite3.OperationalError:
        return 0
    return count


def need_postgres_driver() -> None:
    """A server without the client driver is a half-installed environment (``pip install -e .[dev]`` alone): skip with
    the fix, or fail under REGBENCH_REQUIRE_SERVICES=1, instead of failing deep inside SQLAlchemy."""
    import importlib.util

    if importlib.util.find_spec("psycopg") is None:
        why = "PostgreSQL tests need its driver: pip install -e '.[dev,postgres]'"
        if os.environ.get("REGBENCH_REQUIRE_SERVICES") == "1":
            pytest.fail(why)
        pytest.skip(why)
