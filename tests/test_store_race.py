"""Several processes opening one fresh store at the same instant (workers started together on one PostgreSQL, a
reader polling a run's new SQLite file) all get it: the one that loses the schema-creation race retries. Several
workers claiming one queued trial at the same instant: exactly one gets it."""
import os
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from regbench.store import open_storage


def _together(act, prepare=lambda: None, processes: int = 4) -> list[str]:
    """Fork ``processes`` children that each run ``prepare()``, then ``act(prepared)`` at one shared wall-clock
    instant; their outcomes as text ("ok" when ``act`` returns None)."""
    start, children = time.time() + 2.0, []
    for _ in range(processes):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: prepare, spin to the shared instant, act, report, exit without pytest's teardown
            os.close(read)
            try:
                prepared = prepare()
                while time.time() < start:
                    pass
                outcome = act(prepared) or "ok"
            except BaseException as exc:  # noqa: BLE001 - reported to the parent as text
                outcome = str(exc)[:300] or type(exc).__name__
            os.write(write, outcome.encode())
            os._exit(0)
        os.close(write)
        children.append((pid, read))
    outcomes = []
    for pid, read in children:
        os.waitpid(pid, 0)
        outcomes.append(os.read(read, 1000).decode())
        os.close(read)
    return outcomes


def _open_together(url: str) -> list[str]:
    return _together(lambda _: open_storage(url) and None)


def _claim_together(url: str) -> list[str]:
    """Queue one trial, then let 4 processes claim it as Optuna's ``ask`` does (WAITING -> RUNNING)."""
    study = optuna.create_study(storage=open_storage(url), study_name=f"claim-{uuid.uuid4().hex[:12]}")
    study.enqueue_trial({})
    trial_id = study.get_trials()[0]._trial_id

    def claim(storage):
        return "won" if storage.set_trial_state_values(trial_id, TrialState.RUNNING) else "lost"
    return _together(claim, prepare=lambda: open_storage(url))


def test_concurrent_first_opens_of_one_sqlite_store_all_succeed(tmp_path):
    # Before the retry, 8 of 10 such rounds failed here ("table studies already exists", "UNIQUE constraint failed:
    # alembic_version.version_num").
    for round_ in range(6):
        outcomes = _open_together(f"sqlite:///{tmp_path / f'store{round_}.db'}")
        assert outcomes == ["ok"] * 4, outcomes


def test_concurrent_first_opens_of_one_postgresql_database_all_succeed(postgres_url):
    # Before the retry, 6 of 6 rounds failed ("duplicate key value violates unique constraint pg_type_typname_nsp_index").
    psycopg = pytest.importorskip("psycopg")
    from sqlalchemy.engine import make_url

    server = make_url(postgres_url)
    admin = server.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    for _ in range(3):
        name = f"regbench_race_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin, autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        try:
            url = server.set(database=name).render_as_string(hide_password=False)
            outcomes = _open_together(url)
            assert outcomes == ["ok"] * 4, outcomes
        finally:
            with psycopg.connect(admin, autocommit=True) as con:
                con.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_concurrent_claims_of_one_queued_trial_on_sqlite_have_one_winner(tmp_path):
    # Before BEGIN IMMEDIATE (regbench/store.py), 10 of 10 such rounds had 2 to 4 winners: workers trained one run
    # twice, and the second crashed telling a COMPLETE trial.
    for round_ in range(5):
        outcomes = _claim_together(f"sqlite:///{tmp_path / f'claim{round_}.db'}")
        assert sorted(outcomes) == ["lost"] * 3 + ["won"], outcomes


def test_concurrent_claims_of_one_queued_trial_on_postgresql_have_one_winner(postgres_url):
    # Optuna claims with SELECT ... FOR UPDATE here: the guard is that it stays so through upgrades.
    outcomes = _claim_together(postgres_url)
    assert sorted(outcomes) == ["lost"] * 3 + ["won"], outcomes
