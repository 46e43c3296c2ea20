"""The store is Optuna's storage: opening it, reading what a benchmark holds, and guarding a local output dir.

Reports and stats read the store through this module only, so they never import training code
(docs/architecture.md, "Data flows one way").
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import optuna
from filelock import FileLock, Timeout
from optuna.trial import TrialState

from regbench import optuna_private, record
from regbench.first_use import retry_first_use
from regbench.errors import StorageError

STORE_FILE = "regbench.db"
LOCK_FILE = ".regbench.lock"
PID_FILE = ".regbench.pid"


def default_storage_url(out_dir: Path) -> str:
    return f"sqlite:///{(out_dir / STORE_FILE).resolve()}"


def safe_url(url: str) -> str:
    """The URL with any password masked, for printing and for the spec kept in the store."""
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL: nothing to mask
        return url


def open_storage(url: str):
    """An Optuna storage for an RDB URL (sqlite, postgresql, mysql) or a journal file (``journal:PATH`` or *.log)."""
    try:
        if url.startswith("journal:") or url.endswith((".log", ".jsonl")):
            from optuna.storages.journal import JournalFileBackend

            path = Path(url.removeprefix("journal:")).expanduser()
            if not path.parent.is_dir():
                raise StorageError(f"cannot open storage {safe_url(url)!r}: folder {path.parent} does not exist")
            return JournalStore(JournalFileBackend(str(path)))
        if "://" not in url:
            raise StorageError(f"cannot open storage {safe_url(url)!r}: not a URL; use sqlite:///PATH.db, "
                               f"postgresql://USER@HOST/DB or journal:PATH.log")
        if url.startswith("sqlite:///"):
            folder = Path(url.removeprefix("sqlite:///")).expanduser().parent
            if not folder.is_dir():
                raise StorageError(f"cannot open storage {safe_url(url)!r}: folder {folder} does not exist")
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        return _rdb_storage(url, kwargs)
    except StorageError:
        raise
    except Exception as exc:  # sqlalchemy / driver errors: keep the first line, it names the cause
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "DB access module" in reason or isinstance(exc, ImportError):
            raise StorageError(f"cannot open storage {safe_url(url)!r}: its database driver is not installed; "
                               f"pip install 'regbench[postgres]' (or the driver for that URL)") from None
        raise StorageError(f"cannot open storage {safe_url(url)!r}: {reason[:200]}; use sqlite:///PATH.db, "
                           f"postgresql://USER@HOST/DB or journal:PATH.log") from None


HEARTBEAT_INTERVAL = 10  # seconds; a RUNNING trial with no heartbeat for GRACE_PERIOD is failed and retried once
GRACE_PERIOD = 30


def retry_callback():
    """Optuna's own retry of a stale trial (same params and user attrs, queued again), at most once."""
    import warnings

    from optuna import storages

    cls = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    with warnings.catch_warnings():  # experimental/deprecated class warnings
        warnings.simplefilter("ignore")
        return cls(max_retry=1)




def _retry_stale(study, trial) -> None:
    """Optuna's stale-trial callback: queue the retry of a trial Optuna has just failed (at most once; the reason was
    written while the trial was still RUNNING, by ``_StaleReasons``). The copy is the run as it was, without the
    dead attempt's attributes (its fail_reason above all), so it is a plain queued run with the same params."""
    from regbench import faults

    faults.point("recover")  # test hook: a crash after the stale trial is failed, before its retry is queued
    retry_callback()(study, _as_retried(trial))


def _as_retried(trial):
    """The trial as its retry copy starts: the run's attrs without the dead attempt's, no heartbeat of its own."""
    import copy

    clean = copy.copy(trial)
    clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in record.ATTEMPT_ATTRS}
    clean.system_attrs = {k: v for k, v in trial.system_attrs.items() if k != record.HEARTBEAT}
    return clean




def stale_reason(trial, grace: int) -> str:
    """Why a stale trial is failed: it is retried once (a copy queued with the same params) unless it already was a
    retry, in which case it is a failure (a run that kills its process twice)."""
    first = trial.system_attrs.get(record.RETRY_HISTORY) or []
    if first:
        return (f"{record.ERROR} {record.STALE} for {grace} s ({record.DIED}) and it was already the retry of trial "
                f"{first[0]}; not retried again")
    return f"{record.INTERRUPTED} {record.STALE} for {grace} s ({record.DIED}); queued to retry with the same params"


