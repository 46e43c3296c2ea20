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
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from regbench.errors import ConfigError, DataError

from .augment import augment as crop_flip

SPLIT_NAMES = ("train", "val", "test")
AUGMENTS = ("none", "crop_flip")  # training-batch augmentations a dataset can be loaded with


def split_hash(indices: dict[str, list[int]]) -> str:
    """sha256 of the canonical JSON of `indices` (sorted keys, compact separators)."""
    blob = json.dumps(indices, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    """Write via a temp file in the same folder + os.replace, so readers never see half a file."""
    from regbench import atomic

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, data)


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
    augment: str = "none"             # name of the training augmentation (one of AUGMENTS)
    # f(normalized batch, torch.Generator) -> batch, applied by the engine to training batches only; None = no-op
    train_augment: Callable | None = None
    # The train split's raw 8-bit pixels (same rows and order as x_train) when the dataset is made of them, and the
    # divisor applied before normalizing: x_train == (float32(x_train_u8) / pixel_scale - mean) / std, bit for bit
    # (CIFAR: 1; MNIST-M: 255). The engine keeps them on the device at a quarter of float32's size
    # (regbench/device_data.py). None for data that is not uint8 pixels (mnist1d, digits).
    x_train_u8: torch.Tensor | None = None
    pixel_scale: float = 1.0

    def save_indices(self, path) -> None:
        """Write {"dataset", "split_hash", "indices"} as JSON, atomically (provenance of a run)."""
        doc = {"dataset": self.name, "split_hash": self.split_hash, "indices": self.indices}
        atomic_write_bytes(pathlib.Path(path), json.dumps(doc, sort_keys=True).encode("utf-8"))


class Dataset:
    """Plugin base class; subclasses are found through the entry-point group "regbench.datasets"."""

    name: str = ""
    description: str = ""
    default_model: str = ""
    default_augment: str = "none"  # what `load` uses when no augment is asked for (CIFAR: "crop_flip")
    num_classes: int = 0
    input_shape: tuple = ()

    def load(self, data_dir: pathlib.Path, split_seed: int = 0, train_size: int | None = None, *,
             train_per_class: int | None = None, augment: str | None = None) -> Splits:
        """Return the splits for `split_seed`.

        `train_size` (N in all) or `train_per_class` (K per class) keeps a stratified, nested subset of
        train, drawn after val/test are held out; `augment` (one of AUGMENTS, None = `default_augment`)
        names the augmentation the engine applies to training batches.
        """
        raise NotImplementedError


def check_augment(augment: str, input_shape, dataset: str) -> None:
    """One-line ConfigError unless `augment` is known and fits inputs of `input_shape`."""
    if augment not in AUGMENTS:
        raise ConfigError(f"unknown augmentation {augment!r}; choose one of: {', '.join(AUGMENTS)}")
    if augment == "crop_flip" and len(input_shape) != 3:
        raise ConfigError(f"--augment crop_flip needs image inputs (C, H, W), but dataset {dataset!r} has inputs "
                          f"of shape {tuple(input_shape)}; use --augment none")


def augment_fn(augment: str, mean: torch.Tensor, std: torch.Tensor) -> Callable | None:
    """The training-batch transform for `augment`, bound to this split's normalization.

    torchvision's CIFAR recipe pads the *raw* image with black (0) before normalizing, so on our
    normalized tensors the border must be the normalized black, (0 - mean) / std per channel, not 0
    (which would be the train mean).
    """
    if augment == "none":
        return None
    fill = (-mean / std).reshape(-1)
    return partial(crop_flip, fill=fill)


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
    rank, count = _class_ranks(np.asarray(labels)[indices], seed)
    keys = (rank + 0.5) / count
    chosen = indices[np.argsort(keys, kind="stable")[:size]]
    return sorted(int(i) for i in chosen)


