"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) from the official python-pickle files, md5-verified.

Layout under `data_dir` (what torchvision also uses): `cifar-10-batches-py/` with `data_batch_1..5`,
`test_batch`, `batches.meta`; `cifar-100-python/` with `train`, `test`, `meta`. If only the
official archive (`cifar-10-python.tar.gz` / `cifar-100-python.tar.gz`) is in `data_dir`, its md5 is
checked and it is extracted into a temporary folder beside the target, which is then renamed into
place; members that are not plain files/folders or whose path would leave the target are refused.
Nothing here goes online: a missing file is a one-line DataError naming the file, its md5, where to
put it and where to get it (the CLI prints it and exits 2).

Safe loading: a pickle is opened only after its md5 matches, and read by `RestrictedUnpickler`,
which resolves exactly the three globals a CIFAR batch needs (numpy's `_reconstruct`, `ndarray`,
`dtype`) and refuses every other global, so a tampered file cannot run code. A file that fails any
check is never partly used: all files are verified and parsed before any array is returned.

Pool: the training images (file order, batches 1..5 for CIFAR-10) followed by the official test
images. Test = the official test set (fixed); val = a stratified, seeded 10 % of the training
images (5,000); train = the rest (45,000). So the test split is the official test set in file order, which
is also the order of every 10,000-image block of official CIFAR-10-C / CIFAR-100-C (datasets/shift.py checks
the labels block by block). Pixels are kept as uint8 until `build_splits`
normalizes them per channel with train statistics; the train split's also stay uint8 as `Splits.x_train_u8`,
which the engine holds on the device (regbench/device_data.py).

Augmentation: `augment(x, generator, fill=...)` is the standard CIFAR recipe (random 32x32 crop of the
image padded by 4 px of black, then a horizontal flip with probability 1/2), as batched tensor ops.
CIFAR's `default_augment` is "crop_flip" ("none" when built with `augmentation=False`); `load` binds it
to the normalized black of the train split as `Splits.train_augment`, which the engine applies to
training batches only.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import pickle
import shutil
import tarfile
import uuid

import numpy as np
import torch

from regbench.errors import DataError

from .augment import PAD, augment  # noqa: F401 - the CIFAR recipe, also imported from here
from .base import Dataset, Splits, make_splits, stratified_split

VAL_FRACTION = 0.1

# name -> (folder, archive file, archive md5, archive URL, {file: md5}, train files, test file, label key)
SPECS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "archive_md5": "c58f30108f718f92721af3b95e74349a",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5s": {
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
        "train": ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
        "test": "test_batch",
        "label_key": "labels",
        "num_classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "archive_md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5s": {
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
        "train": ("train",),
        "test": "test",
        "label_key": "fine_labels",
        "num_classes": 100,
    },
}