class _StaleReasons:
    """Finds stale trials for Optuna's ``fail_stale_trials`` and writes each one's reason first.

    Optuna fails a stale trial and only then calls the stale-trial callback, which may no longer write to it (the
    storage refuses any change to a finished trial: UpdateFinishedTrialError). So the reason is written
    here, while the trial is still RUNNING, just before Optuna fails it. Two processes that find the same stale trial
    both write the same reason; the storage lets exactly one of them fail it (the other gets
    UpdateFinishedTrialError, which Optuna ignores), and only that one runs the callback, so the retry is queued
    once. A trial whose process died before its first heartbeat was stored is stale too once it has been seen
    without one for the grace period (Optuna skips trials without a heartbeat, so such a trial stayed RUNNING
    forever)."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        self._requeue_lost_retries(study_id)
        ids = list(dict.fromkeys(self._stale_ids(study_id)))
        grace = self._grace()
        for trial_id in ids:
            try:
                self.set_trial_user_attr(trial_id, record.FAIL_REASON, stale_reason(self.get_trial(trial_id), grace))
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # finished meanwhile (failed by another process, or its worker was alive after all)
        return ids

    def _requeue_lost_retries(self, study_id: int) -> None:
        """Queue the retry of a dead trial whose retry was never queued: the process that failed it died before it
        queued the copy (a crash inside the recovery itself). Only trials failed as dead ("its process died") more
        than a heartbeat interval ago, so the process that failed them has had ample time to queue the copy. Two
        processes may both queue one here; the claim then skips the second as a duplicate (same config key), so the
        run is still trained once."""
        from datetime import datetime, timedelta

        failed = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.FAIL,))
        dead = [t for t in failed if record.fail_reason(t).startswith(record.INTERRUPTED)
                and record.DIED in record.fail_reason(t) and t.datetime_complete is not None
                and t.datetime_complete < datetime.now() - timedelta(seconds=self.heartbeat_interval or 10)]
        if not dead:
            return
        retried = {n for t in self.get_all_trials(study_id, deepcopy=False) for n in t.system_attrs.get(
            record.RETRY_HISTORY, [])}
        for t in dead:
            if t.number not in retried and not t.system_attrs.get(record.RETRY_HISTORY):
                history = [t.number]
                template = optuna.trial.create_trial(
                    state=TrialState.WAITING, params=t.params, distributions=t.distributions,
                    user_attrs=_as_retried(t).user_attrs,
                    system_attrs={**_as_retried(t).system_attrs, record.FAILED_TRIAL: t.number,
                                  record.RETRY_HISTORY: history})
                self.create_new_trial(study_id, template_trial=template)

    def _grace(self) -> int:
        return int(self.grace_period if self.grace_period is not None else 2 * self.heartbeat_interval)

    def _never_beat(self, study_id: int, beating: set[int]) -> list[int]:
        """RUNNING trials with no heartbeat stored, seen so by this process for longer than the grace period.

        Measured on this process's monotonic clock from when it first saw the trial without a heartbeat, not from
        the trial's start time: that is written by the claiming machine's clock in its local time zone, so comparing
        it here could fail a live trial claimed a moment ago on a machine with another clock or zone."""
        now, seen = time.monotonic(), self.__dict__.setdefault("_unbeaten_since", {})
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        unbeaten = [optuna_private.trial_id(t) for t in running if optuna_private.trial_id(t) not in beating]
        for trial_id in unbeaten:
            seen.setdefault(trial_id, now)
        return [trial_id for trial_id in unbeaten if now - seen[trial_id] > self._grace()]


class RDBStore(_StaleReasons, optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose stale trials carry their reason (``_StaleReasons``)."""

    def _stale_ids(self, study_id: int) -> list[int]:
        beating = optuna_private.rdb_trials_with_heartbeat(self, study_id)
        return optuna_private.rdb_stale_trial_ids(self, study_id) + self._never_beat(study_id, beating)


class JournalStore(_StaleReasons, optuna.storages.JournalStorage, optuna_private.BaseHeartbeat):
    """Optuna's JournalStorage with a heartbeat (Optuna 5.1's has none, so a killed process's trial stayed RUNNING
    and a rerun waited for it forever): each beat is the trial's system attr ``regbench:heartbeat`` (wall-clock
    seconds; the machines sharing a journal file must agree on the time to within the grace period)."""

    heartbeat_interval, grace_period = HEARTBEAT_INTERVAL, GRACE_PERIOD

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, record.HEARTBEAT, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # the trial ended between two beats

    def _stale_ids(self, study_id: int) -> list[int]:
        now, running = time.time(), self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        beats = {optuna_private.trial_id(t): t.system_attrs[record.HEARTBEAT] for t in running
                 if record.HEARTBEAT in t.system_attrs}
        stale = [tid for tid, beat in beats.items() if now - beat > self._grace()]
        return stale + self._never_beat(study_id, set(beats))

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return _retry_stale


