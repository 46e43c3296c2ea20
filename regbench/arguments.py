"""What each path- or URL-like command-line argument is, and the one check of it before any command does any work.

An option is declared with its kind where it is declared (``parser.add_argument("--out", kind=OUTPUT_DIR)``; the
CLI's parser class records it on the argparse action), and ``check_arguments`` walks the actions of the subcommand
the user chose and checks every value given, before a module that trains is even imported. So a new option declared
with a kind is checked for free, and tests/test_bad_input_generated.py finds every such option in the parser itself.

The checks only look: nothing is created or changed. Writability is probed by creating and removing a temporary file
in the nearest existing folder (``os.access`` is no help: as root it answers yes even on /sys, where writes fail).
Every refusal is a ``ConfigError``: one line naming the option, the value and what to pass instead.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from regbench.errors import ConfigError

PATH_MAX = 4096  # bytes, Linux's limit for a whole path (with its NUL)
NAME_MAX = 255  # bytes, for one component
SQLITE_MAGIC = b"SQLite format 3\x00"


class Kind:
    """A kind of argument: ``check(value, option)`` raises ConfigError when the value cannot serve."""

    name = "kind"
    help = ""

    def check(self, value: str, option: str) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<argument kind {self.name}>"


def _shown(value: str) -> str:
    """The value as the error line shows it: quoted, control characters escaped, long ones cut, a URL's password
    masked (as regbench.store.safe_url does)."""
    text = repr(re.sub(r"(://[^:/@\s]*:)[^@/\s]*@", r"\1***@", value))
    return text if len(text) <= 120 else f"{text[:80]}...{text[-30:]} ({len(value)} characters)"


def _plain(value: str, option: str, what: str) -> Path:
    """The checks every path shares: not empty, no control character, within the system's length limits."""
    if value == "" or not value.strip():
        raise ConfigError(f"{option} is empty; pass {what}")
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ConfigError(f"{option} {_shown(value)} contains a control character ({bad!r}); pass {what} "
                          f"without one")
    encoded = os.fsencode(value)
    if len(encoded) >= PATH_MAX:
        raise ConfigError(f"{option} {_shown(value)} is longer than the system's path limit ({PATH_MAX} bytes); "
                          f"pass a shorter path")
    long_part = next((p for p in encoded.split(b"/") if len(p) > NAME_MAX), None)
    if long_part is not None:
        raise ConfigError(f"{option} {_shown(value)} has a name of {len(long_part)} bytes, longer than the "
                          f"system's limit of {NAME_MAX}; pass a shorter name")
    return Path(value).expanduser()


def _not_root(path: Path, option: str, value: str, what: str) -> None:
    if os.path.realpath(path) == os.path.abspath(path.anchor or "/"):  # realpath: never raises on a symlink loop
        raise ConfigError(f"{option} {_shown(value)} is the filesystem root, not a folder of regbench's; pass {what}")


def _no_broken_link(path: Path, option: str, value: str, what: str) -> None:
    """A symbolic link that loops or points nowhere, at ``path`` or above it, is named as such."""
    probe = Path(os.path.abspath(path))
    for part in [probe, *probe.parents]:
        if os.path.islink(part) and not os.path.exists(part):
            try:
                os.stat(part)
            except OSError as exc:
                raise ConfigError(f"{option} {_shown(value)}: {part} is a symbolic link that "
                                  f"{'loops' if exc.errno == 40 else 'points nowhere'} ({exc.strerror}); fix or "
                                  f"remove the link, or pass {what} elsewhere") from None


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists (lexically: ``a/../b`` is not resolved through ``a``)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path):
        path = path.parent
    return path


def _probe_writable(folder: Path) -> str | None:
    """None if a file can be created in ``folder`` (created and removed at once), else why not."""
    try:
        fd, name = tempfile.mkstemp(prefix=".regbench-probe-", dir=folder)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.close(fd)
    os.unlink(name)
    return None


