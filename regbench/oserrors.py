"""Operating-system errors as the user sees them: one line naming the path and what the system said, exit 74.

A full disk, a read-only mount, a permission, a symlink loop or the open-file limit is not a bug in regbench and not
a mistake in a command's arguments either: it is the machine. ``cli.main`` passes every exception that is not a
``RegbenchError`` through ``translate`` before the bug handler sees it; an ``OSError`` of one of ``ERRNOS`` anywhere
in its chain (``__cause__``/``__context__``, a SQLAlchemy error's ``orig``), or a database driver's message that
spells one ("database or disk is full", "attempt to write a readonly database", "disk I/O error"), becomes an
``IOFailure``: exit status 74, sysexits' EX_IOERR (distinct from 2, a mistake in the input, and 70, a bug).
"""
from __future__ import annotations

import errno
import os

EXIT_IOERR = 74  # EX_IOERR (sysexits.h)

# errno -> what to do about it (the system's own words come first in the line)
ERRNOS = {
    errno.ENOSPC: "free space there (or use another --out), then rerun the same command to resume",
    errno.EDQUOT: "free space within your quota there (or use another --out), then rerun the same command",
    errno.EROFS: "the file system is mounted read-only; use a writable location",
    errno.EACCES: "fix its permissions, or use a location you can write to",
    errno.EPERM: "fix its permissions, or use a location you can write to",
    errno.ELOOP: "a symbolic link there points back into itself; remove or fix the link",
    errno.EMFILE: "this process may open too few files; raise the limit (ulimit -n) and rerun",
    errno.ENFILE: "the system's open-file table is full; close some programs and rerun",
    errno.EIO: "the device reported an I/O error; check the disk, then rerun",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ENOTDIR: "a part of that path is a file where a folder is expected; rename it or use another path",
    errno.EISDIR: "a folder is where a file is expected; rename it or use another path",
    errno.EFBIG: "the file is larger than this file system allows; use another location",
    errno.ENXIO: "the device is gone; check the mount",
    errno.ENODEV: "the device is gone; check the mount",
    errno.ESTALE: "the network file system lost the file; remount, then rerun",
    errno.ETXTBSY: "the file is busy; retry once the other program finished",
}

# Database drivers that report an OS error in words only (SQLite through sqlite3 / SQLAlchemy / Optuna).
MESSAGES = (
    ("database or disk is full", errno.ENOSPC),
    ("disk is full", errno.ENOSPC),
    ("no space left on device", errno.ENOSPC),
    ("attempt to write a readonly database", errno.EROFS),
    ("read-only file system", errno.EROFS),
    ("disk i/o error", errno.EIO),
    ("too many open files", errno.EMFILE),
    ("permission denied", errno.EACCES),
)


class IOFailure(Exception):
    """An operating-system error met while doing the work: one line, exit ``EXIT_IOERR``."""

    exit_status = EXIT_IOERR


def _chain(exc: BaseException):
    """``exc`` and every exception behind it (cause, context, a DBAPI error's ``orig``), each once."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen or len(seen) > 20:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "orig", None)]


def describe(err: OSError, path=None) -> str:
    """One line for an OSError: the path, what the system said, and what to do."""
    code = err.errno
    name = errno.errorcode.get(code, "")
    said = err.strerror or os.strerror(code) if code else str(err)
    where = err.filename if err.filename is not None else path
    target = f" {err.filename2}" if getattr(err, "filename2", None) else ""
    place = f"{os.fsdecode(where)}{target}: " if where is not None else ""
    return f"{place}{said} ({name}); {ERRNOS.get(code, 'check that path, then rerun')}"


def translate(exc: BaseException, hint: str | None = None) -> IOFailure | None:
    """An ``IOFailure`` for an exception caused by the operating system, else None (a bug, or not ours to name).
    ``hint`` names the place when the error does not carry a path (a database driver's message): the store."""
    if isinstance(exc, IOFailure):
        return exc
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in ERRNOS and not isinstance(e, BrokenPipeError):
            return IOFailure(describe(e, hint))
    for e in _chain(exc):
        text = str(e).lower()
        for words, code in MESSAGES:
            if words in text:
                place = f"{hint}: " if hint else ""
                return IOFailure(f"{place}{os.strerror(code)} (the database said: {words}; "
                                 f"{errno.errorcode[code]}); {ERRNOS[code]}")
    return None


def leftovers(folders, since: float, pid: int | None = None) -> list:
    """The debris a failed write may leave in ``folders`` (and their direct subfolders): this process's temp files
    (``.NAME.<pid>[.*].tmp``) and files left empty since ``since`` (a write the disk refused midway). Removing them
    loses nothing: none existed before the command, or it was already empty."""
    from pathlib import Path

    pid = os.getpid() if pid is None else pid
    found = []
    for folder in folders:
        base = Path(folder)
        if not base.is_dir():
            continue
        for path in [*base.iterdir(), *(p for d in base.iterdir() if d.is_dir() and not d.is_symlink()
                                        for p in d.iterdir())]:
            try:
                st = path.lstat()
            except OSError:
                continue
            if not path.is_file() or path.is_symlink():
                continue
            ours_tmp = path.name.endswith(".tmp") and f".{pid}." in path.name
            fresh_empty = st.st_size == 0 and st.st_mtime >= since and not path.name.endswith(".lock")  # held locks
            if ours_tmp or fresh_empty:
                found.append(path)
    return found


def clean(folders, since: float) -> None:
    """Remove ``leftovers``; best effort (the disk that failed may fail this too)."""
    for path in leftovers(folders, since):
        try:
            path.unlink()
        except OSError:
            pass
