"""Every file regbench reads back, through one validating reader.

Files regbench wrote itself are not trusted when read back: a file cut short, edited by hand, from another version or
another run, or replaced by something of the wrong type (a folder, a symlink loop) is refused in one line naming the
file and what to do (``StateFileError``, exit 2), or, for a mid-run checkpoint, ignored with one warning so the run
starts over (``checkpoint_problem``). Nothing here writes except ``write_pointer``, atomically.

The kinds, each with its schema below: the store pointer (``OUT/store.json``), mid-run checkpoints
(``OUT/checkpoints/*.pt``), the benchmark's plan (the spec kept in the store), the local PostgreSQL's port file and
the entries of an output dir (``OUTPUT_ENTRIES``: checked for their type before any work).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

from regbench.errors import ConfigError

POINTER_FILE = "store.json"  # OUT/store.json: the shared storage (password masked) and benchmark a run planned there
MAX_STATE_BYTES = 1 << 20  # a pointer or port file is a few hundred bytes; more is not ours


class StateFileError(ConfigError):
    """A file regbench wrote that is unreadable, of the wrong shape or inconsistent with its run: one line, exit 2."""


def refuse(path, what: str, problem: str, fix: str) -> StateFileError:
    return StateFileError(f"{what} {path} {problem}; {fix}")


# ---- the schema language: a dict of key -> (types, check or None); a check returns a problem or None ------------

Schema = dict[str, tuple[type | tuple[type, ...], Callable[[Any], str | None] | None]]


def problem_with(doc: Any, schema: Schema, required: tuple[str, ...] | None = None) -> str | None:
    """Why ``doc`` does not fit ``schema`` (the first reason, in words), or None when it fits."""
    if not isinstance(doc, dict):
        return f"holds {type(doc).__name__}, not an object of {', '.join(schema)}"
    for key in required if required is not None else tuple(schema):
        if key not in doc:
            return f"lacks {key!r}"
    for key, (types, check) in schema.items():
        if key not in doc:
            continue
        value = doc[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            return f"has {key!r} of type bool"
        if not isinstance(value, types):
            names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            return f"has {key!r} of type {type(value).__name__}, not {names}"
        why = check(value) if check else None
        if why:
            return f"has {key!r} {why}"
    return None


def nonempty(value) -> str | None:
    return "empty" if not str(value).strip() else None


def int_in(low: int, high: int) -> Callable[[Any], str | None]:
    def check(value):
        return None if low <= value <= high else f"= {value!r}, outside {low}..{high}"
    return check


def finite(value) -> str | None:
    return None if math.isfinite(float(value)) else f"= {value!r}, not a finite number"


# ---- reading a small JSON or text file ------------------------------------------------------------------------------

def read_text(path: Path, what: str, fix: str, limit: int = MAX_STATE_BYTES) -> str:
    """The text of a small state file; one line naming it for each way it can be unusable."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            raise refuse(path, what, "is a symbolic link loop", fix) from None
        raise refuse(path, what, f"cannot be read ({exc.strerror})", fix) from None
    if not path.is_file():
        raise refuse(path, what, "is not a regular file" + (" (a directory)" if path.is_dir() else ""), fix)
    if st.st_size > limit:
        raise refuse(path, what, f"is {st.st_size} bytes, far more than regbench writes there", fix)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise refuse(path, what, "is not UTF-8 text", fix) from None
    except OSError as exc:
        raise refuse(path, what, f"cannot be read ({exc.strerror})", fix) from None


