"""One way to write a file whole or not at all: a uniquely named temp file in the same folder (same filesystem), fsync,
then a rename over the target. A kill or an error mid-write leaves the previous file (or none) and no temp file;
readers never see half a file. Opened with "x" (not mkstemp, whose files are 0600), so the umask decides the mode."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path, binary: bool = True):
    """``with atomic_file(path) as f: f.write(...)``: ``path`` holds what was written once the block ends normally."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb" if binary else "x", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def write_text(path, text: str) -> None:
    with atomic_file(path, binary=False) as f:
        f.write(text)
