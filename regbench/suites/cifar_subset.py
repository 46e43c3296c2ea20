"""Real CIFAR-10 images, offline: the shared `cifar10_subset` written back into the official pickle layout.

A `cifar10_subset.npz` (named by $REGBENCH_CIFAR10_SUBSET; there is no default: tests and benchmarks set it) holds the leading 1,017–1,285 images of each of
the five official training batches and the first 1,017 images of the test batch, unchanged, each with its source
batch. `write_cifar10_layout` writes a class-balanced part of them as `ROOT/cifar-10-batches-py/` exactly as the
official (Python 2) files are laid out: `data_batch_1..5` (every image goes back into the batch it came from, in
file order), `test_batch`, `batches.meta`; dicts with the official keys, `data` as uint8 planar rows (1024 R, 1024 G,
1024 B), pickled with protocol 2 and byte strings, as cPickle wrote them. So `regbench.datasets.cifar` reads them
through its real path (restricted unpickler, md5 check); only the md5 table differs, because the files are not the
official ones: `layout_md5s(root)` gives it, and `official_md5s_for(root)` points the reader's table at it for the
duration of a `with` block (the override the catalog documents: the tables are read at call time).

`write_cifar10_layout(…, arrays=…)` writes the same layout from other CIFAR-10 arrays: the `--smoke` forms of the GPU
suites (ses-cifar, shade-cifar) cut the user's own CIFAR-10 files (read and md5-checked by regbench.datasets.cifar)
to a few hundred images that way. Tests and benchmarks use the subset for real CIFAR pixels without the official
files.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import numpy as np

from regbench.errors import ConfigError, DataError

ENV = "REGBENCH_CIFAR10_SUBSET"
SUBSET = Path(os.environ[ENV]) if os.environ.get(ENV) else None  # None: no subset named (the product never needs one)
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, wherever this numpy keeps it


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 with every str/bytes written as a Python 2 byte string (BINSTRING) and numpy's reconstructor named
    `numpy.core.multiarray._reconstruct`: the opcodes of the official CIFAR files (Python 3's protocol 2 would
    write bytes through `_codecs.encode`, a global the CIFAR reader rightly refuses)."""

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + len(raw).to_bytes(4, "little") + raw)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)
    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def _py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _balanced_prefix(y: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n images that are earliest within their class (round-robin over classes), in file order:
    a class-balanced prefix, so a few hundred images still hold every class about equally."""
    rank = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        where = np.flatnonzero(y == c)
        rank[where] = np.arange(len(where))
    order = np.lexsort((np.arange(len(y)), rank))  # by within-class rank, then by position
    return np.sort(order[:n])


def load_subset(path: Path | str | None = None) -> dict[str, np.ndarray]:
    path = path or SUBSET
    if path is None:
        raise DataError(f"no cifar10_subset.npz named: set {ENV} to its path")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing {path} (the shared cifar10_subset.npz); put it there or set "
                        f"REGBENCH_CIFAR10_SUBSET to its path")
    with np.load(path) as d:
        return {k: d[k] for k in ("x_train", "y_train", "train_batch", "x_test", "y_test")}


def write_cifar10_layout(root: Path | str, n_train: int | None = None, n_test: int | None = None,
                         subset: Path | str | None = None, arrays: dict | None = None) -> Path:
    """Write `root/cifar-10-batches-py/` from the real subset images; returns `root` (the data dir to load from).

    `n_train` images (default: all 5,438) are split over the five batches in proportion to what the subset holds of
    each, each batch a class-balanced prefix of its images; `n_test` (default: all 1,017) is a class-balanced prefix
    of the test images. Pixels and labels are never changed. Existing files of the folder are overwritten.
    ``arrays`` (x_train/x_test uint8 NHWC, y_train, y_test, train_batch 1..5) replaces the subset as the source.
    """
    d = arrays if arrays is not None else load_subset(subset)
    n_all, n_test_all = len(d["y_train"]), len(d["y_test"])
    n_train = n_all if n_train is None else int(n_train)
    n_test = n_test_all if n_test is None else int(n_test)
    if not 10 <= n_train <= n_all:
        raise ConfigError(f"n_train={n_train}: the subset holds {n_all} training images; ask for 10..{n_all} "
                          f"(at least 2 per batch file)")
    if not 1 <= n_test <= n_test_all:
        raise ConfigError(f"n_test={n_test}: the subset holds {n_test_all} test images; ask for 1..{n_test_all}")
    batch = d["train_batch"]
    sizes = np.array([(batch == b).sum() for b in range(1, 6)])
    # Largest-remainder apportionment: counts sum to n_train and follow the subset's batch sizes.
    quota = n_train * sizes / sizes.sum()
    counts = np.floor(quota).astype(int)
    counts[np.argsort(counts - quota)[: n_train - counts.sum()]] += 1
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for b, (name, k) in enumerate(zip(TRAIN_FILES, counts), start=1):
        rows = np.flatnonzero(batch == b)
        keep = rows[_balanced_prefix(d["y_train"][rows], k)]
        _write_batch(folder / name, f"training batch {b} of 5", d["x_train"][keep], d["y_train"][keep])
    keep = _balanced_prefix(d["y_test"], n_test)
    _write_batch(folder / "test_batch", "testing batch 1 of 1", d["x_test"][keep], d["y_test"][keep])
    meta = {"num_cases_per_batch": 10000, "label_names": list(CLASS_NAMES), "num_vis": 3072}
    (folder / "batches.meta").write_bytes(_py2_pickle(meta))
    return Path(root)


def official_arrays(data_dir: Path | str) -> dict[str, np.ndarray]:
    """The user's official CIFAR-10 files in ``data_dir``, read and md5-checked by regbench.datasets.cifar, as the
    arrays ``write_cifar10_layout`` takes (train_batch: the 10,000-image batch each training image came from)."""
    from regbench.datasets import cifar

    x_train, y_train, x_test, y_test = cifar.load_arrays(Path(data_dir), "cifar10")
    return {"x_train": x_train.transpose(0, 2, 3, 1), "y_train": y_train, "x_test": x_test.transpose(0, 2, 3, 1),
            "y_test": y_test, "train_batch": np.arange(len(y_train)) // (len(y_train) // 5) + 1}


def _write_batch(path: Path, label: str, x_hwc: np.ndarray, y: np.ndarray) -> None:
    planar = np.ascontiguousarray(x_hwc.transpose(0, 3, 1, 2).reshape(len(x_hwc), 3072))  # official row layout
    doc = {"batch_label": label, "labels": [int(v) for v in y], "data": planar,
           "filenames": [f"subset_{i:05d}.png" for i in range(len(y))]}
    path.write_bytes(_py2_pickle(doc))


def layout_md5s(root: Path | str) -> dict[str, str]:
    """md5 of every file of `root/cifar-10-batches-py/` (the table the CIFAR reader checks against)."""
    folder = Path(root) / FOLDER
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@contextmanager
def official_md5s_for(root: Path | str):
    """Within the block, the CIFAR-10 reader (and everything reading through it: `registry.dataset("cifar10")`,
    the cifar10_c_style generator) accepts the files under `root` instead of the official ones; restored after."""
    from regbench.datasets import cifar

    spec = cifar.SPECS["cifar10"]
    old = spec["md5s"]
    spec["md5s"] = layout_md5s(root)
    try:
        yield root
    finally:
        spec["md5s"] = old
