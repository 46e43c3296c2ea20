"""Several processes opening one fresh store at the same instant (workers started together on one PostgreSQL, a
reader polling a run's new SQLite file) all get it: the one that loses the schema-creation race retries."""
import os
import time
import uuid

import pytest

from regbench.store import open_storage


def _open_together(url: str, processes: int = 4) -> list[str]:
    """Fork ``processes`` children that call open_storage(url) at the same wall-clock instant; their outcomes."""
    start, children = time.time() + 0.5, []
    for _ in range(processes):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: spin to the shared instant, open, report, exit without pytest's teardown
            os.close(read)
            while time.time() < start:
                pass
            try:
                open_storage(url)
                outcome = "ok"
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