def stratified_subset_per_class(indices, labels, per_class: int, seed: int = 0) -> list[int]:
    """The first `per_class` samples of every class of `indices` in the same seeded per-class order as
    `stratified_subset`, so K per class ⊂ K' per class (K < K') for one seed: nested, like train sizes.
    """
    indices = np.asarray(indices, dtype=np.int64)
    rank, count = _class_ranks(np.asarray(labels)[indices], seed)
    smallest = int(count.min()) if len(count) else 0
    if not 1 <= per_class <= smallest:
        raise DataError(f"train_per_class must be between 1 and {smallest} (the smallest class of the train "
                        f"split has {smallest} samples); got {per_class}")
    return sorted(int(i) for i in indices[rank < per_class])


def _class_ranks(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: its rank in a seeded shuffle of its class, and its class's size.

    One permutation per class, drawn in class order from one seeded generator, so the ranks do not
    depend on how many samples are kept later (what makes the subsets nested).
    """
    rng = np.random.default_rng(seed)
    rank = np.empty(len(labels), dtype=np.int64)
    count = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = rng.permutation(len(members))
        rank[members[order]] = np.arange(len(members))
        count[members] = len(members)
    return rank, count


def build_splits(name, x, y, indices, num_classes, input_shape, pixels=None) -> Splits:
    """Cut the pool tensors `x` (N, C, ...) and `y` (N,) by `indices` and normalize.

    Mean and std are per channel and computed on the train split only (the data the model
    trains on), so no val/test information leaks into preprocessing.

    `pixels` = (uint8 pool aligned with `x`, scale) when `x` is that pool divided by `scale` in float32
    (MNIST-M: 255); a uint8 `x` is its own pixels (scale 1). Their train rows become `Splits.x_train_u8`.
    """
    y = torch.as_tensor(y, dtype=torch.int64, device="cpu")  # splits live on the host; DeviceData moves the train split
    parts = {k: torch.as_tensor(indices[k], dtype=torch.int64, device="cpu") for k in SPLIT_NAMES}

    def cut(k):  # slice the (uint8) pool first, then convert: the whole pool is never float32 twice (CIFAR: 737 MB)
        part = x[parts[k]] if isinstance(x, torch.Tensor) else np.asarray(x)[parts[k].numpy()]
        return torch.as_tensor(part, dtype=torch.float32, device="cpu").contiguous()

    xs = {k: cut(k) for k in SPLIT_NAMES}  # fresh copies (fancy indexing), so normalizing in place is safe
    dims = [0] + list(range(2, xs["train"].ndim))
    mean = xs["train"].mean(dim=dims, keepdim=True)
    std = xs["train"].std(dim=dims, keepdim=True).clamp_min(1e-8)
    for v in xs.values():
        v.sub_(mean).div_(std)
    ys = {k: y[v].contiguous() for k, v in parts.items()}
    if pixels is None and (x.dtype == torch.uint8 if isinstance(x, torch.Tensor) else np.asarray(x).dtype == np.uint8):
        pixels = (x, 1.0)
    if pixels is not None:
        raw = pixels[0][parts["train"]] if isinstance(pixels[0], torch.Tensor) else pixels[0][parts["train"].numpy()]
        pixels = (torch.as_tensor(raw, dtype=torch.uint8, device="cpu").contiguous(), float(pixels[1]))
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
        x_train_u8=None if pixels is None else pixels[0],
        pixel_scale=1.0 if pixels is None else pixels[1],
    )


def make_splits(name, x, y, base_indices, num_classes, input_shape, split_seed, train_size,
                train_per_class: int | None = None, augment: str = "none", pixels=None) -> Splits:
    """Apply the optional low-data subset to train (val/test untouched), `build_splits`, attach the augmentation.

    `base_indices` already hold val and test out, so every train size is tuned and tested on the same
    val/test sets (low-data splits).
    """
    check_augment(augment, input_shape, name)
    if train_size is not None and train_per_class is not None:
        raise ConfigError("give --train-size or --train-per-class, not both")
    indices = dict(base_indices)
    if train_size is not None:
        indices["train"] = stratified_subset(indices["train"], y, int(train_size), num_classes, split_seed)
    elif train_per_class is not None:
        indices["train"] = stratified_subset_per_class(indices["train"], y, int(train_per_class), split_seed)
    splits = build_splits(name, x, y, indices, num_classes, input_shape, pixels)  # pixels: see build_splits
    return replace(splits, augment=augment, train_augment=augment_fn(augment, splits.mean, splits.std))
