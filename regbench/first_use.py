"""Opening a store another process is creating at the same moment: retry the few times it takes.

Optuna and MLflow both create a fresh database's schema on first use; workers started together on one PostgreSQL, or
a reader polling a run's SQLite file, collide with the creator ("already exists", "duplicate key", "online migration
expected …"). The tables are there a moment later, and a retry then only reads them. Both stores retry the same way.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
RETRIES = 8


def retry_first_use(open_store: Callable[[], T], lost_race: Callable[[Exception], bool]) -> T:
    """``open_store()``, retried with a growing random wait while it fails with an error ``lost_race`` accepts."""
    for attempt in range(RETRIES + 1):
        try:
            return open_store()
        except Exception as exc:
            if attempt == RETRIES or not lost_race(exc):
                raise
            time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))
    raise AssertionError("unreachable")