def _rdb_storage(url: str, engine_kwargs: dict):
    import inspect
    import warnings

    params = inspect.signature(optuna.storages.RDBStorage).parameters
    name = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"

    def open_once():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = RDBStore(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL,
                               grace_period=GRACE_PERIOD, **{name: _retry_stale})
        if url.startswith("sqlite"):
            _serialize_sqlite_transactions(storage.engine)
        return storage

    return retry_first_use(open_once, _lost_schema_race)


def _serialize_sqlite_transactions(engine) -> None:
    """Every transaction on a SQLite store takes the write lock when it begins (BEGIN IMMEDIATE).

    Python's sqlite3 driver starts a transaction only at the first write, so the read half of a read-then-write runs
    outside it: Optuna's claim of a queued trial (read WAITING, then set RUNNING) then succeeded in several processes
    at once for the same trial (measured: 4 processes claiming one trial, 2 to 4 winners in 10 of 10 rounds), and
    workers trained the same run twice, the second crashing on "Cannot tell a COMPLETE trial". This is SQLAlchemy's
    documented recipe for pysqlite transactions; PostgreSQL needs none (Optuna claims with SELECT ... FOR UPDATE)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _driver_leaves_transactions_to_us(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_with_the_write_lock(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while Optuna created the schema predate the listeners


def _lost_schema_race(exc: Exception) -> bool:
    """Whether opening failed only because a concurrent open created the schema (or its version row) first."""
    import sqlalchemy.exc

    if not isinstance(exc, sqlalchemy.exc.DBAPIError):
        return False
    text = str(exc).lower()
    return "already exists" in text or "alembic_version" in text or "duplicate key" in text


def load_spec(storage, benchmark: str) -> dict | None:
    try:
        study = optuna.load_study(study_name=record.spec_study_name(benchmark), storage=storage)
    except KeyError:
        return None
    return study.user_attrs.get(record.SPEC)


def final_trials(storage, benchmark: str, method: str, group_key: str | None = None) -> list:
    """COMPLETE final trials of one method (optionally one configuration), oldest first."""
    try:
        study = optuna.load_study(study_name=record.final_study_name(benchmark, method), storage=storage)
    except KeyError:
        return []
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    seen, out = set(), []
    for t in trials:  # a run is counted once even if two workers raced to it
        if (group_key is None or record.group_key(t) == group_key) and record.config_key(t) not in seen:
            seen.add(record.config_key(t))
            out.append(t)
    return out


def selection(storage, benchmark: str, method: str, info: dict) -> dict:
    """The configuration a method's finals run (its group key, hparams and where it came from), as recorded by the
    protocol; older specs carry the group key themselves."""
    if "group_key" in info:
        return {"group_key": info["group_key"], "hparams": info.get("hparams", {}), "shared": {}}
    study = optuna.load_study(study_name=record.spec_study_name(benchmark), storage=storage)
    return study.user_attrs.get(record.selection_attr(method, info.get("ident"))) or {}


def completed_values(storage, study_name: str) -> list[tuple[int, float]]:
    """(trial number, objective value) of a study's completed trials: a tuning curve."""
    return [(t.number, t.value) for t in trials_of(storage, study_name) if t.state == TrialState.COMPLETE]


def trials_of(storage, study_name: str | None) -> list:
    """A study's trials, less the queued runs a superseding plan cancelled (they never trained)."""
    if not study_name:
        return []
    try:
        trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return []
    return [t for t in trials if not record.superseded(t)]


def plan_finals(storage, benchmark: str, method: str, info: dict, seeds) -> list:
    """Every final trial (any state) of the benchmark's current plan for one method: its selected configuration over
    the plan's seeds. Runs of a superseded plan, of an earlier selection or of seeds the plan does not name are not
    the current plan's, so no budget, status or MLflow parent counts them."""
    group_key = selection(storage, benchmark, method, info).get("group_key")
    if group_key is None:
        return []
    seeds = set(seeds)
    return [t for t in trials_of(storage, record.final_study_name(benchmark, method))
            if record.group_key(t) == group_key and record.seed(t) in seeds]


class OutputLock:
    """One writer per output dir: an OS file lock (filelock → flock), released by the kernel when its holder dies, so
    a crashed run never blocks the next one. The holder's pid is written beside it, only to name it in the error."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_FILE
        self.pid_path = out_dir / PID_FILE
        self._lock = FileLock(str(self.path), timeout=0)

    def acquire(self) -> None:
        try:
            self._lock.acquire()
        except Timeout:
            try:
                holder = f"pid {int(self.pid_path.read_text().strip())}"
            except (OSError, ValueError):
                holder = "another process"
            raise StorageError(f"output dir {self.path.parent} is in use by regbench {holder}; "
                               f"wait for it to finish or use another --out") from None
        self.pid_path.write_text(str(os.getpid()))

    def release(self) -> None:
        if self._lock.is_locked:
            self.pid_path.unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
