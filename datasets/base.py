"""Dataset plugin contract and the split machinery every dataset shares.

Why splits live here and not in each dataset: comparisons across methods and training seeds are
*paired* only if every run sees exactly the same train/val/test indices. So a split depends on
`split_seed` alone (default 0, independent of the training seed), is recorded as explicit
indices into the dataset's "pool" (each dataset documents what its pool is), and is fingerprinted
by `split_hash` so a store can check that two runs really shared their data.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import uuid
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from regbench.errors import DataError

SPLIT_NAMES = ("train", "val", "test")


def split_hash(indices: dict[str, list[int]]) -> str:
    """sha256 of the canonical JSON of `indices` (sorted keys, compact separators)."""
    blob = json.dumps(indices, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    """Write via a temp file in the same folder + os.replace, so readers never see half a file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened with "xb" (not mkstemp, whose files are 0600) keeps the umask's mode.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value, compare `split_hash`
class Splits:
    """A dataset split into normalized train/val/test tensors, plus the indices that define it."""

    name: str
    x_train: torch.Tensor  # float32, normalized with train-split per-channel mean/std
    y_train: torch.Tensor  # int64
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    indices: dict[str, list[int]]  # sorted indices into the dataset's pool, per split
    split_hash: str
    mean: torch.Tensor | None = None  # the train-split normalization, so shift sets are normalized alike
    std: torch.Tensor | None = None
    shift: object | None = None       # a ShiftSet (datasets/shift.py) evaluated after training, or None

    def save_indices(self, path) -> None:
        """Write {"dataset", "split_hash", "indices"} as JSON, atomically (provenance of a run)."""
        doc = {"dataset": self.name, "split_hash": self.split_hash, "indices": self.indices}
        atomic_write_bytes(pathlib.Path(path), json.dumps(doc, sort_keys=True).encode("utf-8"))


class Dataset:
    """Plugin base class; subclasses are found through the entry-point group "regbench.datasets"."""

    name: str = ""
    description: str = ""
    default_model: str = ""
    num_classes: int = 0
    input_shape: tuple = ()

    def load(self, data_dir: pathlib.Path, split_seed: int = 0, train_size: int | None = None) -> Splits:
        """Return the splits for `split_seed`; `train_size` keeps a stratified subset of train."""
        raise NotImplementedError


def stratified_split(
    labels, n_val: int, n_test: int | None = None, *, seed: int = 0, test_indices=None
) -> dict[str, list[int]]:
    """Stratified, seeded split of a pool of `len(labels)` samples into train/val/test.

    Either `n_test` samples are drawn for test, or `test_indices` is a fixed test set (e.g. a
    generator's own test part) and only val is drawn from the rest. sklearn's
    `train_test_split(stratify=...)` with `random_state=seed` makes this reproducible.
    Returns sorted index lists so the hash does not depend on draw order.
    """
    labels = np.asarray(labels)
    pool = np.arange(len(labels))
    if (n_test is None) == (test_indices is None):
        raise ValueError("give exactly one of n_test and test_indices")
    if test_indices is not None:
        test = np.asarray(sorted(test_indices), dtype=np.int64)
        rest = np.setdiff1d(pool, test)
    else:
        rest, test = train_test_split(pool, test_size=n_test, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=n_val, stratify=labels[rest], random_state=seed)
    return {k: sorted(int(i) for i in v) for k, v in zip(SPLIT_NAMES, (train, val, test))}


def stratified_subset(indices, labels, size: int, num_classes: int, seed: int = 0) -> list[int]:
    """A stratified, seeded subset of `indices` (e.g. the train split) with `size` elements.

    Each class is shuffled with `seed`, then all samples are ordered by their class-relative rank
    (j + 0.5) / class_count and the first `size` are kept. Why not sklearn: this gives *nested*
    subsets (train_size=100 ⊂ 300 ⊂ 1000 for one seed), so low-data curves stay paired, and it
    has no lower bound on how many samples are left out. Class proportions are kept to ±1 sample.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if not num_classes <= size <= len(indices):
        raise DataError(
            f"train_size must be between {num_classes} (one per class) and {len(indices)} "
            f"(the full train split); got {size}"
        )
    labels = np.asarray(labels)[indices]
    rng = np.random.default_rng(seed)
    keys = np.empty(len(indices))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = rng.permutation(len(members))
        keys[members[order]] = (np.arange(len(members)) + 0.5) / len(members)
    chosen = indices[np.argsort(keys, kind="stable")[:size]]
    return sorted(int(i) for i in chosen)


def build_splits(name, x, y, indices, num_classes, input_shape) -> Splits:
    """Cut the pool tensors `x` (N, C, ...) and `y` (N,) by `indices` and normalize.

    Mean and std are per channel and computed on the train split only (the data the model
    trains on), so no val/test information leaks into preprocessing.
    """
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.int64)
    parts = {k: torch.as_tensor(indices[k], dtype=torch.int64) for k in SPLIT_NAMES}
    xtr = x[parts["train"]]
    dims = [0] + list(range(2, x.ndim))
    mean = xtr.mean(dim=dims, keepdim=True)
    std = xtr.std(dim=dims, keepdim=True).clamp_min(1e-8)
    xs = {k: ((x[v] - mean) / std).contiguous() for k, v in parts.items()}
    ys = {k: y[v].contiguous() for k, v in parts.items()}
    return Splits(
        name=name,
        x_train=xs["train"], y_train=ys["train"],
        x_val=xs["val"], y_val=ys["val"],
        x_test=xs["test"], y_test=ys["test"],
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        indices=indices,
        split_hash=split_hash(indices),
        mean=mean,
        std=std,
    )


def make_splits(name, x, y, base_indices, num_classes, input_shape, split_seed, train_size) -> Splits:
    """Apply the optional `train_size` subset (val/test untouched), then `build_splits`."""
    indices = dict(base_indices)
    if train_size is not None:
        indices["train"] = stratified_subset(indices["train"], y, int(train_size), num_classes, split_seed)
    return build_splits(name, x, y, indices, num_classes, input_shape)