def check_creatable_dir(path: Path, option: str, value: str, what: str, writable: bool) -> None:
    """A folder that exists (and, if ``writable``, accepts a new file) or that ``mkdir -p`` can create."""
    _no_broken_link(path, option, value, what)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option} {_shown(value)}: {path} is a file, not a directory; pass {what}")
        reason = _probe_writable(path) if writable else None
        if reason:
            raise ConfigError(f"{option} {_shown(value)}: cannot write to {path} ({reason}); pass {what} you can "
                              f"write to")
        return
    base = _nearest_existing(path)
    if not base.is_dir():
        raise ConfigError(f"{option} {_shown(value)} lies under {base}, which is a file; pass {what} elsewhere")
    reason = _probe_writable(base)
    if reason:
        raise ConfigError(f"{option} {_shown(value)} cannot be created: cannot write in {base} ({reason}); pass "
                          f"{what} you can write to")


class OutputDir(Kind):
    """A folder this command writes into: an existing writable directory, or one that can be created."""

    name = "output-dir"
    help = "a directory to write into (created if missing)"

    def check(self, value, option):
        what = "a directory for the output"
        path = _plain(value, option, what)
        _not_root(path, option, value, what)
        check_creatable_dir(path, option, value, what, writable=True)


class CacheDir(Kind):
    """A folder read from and filled on demand (the dataset cache): an existing directory (a read-only one is fine
    while it holds what is needed), or one that can be created."""

    name = "cache-dir"
    help = "a directory read from, created if missing"

    def check(self, value, option):
        what = "a directory for the data sets"
        path = _plain(value, option, what)
        _not_root(path, option, value, what)
        check_creatable_dir(path, option, value, what, writable=False)


class InputDir(Kind):
    """A folder this command reads and must find: the output dir of an earlier ``regbench run``."""

    name = "input-dir"
    help = "an existing directory"

    def check(self, value, option):
        what = "the output dir of a `regbench run`"
        path = _plain(value, option, what)
        _not_root(path, option, value, what)
        _no_broken_link(path, option, value, what)
        if not path.exists():
            raise ConfigError(f"{option} {_shown(value)} does not exist; pass {what}")
        if not path.is_dir():
            raise ConfigError(f"{option} {_shown(value)} is a file, not a directory; pass {what}")


class LookupDir(Kind):
    """A folder that is only looked into (``data list``/``verify``): missing is fine (nothing there), a file is not."""

    name = "lookup-dir"
    help = "a directory to look into (may be missing)"

    def check(self, value, option):
        what = "the data sets' directory"
        path = _plain(value, option, what)
        _not_root(path, option, value, what)
        _no_broken_link(path, option, value, what)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{option} {_shown(value)} is a file, not a directory; pass {what}")
        base = _nearest_existing(path)
        if not base.is_dir():
            raise ConfigError(f"{option} {_shown(value)} lies under {base}, which is a file; pass {what}")


SERVER_SCHEMES = ("postgresql", "postgres", "mysql", "mssql", "oracle")
USE_STORAGE = "use sqlite:///PATH.db, postgresql://USER@HOST/DB or journal:PATH.log"


