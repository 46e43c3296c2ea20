"""Distribution-shift sets evaluated after training (`regbench run --shift NAME`).

A shift set is a list of (corruption, severity) blocks of images with the labels of the clean test set, normalized
with the *training* split's statistics so the model sees them exactly as it saw clean data. Generated sets are always
named "…_c_style" and reported as such, never mixed with official CIFAR-C results.

`digits_c_style`: the 15 benchmark + 4 extra corruptions (CIFAR parameter table, datasets/corruptions.py) of the
digits *test split*, generated once per split and cached under DATA_DIR/digits_c_style/<base sha256>/ in the official
CIFAR-10-C layout with its JSON sidecar.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

import numpy as np
import torch

from regbench.errors import ConfigError

from . import corruptions

SHIFT_SETS = {"digits_c_style": "digits"}  # shift set -> the training dataset it belongs to


@dataclass(frozen=True, eq=False)
class ShiftSet:
    name: str
    x: torch.Tensor                          # float32 (blocks × N, C, H, W), normalized like the train split
    y: torch.Tensor                          # int64, the test labels repeated per block
    blocks: list[tuple[str, int, int, int]]  # (corruption, severity, start, stop) rows of x
    benchmark: tuple[str, ...] = corruptions.BENCHMARK
    extra: tuple[str, ...] = corruptions.EXTRA


def check(name: str, dataset: str) -> None:
    """One-line error for an unknown shift set or one that belongs to another dataset (before anything is written)."""
    if name not in SHIFT_SETS:
        raise ConfigError(f"unknown shift set {name!r}; choose one of: {', '.join(sorted(SHIFT_SETS))}")
    if SHIFT_SETS[name] != dataset:
        raise ConfigError(f"shift set {name!r} is built from dataset {SHIFT_SETS[name]!r}, not {dataset!r}; "
                          f"pass --dataset {SHIFT_SETS[name]}")


def _to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def load(name: str, data_dir: pathlib.Path, splits, seed: int = 0) -> ShiftSet:
    """The shift set for these splits (generated and cached on first use)."""
    if name != "digits_c_style":
        raise ConfigError(f"unknown shift set {name!r}; choose one of: {', '.join(sorted(SHIFT_SETS))}")
    from .digits import images32

    raw, labels = images32()
    test = torch.as_tensor(splits.indices["test"], dtype=torch.int64)
    base_x, base_y = _to_uint8_nhwc(raw[test]), labels[test.numpy()]
    root = pathlib.Path(data_dir) / name / corruptions.base_sha256(base_x, base_y)[:16]
    if not (root / "regbench_sidecar.json").is_file():
        corruptions.generate_style_set(base_x, base_y, root, seed=seed, base_name="digits-test")
    xs, blocks, start = [], [], 0
    for corruption in corruptions.ALL:
        for severity in (1, 2, 3, 4, 5):
            images, _ = corruptions.load_style_set(root, corruption, severity)
            xs.append(np.asarray(images))
            blocks.append((corruption, severity, start, start + len(images)))
            start += len(images)
    x = torch.from_numpy(np.concatenate(xs)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - splits.mean) / splits.std
    y = torch.as_tensor(base_y, dtype=torch.int64).repeat(len(blocks))
    return ShiftSet(name=name, x=x.contiguous(), y=y, blocks=blocks)
