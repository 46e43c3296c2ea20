"""Distribution-shift sets evaluated after training (`regbench run --shift NAME`).

A shift set is a list of (corruption, severity) blocks of images with the labels of the clean test set. Each block
stays uint8 (a read-only memmap of the .npy file) until evaluation, which normalizes one block at a time with the
*training* split's statistics, so the model sees it exactly as it saw clean data. Why: official CIFAR-10-C is
19 corruptions x 5 severities x 10,000 images; as one float32 tensor that is 5.8 GB, as uint8 memmaps it is the
page cache's business, and one normalized block is 123 MB.

Sets (SHIFT_SETS maps each to the training dataset it belongs to):
* `cifar10_c`, `cifar100_c`: the official Zenodo files (docs/datasets.md §5) in DATA_DIR/CIFAR-10-C/ (CIFAR-100-C/),
  extracted from the tar if only that is there, every file md5-checked, memory-mapped. Their 10,000 images per
  block are the official test set in order, and so is our CIFAR test split (cifar.py: test = the test batch in file
  order), so the labels must match block for block; a mismatch (e.g. CIFAR-100-C files for CIFAR-10) is refused.
* `cifar10_c_style`, `cifar100_c_style`, `digits_c_style`: the 15 benchmark + 4 extra corruptions (CIFAR parameter
  table, datasets/corruptions.py) of the test split, generated on first use and cached under
  DATA_DIR/<name>/<base sha256[:16]>/ in the official layout with its JSON sidecar, which also records the md5 of
  every file so later loads (and `regbench data verify`) check them. Always reported under their "-style" name.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from regbench.errors import ConfigError, DataError

from . import cifar_c, corruptions
from .base import atomic_write_bytes
from .cifar import md5_file

SHIFT_SETS = {  # shift set -> the training dataset it belongs to
    "digits_c_style": "digits",
    "cifar10_c": "cifar10",
    "cifar100_c": "cifar100",
    "cifar10_c_style": "cifar10",
    "cifar100_c_style": "cifar100",
}
STYLE_SEED = 0  # the generated data's identity (part of the sidecar), independent of training seeds
# Pixel units of each dataset's pool: digits.images32 is in [0, 1], CIFAR pools stay 0..255 (cifar.py), so a uint8
# block is divided by this before the train-split normalization.
_PIXEL_SCALE = {"digits": 255.0, "cifar10": 1.0, "cifar100": 1.0}


@dataclass(frozen=True, eq=False)
class ShiftSet:
    name: str
    images: list                             # per block: uint8 (n, H, W, C) array or read-only memmap
    labels: list                             # per block: int64 (n,)
    blocks: list[tuple[str, int]]            # per block: (corruption, severity)
    mean: torch.Tensor                       # (1, C, 1, 1) train-split statistics, in the pool's pixel units
    std: torch.Tensor
    scale: float = 1.0                       # uint8 value / scale = the pool's pixel units
    benchmark: tuple[str, ...] = corruptions.BENCHMARK
    extra: tuple[str, ...] = corruptions.EXTRA

    def block(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i as normalized float32 (n, C, H, W) and its int64 labels; only this block is materialized."""
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(self.images[i]).transpose(0, 3, 1, 2))).float()
        if self.scale != 1.0:
            x.div_(self.scale)
        x.sub_(self.mean).div_(self.std)
        return x, torch.as_tensor(self.labels[i], dtype=torch.int64, device="cpu")

    def __len__(self) -> int:
        return sum(len(y) for y in self.labels)


def check(name: str, dataset: str) -> None:
    """One-line error for an unknown shift set or one that belongs to another dataset (before anything is written)."""
    if name not in SHIFT_SETS:
        raise ConfigError(f"unknown shift set {name!r}; choose one of: {', '.join(sorted(SHIFT_SETS))}")
    if SHIFT_SETS[name] != dataset:
        raise ConfigError(f"shift set {name!r} is built from dataset {SHIFT_SETS[name]!r}, not {dataset!r}; "
                          f"pass --dataset {SHIFT_SETS[name]}")


# --- bases of the generated sets ---------------------------------------------------------------

def _to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def digits_base(test_indices) -> tuple[np.ndarray, np.ndarray]:
    """The digits test split as uint8 NHWC (N, 32, 32, 3) and its labels."""
    from .digits import images32

    raw, labels = images32()
    test = torch.as_tensor(list(test_indices), dtype=torch.int64, device="cpu")
    return _to_uint8_nhwc(raw[test]), labels[test.numpy()]