def md5_file(path: pathlib.Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(path: pathlib.Path, md5: str, *, hint: str = "") -> None:
    """Raise a one-line DataError unless `path` exists and its md5 is `md5`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"missing data file {path} (md5 {md5}); put it there{hint}")
    got = md5_file(path)
    if got != md5:
        raise DataError(f"data file {path} has md5 {got}, expected {md5}: it is corrupt or "
                        f"incomplete; delete it and put a good copy there{hint}")


# --- restricted unpickling -------------------------------------------------------------------

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, wherever it lives
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # how numpy < 2 (and CIFAR's) names it
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy >= 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only numpy's `_reconstruct`, `ndarray` and `dtype`; any other global is refused."""

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file") from None


def _text(key):
    return key.decode("latin1") if isinstance(key, bytes) else key


def read_batch(path: pathlib.Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse one (already verified) CIFAR batch pickle -> (uint8 N x 3 x 32 x 32, int64 labels)."""
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as e:  # any parse error: truncated stream, bad opcode, refused global
        raise DataError(f"cannot read CIFAR file {path}: {type(e).__name__}: {e}; "
                        f"delete it and put a good copy there") from e
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR file {path} holds a {type(obj).__name__}, expected a dict")
    d = {_text(k): v for k, v in obj.items()}
    data, labels = d.get("data"), d.get(label_key)
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(f"CIFAR file {path} lacks 'data' (an array) or {label_key!r}")
    labels = np.asarray(labels)
    if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072
            or labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu"):
        raise DataError(f"CIFAR file {path} has data {data.dtype}{data.shape} and labels "
                        f"{labels.dtype}{labels.shape}; expected uint8 (N, 3072) and N integer labels")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


# --- archive extraction ----------------------------------------------------------------------

def _safe_members(tar: tarfile.TarFile, target: pathlib.Path):
    root = target.resolve()
    for m in tar.getmembers():
        dest = (target / m.name).resolve()
        if not (m.isfile() or m.isdir()):
            raise DataError(f"archive member {m.name!r} is not a plain file or folder; refusing to extract")
        if os.path.isabs(m.name) or (dest != root and root not in dest.parents):
            raise DataError(f"archive member {m.name!r} would be written outside {target}; refusing to extract")
        yield m


def extract_archive(archive: pathlib.Path, data_dir: pathlib.Path, folder: str) -> None:
    """Extract `archive` into a temp folder under `data_dir`, then move `folder` into place.

    The target folder appears only once complete; an existing target is never touched.
    """
    data_dir = pathlib.Path(data_dir)
    tmp = data_dir / f".extract.{os.getpid()}.{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = list(_safe_members(tar, tmp))
                tar.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"cannot extract {archive}: {e}; delete it and put a good copy there") from e
        src = tmp / folder
        if not src.is_dir():
            raise DataError(f"archive {archive} has no folder {folder}/")
        try:
            os.replace(src, data_dir / folder)
        except OSError:
            if not (data_dir / folder).is_dir():  # lost a race to another extraction: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_arrays(data_dir: pathlib.Path, name: str, md5s: dict[str, str] | None = None,
                archive_md5: str | None = None):
    """Verify and read one CIFAR variant -> (x_train, y_train, x_test, y_test), uint8 NCHW / int64.

    `md5s` (file name -> md5) and `archive_md5` replace the official checksums (tests use this to
    read tiny files of the same format).
    """
    spec = SPECS[name]
    md5s = dict(spec["md5s"] if md5s is None else md5s)
    archive_md5 = spec["archive_md5"] if archive_md5 is None else archive_md5
    data_dir = pathlib.Path(data_dir)
    folder = data_dir / spec["folder"]
    wanted = [*spec["train"], spec["test"]]
    if not folder.is_dir():
        archive = data_dir / spec["archive"]
        if archive.is_file():
            verify(archive, archive_md5)
            extract_archive(archive, data_dir, spec["folder"])
        else:
            raise DataError(
                f"missing {folder}/ and its archive {archive} (md5 {archive_md5}); download "
                f"{spec['url']} and put it in {data_dir} (or extract it there)")
    hint = f" (it is inside {spec['url']})"
    for f in wanted:  # verify everything before parsing anything: a bad file is never half-used
        if f in md5s:
            verify(folder / f, md5s[f], hint=hint)
        else:
            raise DataError(f"no md5 known for {folder / f}; refusing to unpickle an unverified file")
    parts = [read_batch(folder / f, spec["label_key"]) for f in wanted]
    x_train = np.concatenate([p[0] for p in parts[:-1]])
    y_train = np.concatenate([p[1] for p in parts[:-1]])
    x_test, y_test = parts[-1]
    n = spec["num_classes"]
    for y, what in ((y_train, "train"), (y_test, "test")):
        if y.size and (y.min() < 0 or y.max() >= n):
            raise DataError(f"{name} {what} labels outside 0..{n - 1} in {folder}")
    return x_train, y_train, x_test, y_test


# --- dataset plugins -------------------------------------------------------------------------

class _CIFAR(Dataset):
    default_model = "resnet18"
    default_augment = "crop_flip"  # the standard CIFAR training recipe; `--augment none` turns it off
    input_shape = (3, 32, 32)

    def __init__(self, augmentation: bool = True, md5s: dict[str, str] | None = None,
                 archive_md5: str | None = None):
        # augmentation=False makes "none" this instance's default; load(augment=...) still overrides it.
        self.default_augment = "crop_flip" if augmentation else "none"
        self.train_augment = augment if augmentation else None  # the recipe; Splits bind it to normalized black
        self.md5s, self.archive_md5 = md5s, archive_md5

    def load(self, data_dir: pathlib.Path, split_seed: int = 0, train_size: int | None = None, *,
             train_per_class: int | None = None, augment: str | None = None) -> Splits:
        x_tr, y_tr, x_te, y_te = load_arrays(data_dir, self.name, self.md5s, self.archive_md5)
        x = np.concatenate([x_tr, x_te])
        y = np.concatenate([y_tr, y_te])
        test = range(len(y_tr), len(y))
        n_val = round(VAL_FRACTION * len(y_tr))
        indices = stratified_split(y, n_val, seed=split_seed, test_indices=test)
        return make_splits(self.name, x, y, indices, self.num_classes, self.input_shape, split_seed, train_size,
                           train_per_class, augment or self.default_augment)


class CIFAR10(_CIFAR):
    """CIFAR-10: 50,000 + 10,000 32x32 colour images, 10 classes (official python files)."""

    name = "cifar10"
    description = "CIFAR-10 (official python files, md5-verified; 45k train / 5k val / 10k test)"
    num_classes = 10


class CIFAR100(_CIFAR):
    """CIFAR-100: 50,000 + 10,000 32x32 colour images, 100 fine classes (official python files)."""

    name = "cifar100"
    description = "CIFAR-100 (official python files, md5-verified; fine labels; 45k/5k/10k)"
    num_classes = 100
