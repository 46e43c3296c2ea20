"""A test hook that kills this process at a named point of its progress, to search the moments a crash can land.

``REGBENCH_FAULT_AT="<event>:<k>"`` makes the k-th ``point(event)`` of this process send itself SIGKILL (no cleanup,
no atexit, exactly like a kill -9 or a lost machine). Events: ``tune`` and ``final`` (a claimed trial of that kind
starts), ``epoch`` (a trial reported an epoch), ``mirror`` (halfway through mirroring a trial to MLflow), ``report``
(the leaderboard is written, its figures not yet attached), ``recover`` (a dead trial is failed, its retry not yet
queued: store.py's stale-trial callback, runner.fail_dead_trials). ``"<event>:<k>:full"`` fills the disk holding
$REGBENCH_FAULT_FILL at that point instead (``fill``). Unset, ``point`` is one dictionary lookup. Used by
tests/test_fault_injection.py, tests/test_oserrors.py and benchmarks/fault_sweep.py; not a user option (it is
deliberately undocumented in --help)."""
from __future__ import annotations

import os
import signal

ENV = "REGBENCH_FAULT_AT"
EVENTS = ("tune", "final", "epoch", "mirror", "report", "recover")  # every point() of the code base
_seen: dict[str, int] = {}


def point(event: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, k = spec.partition(":")
    if name != event:
        return
    k, _, action = k.partition(":")
    _seen[event] = _seen.get(event, 0) + 1
    if _seen[event] == int(k or 1):
        if action == "full":
            fill(os.environ[FILL_ENV])
            return
        os.kill(os.getpid(), signal.SIGKILL)


FILL_ENV = "REGBENCH_FAULT_FILL"


def fill(folder: str) -> None:
    """``<event>:<k>:full``: instead of a kill, the file system holding ``folder`` (a small tmpfs in the tests) is
    filled to the last byte at that point, and the process goes on: every later write there meets ENOSPC."""
    with open(os.path.join(folder, ".regbench-filler"), "ab", buffering=0) as f:  # unbuffered: close never fails
        for size in (1 << 16, 4096, 512, 1):  # then the last partial blocks
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                continue