def cifar_base(dataset: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
    """The official CIFAR test set (= our test split), uint8 NHWC, md5-checked like every CIFAR load."""
    from .cifar import load_arrays

    _, _, x_test, y_test = load_arrays(pathlib.Path(data_dir), dataset)
    return np.ascontiguousarray(x_test.transpose(0, 2, 3, 1)), y_test


def style_root(name: str, data_dir, base_x, base_y) -> pathlib.Path:
    return pathlib.Path(data_dir) / name / corruptions.base_sha256(base_x, base_y)[:16]


def ensure_style_set(name: str, base_x, base_y, data_dir, base_name: str,
                     seed: int = STYLE_SEED) -> tuple[pathlib.Path, float | None]:
    """The cached "-style" set of this base: (its folder, seconds spent generating it, or None if it was cached).

    Generated into a staging folder beside the cache, the md5 of every file added to its sidecar, then renamed into
    place: the cache folder is complete or absent, and a killed run leaves only a `.…staging` folder behind.
    """
    root = style_root(name, data_dir, base_x, base_y)
    if (root / cifar_c.SIDECAR).is_file():
        return root, None
    t0 = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.{os.getpid()}.{uuid.uuid4().hex}.staging"
    try:
        built = staging / "set"
        corruptions.generate_style_set(base_x, base_y, built, seed=seed, base_name=base_name)
        side_path = built / cifar_c.SIDECAR
        side = json.loads(side_path.read_text())
        side["md5"] = {p.stem: md5_file(p) for p in sorted(built.glob("*.npy"))}
        atomic_write_bytes(side_path, json.dumps(side, indent=1, sort_keys=True).encode("utf-8"))
        try:
            os.replace(built, root)
        except OSError:
            if not (root / cifar_c.SIDECAR).is_file():  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root, time.perf_counter() - t0


# --- loading -------------------------------------------------------------------------------------

def _check_labels(name: str, c, y_test: np.ndarray, root: pathlib.Path) -> None:
    for labels, (corruption, severity) in zip(c.labels, c.index):
        if labels.shape != y_test.shape or not np.array_equal(labels, y_test):
            raise DataError(f"{root}/labels.npy: block {corruption}/{severity} has {len(labels)} labels that do not "
                            f"match the {len(y_test)} test labels of {SHIFT_SETS[name]}; {name} must be the test set "
                            f"in official order (wrong dataset's files?)")


def load(name: str, data_dir: pathlib.Path, splits, seed: int = STYLE_SEED, corruptions_subset=None,
         severities=None) -> ShiftSet:
    """The shift set `name` for these splits (generated and cached on first use for "-style" sets).

    `corruptions_subset` / `severities` evaluate only part of the set (default: all 15 + 4 corruptions x 1..5).
    """
    if name not in SHIFT_SETS:
        raise ConfigError(f"unknown shift set {name!r}; choose one of: {', '.join(sorted(SHIFT_SETS))}")
    dataset = SHIFT_SETS[name]
    y_test = splits.y_test.numpy()
    if name == "digits_c_style":
        base_x, base_y = digits_base(splits.indices["test"])
        root, _ = ensure_style_set(name, base_x, base_y, data_dir, "digits-test", seed)
    elif name.endswith("_c_style"):
        base_x, base_y = cifar_base(dataset, data_dir)
        root, _ = ensure_style_set(name, base_x, base_y, data_dir, f"{dataset}-test", seed)
    else:
        root = cifar_c.official_folder(data_dir, dataset)
    chosen = corruptions.ALL if corruptions_subset is None else tuple(corruptions_subset)
    c = cifar_c.load_cifar_c(root, chosen, severities, dataset=dataset)
    _check_labels(name, c, y_test, root)
    shape = tuple(splits.x_test.shape[1:])
    if c.x and (c.x[0].shape[3], *c.x[0].shape[1:3]) != shape:
        raise DataError(f"{root}: images are {tuple(c.x[0].shape[1:])} (H, W, C) but {dataset} is {shape} (C, H, W); "
                        f"regenerate or replace the set")
    return ShiftSet(name=name, images=c.x, labels=c.labels, blocks=list(c.index), mean=splits.mean, std=splits.std,
                    scale=_PIXEL_SCALE[dataset])
