"""The Ctrl-C/SIGTERM stop flag shared by the CLI (which sets it from its signal handlers) and the training loop and
protocol (which stop at their next safe point). Its own module so that neither imports the other for it."""
from __future__ import annotations

import contextlib


class _StopRequest:
    """A Ctrl-C/SIGTERM that arrived inside a stoppable region (a trial, its training loop): the code there stops at
    its next safe point (the loop: after its current optimizer step, with a mid-epoch checkpoint) by raising
    ``exception``. Set from the CLI's signal handlers."""

    depth = 0                                   # nested stoppable regions now running
    exception: type[BaseException] | None = None


def request_stop(exception: type[BaseException]) -> bool:
    """Ask the running stoppable region to stop at its next safe point by raising ``exception``. Returns False when
    none runs or a stop is already pending (a second Ctrl-C), so the caller raises at once instead."""
    if _StopRequest.depth == 0 or _StopRequest.exception is not None:
        return False
    _StopRequest.exception = exception
    return True


def stop_requested() -> bool:
    """Whether a Ctrl-C/SIGTERM asked the running loop to stop; loops check it after each optimizer step."""
    return _StopRequest.exception is not None


def take_stop() -> type[BaseException] | None:
    """The exception the pending stop asked for (clearing it): the loop raises it once its checkpoint is saved."""
    exception, _StopRequest.exception = _StopRequest.exception, None
    return exception


@contextlib.contextmanager
def stoppable():
    """A region where a Ctrl-C/SIGTERM waits for a safe point instead of raising wherever it lands (half-way through
    a storage write, say). Regions nest: a trial holds its training loop, which checks ``stop_requested`` after each
    step. A stop still pending when the outermost region ends normally (it landed after the loop's last check: the
    final evaluation, Optuna recording the trial) is raised there, once that work is done; one pending when a region
    is left by an exception is dropped with it, as that exception already unwinds the command."""
    if _StopRequest.depth == 0:
        _StopRequest.exception = None
    _StopRequest.depth += 1
    try:
        yield
    except BaseException:
        _StopRequest.depth -= 1
        if _StopRequest.depth == 0:
            _StopRequest.exception = None
        raise
    _StopRequest.depth -= 1
    if _StopRequest.depth == 0 and _StopRequest.exception is not None:
        raise take_stop()()
