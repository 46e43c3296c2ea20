"""scikit-learn's digits as a tiny real image dataset ("digits32"), shipped with sklearn, no download.

`load_digits()` holds the 1,797 images of the UCI optdigits *test* file: 8x8, values 0..16. We
scale them to [0, 1], upsample bilinearly to 32x32 and repeat to 3 channels, so the image code
paths (CIFAR-shaped CNNs, corruptions) run on real handwriting in well under a second.
Clean accuracy saturates quickly, so use it as the smoke/test image dataset, not for headline
comparisons.

Pool: the 1,797 samples in `load_digits()` order. Splits are stratified and seeded: test 500,
val 300, train the remaining 997.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import torch.nn.functional as F

from .base import Dataset, Splits, make_splits, stratified_split

N_TEST, N_VAL = 500, 300


def images32() -> tuple[torch.Tensor, np.ndarray]:
    """All 1,797 digits as float32 (N, 3, 32, 32) in [0, 1], plus int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32, device="cpu").unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return x.repeat(1, 3, 1, 1), d.target.astype(np.int64)


class Digits(Dataset):
    """sklearn digits upsampled to 3x32x32; data_dir is unused (the data ships with sklearn)."""

    name = "digits"
    description = "scikit-learn digits (1,797 real 8x8 handwritten digits) upsampled to 3x32x32"
    default_model = "cnn"
    num_classes = 10
    input_shape = (3, 32, 32)

    def load(self, data_dir: pathlib.Path, split_seed: int = 0, train_size: int | None = None, *,
             train_per_class: int | None = None, augment: str | None = None) -> Splits:
        x, y = images32()
        indices = stratified_split(y, N_VAL, N_TEST, seed=split_seed)
        return make_splits(self.name, x, y, indices, self.num_classes, self.input_shape, split_seed, train_size,
                           train_per_class, augment or self.default_augment)
