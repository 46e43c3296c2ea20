"""The store is Optuna's storage: opening it, reading what a benchmark holds, and guarding a local output dir.

Reports and stats read the store through this module only, so they never import training code (DESIGN.md §2).
"""
from __future__ import annotations

import os
from pathlib import Path

import optuna

from optuna.trial import TrialState

from regbench.errors import StorageError

STORE_FILE = "regbench.db"
SPEC_ATTR = "spec"  # the <benchmark> study's user attr holding what the last command asked for
LOCK_FILE = ".regbench.lock"


def default_storage_url(out_dir: Path) -> str:
    return f"sqlite:///{(out_dir / STORE_FILE).resolve()}"


def open_storage(url: str):
    """An Optuna storage for an RDB URL (sqlite, postgresql, mysql) or a journal file (``journal:PATH`` or *.log)."""
    try:
        if url.startswith("journal:") or url.endswith((".log", ".jsonl")):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url.removeprefix("journal:")).expanduser()
            if not path.parent.is_dir():
                raise StorageError(f"cannot open storage {url!r}: folder {path.parent} does not exist")
            return JournalStorage(JournalFileBackend(str(path)))
        if "://" not in url:
            raise StorageError(f"cannot open storage {url!r}: not a URL; use sqlite:///PATH.db, "
                               f"postgresql://USER@HOST/DB or journal:PATH.log")
        if url.startswith("sqlite:///"):
            folder = Path(url.removeprefix("sqlite:///")).expanduser().parent
            if not folder.is_dir():
                raise StorageError(f"cannot open storage {url!r}: folder {folder} does not exist")
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except StorageError:
        raise
    except Exception as exc:  # sqlalchemy / driver errors: keep the first line, it names the cause
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "DB access module" in reason or isinstance(exc, ImportError):
            raise StorageError(f"cannot open storage {url!r}: its database driver is not installed; "
                               f"pip install 'regbench[postgres]' (or the driver for that URL)") from None
        raise StorageError(f"cannot open storage {url!r}: {reason[:200]}; use sqlite:///PATH.db, "
                           f"postgresql://USER@HOST/DB or journal:PATH.log") from None


def final_study_name(benchmark: str, method: str) -> str:
    return f"{benchmark}:{method}:final"


def load_spec(storage, benchmark: str) -> dict | None:
    try:
        study = optuna.load_study(study_name=benchmark, storage=storage)
    except KeyError:
        return None
    return study.user_attrs.get(SPEC_ATTR)


def final_trials(storage, benchmark: str, method: str, group_key: str | None = None) -> list:
    """COMPLETE final trials of one method (optionally one configuration), oldest first."""
    try:
        study = optuna.load_study(study_name=final_study_name(benchmark, method), storage=storage)
    except KeyError:
        return []
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in trials if group_key is None or t.user_attrs.get("group_key") == group_key]


class OutputLock:
    """One writer per output dir: a pid file created atomically; a lock whose holder is gone is taken over."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and _alive(holder):
                    raise StorageError(f"output dir {self.path.parent} is in use by regbench pid {holder}; "
                                       f"wait for it or use another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its holder died
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self.held = True
            return
        raise StorageError(f"could not lock output dir {self.path.parent}; remove {self.path} if no regbench runs")

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