def read_json(path: Path, what: str, fix: str, schema: Schema) -> dict:
    """A JSON object of ``schema`` from ``path``, or a StateFileError naming the file and ``fix``."""
    text = read_text(path, what, fix)
    try:
        doc = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not JSON")))
    except (ValueError, RecursionError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if hasattr(exc, "lineno") else ""
        kind = "is empty" if not text.strip() else f"is not valid JSON{where}"
        raise refuse(path, what, kind, fix) from None
    why = problem_with(doc, schema)
    if why:
        raise refuse(path, what, why, fix)
    return doc


# ---- the store pointer -------------------------------------------------------------------------------------------------

POINTER_FIX = "pass --storage URL (the store the run used), or rerun `regbench run ... --storage URL --out OUT`"


def _url(value) -> str | None:
    text = str(value)
    if not text.strip():
        return "empty"
    if "://" not in text and not text.startswith("journal:") and not text.endswith((".log", ".jsonl")):
        return f"{text[:60]!r}, not a storage URL"
    return None


def _name(value) -> str | None:
    import re

    return None if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", value) else f"{value[:60]!r}, not a benchmark name"


POINTER_SCHEMA: Schema = {"storage": (str, _url), "benchmark": (str, _name)}


def absolute_url(url: str, base: Path | None = None) -> str:
    """A SQLite or journal URL with its file path made absolute (against ``base``, else the current dir); other
    URLs unchanged. A pointer must not depend on the folder a later command runs in."""
    base = Path(base) if base is not None else Path.cwd()
    for prefix in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(prefix):
            rest = url[len(prefix):]
            path_text, sep, query = rest.partition("?")
            if path_text and not path_text.startswith("/") and path_text != ":memory:":
                path = Path(path_text).expanduser()
                path = path if path.is_absolute() else base / path
                return f"{prefix}{os.path.abspath(path)}{sep}{query}"
            return url
    if url.startswith("journal:") or ("://" not in url and url.endswith((".log", ".jsonl"))):
        prefix = "journal:" if url.startswith("journal:") else ""
        path = Path(url.removeprefix("journal:")).expanduser()
        return prefix + os.path.abspath(path if path.is_absolute() else base / path)
    return url


def write_pointer(out: Path, storage_url: str, name: str) -> None:
    """OUT/store.json naming the shared store (absolute, password masked) and the benchmark; written atomically."""
    from regbench.store import safe_url

    doc = {"storage": safe_url(absolute_url(storage_url)), "benchmark": name}
    atomic_write_text(Path(out) / POINTER_FILE, json.dumps(doc, indent=1) + "\n")


def read_pointer(out: Path) -> tuple[str, str]:
    """(storage URL, benchmark name) from OUT/store.json; an old relative SQLite path is taken relative to OUT."""
    path = Path(out) / POINTER_FILE
    doc = read_json(path, "store pointer", POINTER_FIX, POINTER_SCHEMA)
    return absolute_url(doc["storage"], Path(out)), doc["benchmark"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file whole or not at all (temp name in the same folder, fsync, rename); no temp file is left."""
    from regbench import atomic

    atomic.write_text(path, text)


def store_file(url: str) -> tuple[str, Path] | None:
    """("sqlite" or "journal", path) for a store kept in a local file; None for a database server."""
    for prefix in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(prefix):
            return "sqlite", Path(url[len(prefix):].split("?", 1)[0]).expanduser()
    if url.startswith("journal:") or ("://" not in url and url.endswith((".log", ".jsonl"))):
        return "journal", Path(url.removeprefix("journal:")).expanduser()
    return None


STORE_FIX = "pass the --out of a `regbench run`, or --storage URL of its store"


def check_existing_store(url: str, what: str) -> None:
    """For commands that only read (status, report, export, sync-mlflow): a store kept in a file must already be a
    store. Looked at read-only (SQLite's ``mode=ro``), so a missing, empty or foreign file is refused instead of
    being created or filled with Optuna's tables."""
    import sqlite3

    found = store_file(url)
    if found is None:
        return
    kind, path = found
    if not os.path.lexists(path):
        raise StateFileError(f"{what}: {path} does not exist; {STORE_FIX}")
    try:
        path.stat()
    except OSError as exc:
        raise StateFileError(f"{what}: {path} cannot be used ({exc.strerror}); {STORE_FIX}") from None
    if not path.is_file():
        raise StateFileError(f"{what}: {path} is not a regular file; {STORE_FIX}")
    if path.stat().st_size == 0:
        raise StateFileError(f"{what}: {path} is empty, not a regbench store; {STORE_FIX}")
    if kind == "journal":
        return
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise StateFileError(f"{what}: {path} cannot be read ({exc.strerror}); {STORE_FIX}") from None
    if head != b"SQLite format 3\x00":
        raise StateFileError(f"{what}: {path} is not a SQLite database; {STORE_FIX}")
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise StateFileError(f"{what}: {path} cannot be read as a database ({exc}); {STORE_FIX}") from None
    if not {"studies", "trials"} <= tables:
        raise StateFileError(f"{what}: {path} holds no Optuna store (no studies table); {STORE_FIX}")


# ---- the output dir's entries -----------------------------------------------------------------------------------------

FILE, DIR = "file", "directory"
# What regbench keeps in an output dir, and of which type each must be (an entry of the other type is refused
# before any work: a folder named regbench.db, a file named checkpoints, ...).
OUTPUT_ENTRIES = {"regbench.db": FILE, POINTER_FILE: FILE, "mlflow.db": FILE, "leaderboard.md": FILE,
                  "results.csv": FILE, "results.parquet": FILE, ".regbench.lock": FILE, ".regbench.pid": FILE,
                  "checkpoints": DIR, "splits": DIR, "figures": DIR, "workers": DIR}


def check_output_entries(out: Path, option: str = "--out") -> None:
    """Refuse an output dir whose entries regbench will read or write are of the wrong type (or symlink loops)."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        try:
            out.stat()
        except OSError as exc:
            raise ConfigError(f"{option} {out} cannot be used ({exc.strerror}); choose another {option}") from None
        raise ConfigError(f"{option} {out} is a file, not a directory; choose another {option}")
    if not out.is_dir():
        return
    for name, kind in OUTPUT_ENTRIES.items():
        entry = out / name
        if not os.path.lexists(entry):
            continue
        try:
            entry.stat()
        except OSError as exc:
            raise ConfigError(f"{entry} cannot be used ({exc.strerror}: a broken or looping link?); remove it, or "
                              f"choose another {option}") from None
        found = DIR if entry.is_dir() else FILE if entry.is_file() else "special file"
        if found != kind:
            raise ConfigError(f"{entry} is a {found} where regbench keeps a {kind}; move it away, or choose another "
                              f"{option}")


# ---- checkpoints --------------------------------------------------------------------------------------------------------

def _history(rows) -> str | None:
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            return f"row {i + 1} of type {type(row).__name__}"
        epoch = row.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or int(epoch) != i + 1:
            return f"row {i + 1} numbered {epoch!r}"
    return None


def history_problem(history, epochs: int) -> str | None:
    """Why a finished run's history is not a record of every one of its ``epochs`` epochs (1..epochs, in order), or
    None. The recorder refuses to mark a trial COMPLETE otherwise."""
    if not isinstance(history, list):
        return f"its history is a {type(history).__name__}"
    if len(history) != epochs:
        return f"its history holds {len(history)} of its {epochs} epochs"
    return _history(history)


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "hpu", "mtia")  # torch's device types a run can train on


def _device_type(value) -> str | None:
    return None if value in DEVICE_TYPES else f"{value[:20]!r}, not a device type"


def checkpoint_problem(state: dict, config_key: str, epochs: int | None = None, fmt: int | None = None) -> str | None:
    """Why a loaded checkpoint cannot resume run ``config_key`` (of ``epochs`` epochs, when known), or None.
    Its epoch counter, history and step must agree with each other and with the run: a resumed run trains the epochs
    after ``epoch`` and records ``history`` as the ones before, so a counter that disagrees with its history would
    record a run with missing epochs as complete."""
    import torch

    if fmt is not None and state.get("format") != fmt:
        return f"format {state.get('format')!r}, this regbench writes {fmt}"
    if state.get("config_key") != config_key:
        return f"it belongs to run {str(state.get('config_key'))[:12]}, not {config_key[:12]}"
    top = 2**62
    schema: Schema = {"epoch": (int, int_in(0, top)), "step": (int, int_in(0, top)), "history": (list, _history),
                      "device_type": (str, _device_type), "model": (dict, None), "optimizer": (dict, None),
                      "scheduler": (dict, None), "method": (dict, None), "rng": (dict, None),
                      "generators": (dict, None)}
    why = problem_with(state, schema)
    if why:
        return why.replace("has ", "its ", 1) if why.startswith("has ") else why
    if len(state["history"]) != state["epoch"]:
        return f"its epoch counter says {state['epoch']} epochs done, its history holds {len(state['history'])}"
    if epochs is not None and state["epoch"] > epochs:
        return f"it is at epoch {state['epoch']} of a run of {epochs}"
    if state["epoch"] and state["step"] < state["epoch"]:
        return f"step {state['step']} is fewer than its {state['epoch']} epochs (at least one step each)"
    if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        return "its model weights are not all tensors"
    for name in ("batch_order", "augment"):
        if not isinstance(state["generators"].get(name), torch.Tensor):
            return f"its generator state {name!r} is missing"
    part = state.get("partial_epoch")
    if part is not None:
        if not isinstance(part, dict) or not isinstance(part.get("batch"), int) or isinstance(part.get("batch"), bool) \
                or part["batch"] < 0 or not all(isinstance(part.get(k), torch.Tensor) for k in ("perm", "sum_task",
                                                                                               "sum_reg")):
            return "its partial-epoch record is malformed"
        if epochs is not None and state["epoch"] >= epochs:
            return f"it records a partial epoch after the last of {epochs}"
    return None


# ---- the benchmark's plan (the spec in the store) ---------------------------------------------------------------------

SPEC_FIX = "the store's record of it was changed or is from an incompatible regbench; plan it again with " \
           "`regbench run ... --plan-only` in a new store"


def _dict_of_dicts(value) -> str | None:
    bad = next((k for k, v in value.items() if not isinstance(v, dict) or not isinstance(v.get("fixed", {}), dict)),
               None)
    return None if bad is None else f"entry {bad!r} malformed"


SPEC_SCHEMA: Schema = {"benchmark": (str, _name), "base": (str, nonempty), "methods": (dict, _dict_of_dicts),
                       "seeds": (list, None), "protocol": (dict, None)}


def check_spec(spec: Any, name: str) -> None:
    """Refuse a stored plan that ``Benchmark.from_spec`` could not rebuild faithfully (same value checks as the
    command line's: seeds, epochs, sizes)."""
    from regbench import limits

    where = f"the plan of benchmark {name!r} in the store"
    why = problem_with(spec, SPEC_SCHEMA)
    if why:
        raise StateFileError(f"{where} {why}; {SPEC_FIX}")
    try:
        limits.check_seed_list(spec["seeds"], "its seeds")
        base = json.loads(spec["base"])
        if not isinstance(base, dict):
            raise ConfigError("its base configuration is not an object")
        for field, option in limits.CONFIG_FIELDS.items():
            if base.get(field) is not None:
                limits.check_value(option, base[field], f"its {field}")
    except ConfigError as exc:
        raise StateFileError(f"{where}: {exc}; {SPEC_FIX}") from None
    except ValueError:
        raise StateFileError(f"{where}: its base configuration is not valid JSON; {SPEC_FIX}") from None


# ---- the local PostgreSQL's port file ---------------------------------------------------------------------------------

def read_port(path: Path) -> int:
    text = read_text(path, "port file", "delete it (the next `regbench postgres start` writes it again)")
    try:
        port = int(text.strip())
    except ValueError:
        raise refuse(path, "port file", f"holds {text.strip()[:30]!r}, not a port number",
                     "delete it (the next `regbench postgres start` writes it again)") from None
    if not 1 <= port <= 65535:
        raise refuse(path, "port file", f"holds {port}, outside 1..65535",
                     "delete it (the next `regbench postgres start` writes it again)")
    return port