def _check_server_url(value: str, option: str, use: str) -> None:
    """A database server URL needs only to parse here (the server's answer comes when it is opened)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"{option} {_shown(value)} is not a valid URL ({exc}); {use}") from None
    if not parts.netloc and not parts.path.strip("/"):
        raise ConfigError(f"{option} {_shown(value)} names no server and no database; {use}")


def _check_file(value: str, option: str, path_text: str, kind: str, must_exist: bool, use: str,
                create_parents: bool = False) -> None:
    """The file behind ``sqlite:///PATH`` (kind "sqlite") or ``journal:PATH`` ("journal"): if it exists it must be a
    file of that kind (a text file is refused, never turned into a database); if not, ``must_exist`` refuses, else its
    folder must exist and take a new file."""
    if not path_text or path_text in (":memory:",) or path_text.endswith("/"):
        memory = " (SQLite's in-memory database, lost at exit)" if kind == "sqlite" else ""
        raise ConfigError(f"{option} {_shown(value)} names no file{memory}; {use}")
    path = _plain(path_text, option, "a file path")
    label = {"sqlite": "SQLite", "journal": "journal"}[kind]
    if path.is_dir():
        raise ConfigError(f"{option} {_shown(value)} is a directory, not a {label} file; {use}")
    if path.exists():
        if not path.is_file():
            raise ConfigError(f"{option} {_shown(value)} is not a regular file; {use}")
        try:
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except OSError as exc:
            raise ConfigError(f"{option} {_shown(value)} cannot be read ({exc.strerror}); {use}") from None
        if kind == "sqlite" and head != SQLITE_MAGIC:
            raise ConfigError(f"{option} {_shown(value)}: {path} is not a SQLite database (it is left as it is); "
                              f"{use}")
        if kind == "journal" and head and not head.lstrip().startswith(b"{"):
            raise ConfigError(f"{option} {_shown(value)}: {path} is not an Optuna journal file (it is left as it "
                              f"is); {use}")
        return
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise ConfigError(f"{option} {_shown(value)} lies under {base}, which is a file; {use}")
    if must_exist:
        raise ConfigError(f"{option} {_shown(value)}: {path} does not exist; pass the store of a `regbench run`")
    if create_parents:  # MLflow creates the folder of its SQLite file
        return check_creatable_dir(path.parent, option, value, f"a {label} file path", writable=True)
    if base != Path(os.path.abspath(path.parent)):
        raise ConfigError(f"{option} {_shown(value)}: folder {path.parent} does not exist; create it, or {use}")
    reason = _probe_writable(base)
    if reason:
        raise ConfigError(f"{option} {_shown(value)}: cannot create a file in {base} ({reason}); {use}")


class StorageUrl(Kind):
    """An Optuna storage: ``sqlite:///PATH`` (a SQLite file, or a new one in an existing folder),
    ``journal:PATH``/``PATH.log`` (likewise), or a database server URL (parsed only). With ``existing``, a file store
    must already exist: the command reads a benchmark there and must not create an empty store instead."""

    def __init__(self, existing: bool):
        self.existing = existing
        self.name = "store-url" if existing else "storage-url"
        self.help = "the Optuna storage of an existing benchmark" if existing else "an Optuna storage URL"

    def check(self, value, option):
        _plain(value, option, f"a storage URL ({USE_STORAGE[4:]})")
        if value.startswith("journal:") or (value.endswith((".log", ".jsonl")) and "://" not in value):
            return _check_file(value, option, value.removeprefix("journal:"), "journal", self.existing, USE_STORAGE)
        if "://" not in value:
            raise ConfigError(f"{option} {_shown(value)} is not a URL; {USE_STORAGE}")
        scheme = value.split("://", 1)[0].split("+", 1)[0].lower()
        if scheme == "sqlite":
            if not value.startswith(("sqlite:///", "sqlite+pysqlite:///")):
                raise ConfigError(f"{option} {_shown(value)} names no file; {USE_STORAGE}")
            return _check_file(value, option, value.split(":///", 1)[1].split("?", 1)[0], "sqlite", self.existing,
                               USE_STORAGE)
        if scheme in SERVER_SCHEMES:
            return _check_server_url(value, option, USE_STORAGE)
        raise ConfigError(f"{option} {_shown(value)}: unknown storage scheme {scheme!r}; {USE_STORAGE}")


USE_TRACKING = "use sqlite:///PATH.db, http(s)://HOST:PORT of an MLflow server, or a database URL"


class TrackingUri(Kind):
    """An MLflow tracking URI: ``sqlite:///PATH`` (created if missing: its folder too, as MLflow does), an
    ``http(s)://`` server, a database URL, ``databricks``; a plain folder only where MLflow allows its file store."""

    name = "tracking-uri"
    help = "an MLflow tracking URI"

    def check(self, value, option):
        _plain(value, option, f"a tracking URI ({USE_TRACKING[4:]})")
        scheme = value.split("://", 1)[0].split("+", 1)[0].lower() if "://" in value else ""
        if scheme == "sqlite":
            if not value.startswith("sqlite:///"):
                raise ConfigError(f"{option} {_shown(value)} names no file; {USE_TRACKING}")
            path_text = value.removeprefix("sqlite:///").split("?", 1)[0]
            return _check_file(value, option, path_text, "sqlite", False, USE_TRACKING, create_parents=True)
        if scheme in ("http", "https"):
            return _check_server_url(value, option, USE_TRACKING) if urlsplit(value).hostname else _no_host(
                value, option)
        if scheme in SERVER_SCHEMES:
            return _check_server_url(value, option, USE_TRACKING)
        if value in ("databricks",) or scheme in ("databricks", "databricks-uc", "uc"):
            return None
        if scheme and scheme != "file":
            raise ConfigError(f"{option} {_shown(value)}: unknown tracking scheme {scheme!r}; {USE_TRACKING}")
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
            raise ConfigError(f"{option} {_shown(value)} is a folder, and MLflow's file store is retired (set "
                              f"MLFLOW_ALLOW_FILE_STORE=true to keep using it); {USE_TRACKING}")
        folder = value.removeprefix("file://") if scheme == "file" else value
        OUTPUT_DIR.check(folder, option)
        return None


