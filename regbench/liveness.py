"""Whether the process running a trial is alive: the age of the trial's last heartbeat, as ``regbench status`` shows
it. A worker killed with SIGKILL (or a lost machine) leaves its trial RUNNING in the store until another process
fails it as stale; until then status names it as running on a dead worker instead of as running.

The age is measured on the store's own clock where the store keeps one (an RDB heartbeat row against the database's
``now()``, as Optuna's stale-trial query does), and on wall-clock seconds for the journal file's heartbeat attribute.
"""
from __future__ import annotations

import time
from datetime import datetime

from regbench import record


def grace_of(storage, bench) -> int:
    """Seconds without a heartbeat after which a trial's process counts as dead (the benchmark's own setting if it
    recorded one, else the store's)."""
    from regbench import store

    beat = (getattr(bench, "extra", None) or {}).get("heartbeat") or {}
    if isinstance(beat, dict) and isinstance(beat.get("grace"), int) and beat["grace"] > 0:
        return beat["grace"]
    grace = getattr(storage, "grace_period", None)
    return int(grace) if grace else store.GRACE_PERIOD


def heartbeat_ages(storage, trials) -> dict[int, float | None]:
    """Seconds since each RUNNING trial's last heartbeat (None: it has none stored yet), by storage trial id."""
    from regbench import optuna_private

    running = [t for t in trials if t.state.name == "RUNNING"]
    ids = [optuna_private.trial_id(t) for t in running]
    if not ids:
        return {}
    if hasattr(storage, "scoped_session"):
        try:
            found = optuna_private.rdb_heartbeat_ages(storage, ids)
        except Exception:  # noqa: BLE001 - an old schema without the heartbeat table: liveness unknown
            found = {}
    else:
        now = time.time()
        found = {optuna_private.trial_id(t): now - float(t.system_attrs[record.HEARTBEAT]) for t in running
                 if isinstance(t.system_attrs.get(record.HEARTBEAT), (int, float))}
    return {tid: found.get(tid) for tid in ids}


def dead(storage, bench, trials) -> dict[int, float]:
    """RUNNING trials whose process is dead: no heartbeat for longer than the grace period, or none at all while the
    trial started longer ago than that (by the claiming machine's clock). Trial id -> seconds without a sign."""
    grace = grace_of(storage, bench)
    from regbench import optuna_private

    out = {}
    by_id = {optuna_private.trial_id(t): t for t in trials}
    for tid, age in heartbeat_ages(storage, trials).items():
        if age is None:
            start = by_id[tid].datetime_start
            age = (datetime.now() - start).total_seconds() if start is not None else None
        if age is not None and age > grace:
            out[tid] = age
    return out
