"""Errors a user can cause. `cli.py` catches `RegbenchError` once: one line on stderr, exit 2."""


class RegbenchError(Exception):
    """A mistake in user input; the message names the problem and the fix, in one line."""


class UnknownNameError(RegbenchError):
    """An unknown method, dataset, model or layer-rule name."""

    def __init__(self, kind: str, name: str, choices):
        choices = sorted(choices)
        super().__init__(f"unknown {kind} {name!r}; choose one of: {', '.join(choices)}")
        self.kind, self.name, self.choices = kind, name, choices


class HparamError(RegbenchError):
    """An hyperparameter outside its valid range, or one the method does not have."""


class ConfigError(RegbenchError):
    """Malformed or conflicting options (e.g. a bad --set, an output dir that is a file)."""


class DataError(RegbenchError):
    """Missing or corrupt data files."""


class StorageError(RegbenchError):
    """A storage URL that cannot be opened."""


EXIT_BUG = 70  # EX_SOFTWARE (sysexits.h): an internal error, distinct from a user error's 2


def report_bug(exc: BaseException, output_dirs=()) -> int:
    """The last line of defence in ``regbench.cli.main``: an exception that is not a RegbenchError is a bug in
    regbench, not a user mistake. Its full traceback goes to a file (in the first of ``output_dirs`` that is a
    writable directory, else the temp dir) and stderr gets one line saying so and where; returns EXIT_BUG."""
    import os
    import sys
    import tempfile
    import time
    import traceback
    from pathlib import Path

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    header = f"regbench {' '.join(sys.argv[1:])}\n{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n\n"
    name = f"regbench-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    written = None
    for folder in [*output_dirs, tempfile.gettempdir()]:
        # Written whole or not at all (a temp name, then renamed): a full or failing OUT gets no partial crash file,
        # and the report goes on to the next folder (the temp dir last).
        tmp = Path(folder) / f".{name}.{os.getpid()}.tmp"
        try:
            if not Path(folder).is_dir():
                continue
            path = Path(folder) / name
            with open(tmp, "x", encoding="utf-8") as f:
                f.write(header + text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            written = path.resolve()
            break
        except (OSError, ValueError):
            try:
                tmp.unlink(missing_ok=True)
            except (OSError, ValueError):
                pass
            continue
    summary = (str(exc).strip().splitlines() or [""])[0][:160]
    where = f"the full traceback is in {written}" if written else "its traceback could not be written anywhere"
    print(f"regbench: internal error: this is a bug in regbench ({type(exc).__name__}{': ' if summary else ''}"
          f"{summary}); {where}; please report it", file=sys.stderr)
    return EXIT_BUG