def _no_host(value: str, option: str) -> None:
    raise ConfigError(f"{option} {_shown(value)} names no host; {USE_TRACKING}")


OUTPUT_DIR = OutputDir()
CACHE_DIR = CacheDir()
INPUT_DIR = InputDir()
LOOKUP_DIR = LookupDir()
STORAGE_URL = StorageUrl(existing=False)
STORE_URL = StorageUrl(existing=True)
TRACKING_URI = TrackingUri()
KINDS = (OUTPUT_DIR, CACHE_DIR, INPUT_DIR, LOOKUP_DIR, STORAGE_URL, STORE_URL, TRACKING_URI)


class KindMixin:
    """For an argparse parser or argument group: ``add_argument(..., kind=KIND)`` records the kind on the action."""

    def add_argument(self, *flags, kind: Kind | None = None, **options):
        action = super().add_argument(*flags, **options)
        action.kind = kind
        return action

    def add_argument_group(self, *args, **kwargs):
        import argparse

        group = type("KindGroup", (KindMixin, argparse._ArgumentGroup), {})(self, *args, **kwargs)
        self._action_groups.append(group)
        return group


def chosen_actions(parser, args) -> list:
    """The actions of the (sub)command the user chose, walking nested subcommands (``data verify``)."""
    import argparse

    actions, current = [], parser
    while current is not None:
        nxt = None
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                nxt = action.choices.get(getattr(args, action.dest, None))
            else:
                actions.append(action)
        current = nxt
    return actions


def option_name(action) -> str:
    """How the error line names an argument: its longest flag, or its metavar (a positional)."""
    if action.option_strings:
        return max(action.option_strings, key=len)
    return str(action.metavar or action.dest.upper())


def check_arguments(parser, args) -> None:
    """Check every value of an argument with a declared kind (given, or a default that is not None), in the order
    the parser declares them; the first unusable one raises ConfigError."""
    from regbench import limits  # numbers (ranges, NaN/inf) and the environment variables that stand in for flags

    actions = chosen_actions(parser, args)
    limits.check_numbers(actions, args)
    for action in actions:
        kind = getattr(action, "kind", None)
        value = getattr(args, action.dest, None)
        if kind is None or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            kind.check(str(item), option_name(action))
    limits.check_environment(actions, args)


def default_data_dir() -> str:
    """Where datasets live unless --data-dir says otherwise: $REGBENCH_DATA, else ~/.cache/regbench. Here (not in
    cli.py) so that suites can use it without importing the CLI that imports them."""
    return os.environ.get("REGBENCH_DATA") or str(Path.home() / ".cache" / "regbench")
