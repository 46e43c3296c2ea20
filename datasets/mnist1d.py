"""MNIST-1D (Greydanus & Steinbach, "Scaling down deep learning", 2020), generated offline.

The `mnist1d` package's generator, called with its default args (`get_dataset_args()`: 5,000
samples, train_split 0.8, seed 42), reproduces the canonical `mnist1d_data.pkl` of the upstream
repo (x, x_test equal to 2.2e-16; y, y_test identical). So we never call its downloader
`get_dataset`, and nothing here touches the network.

The generator seeds and draws from the GLOBAL numpy RNG and python `random`; we save and restore
both around the call so loading data never changes a caller's random stream. The arrays are
cached as an .npz under `data_dir/mnist1d/` (written atomically) and reused.

Pool: the generator's 4,000 train samples (pool indices 0..3999) followed by its 1,000 test
samples (4000..4999). Test = those 1,000; val = a stratified 1,000 of the first 4,000; train = the
other 3,000.
"""

from __future__ import annotations

import io
import json
import pathlib
import random

import numpy as np

from regbench.errors import DataError

from .base import Dataset, Splits, atomic_write_bytes, make_splits, stratified_split

N_VAL = 1000
CACHE_NAME = "mnist1d_default_seed42.npz"


def _generator_args():
    """The generator's default args, minus the download URL (not part of the data's identity)."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)
    return args


def generate() -> dict[str, np.ndarray]:
    """Run the mnist1d generator with default args; global numpy/random states are restored."""
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def load_arrays(data_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """Read the cached arrays, generating (and caching) them first if absent or stale."""
    path = pathlib.Path(data_dir) / "mnist1d" / CACHE_NAME
    args_json = json.dumps(_generator_args(), sort_keys=True)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
                cached_args = str(f["args_json"])
        except Exception:  # unreadable cache: it is only a cache, so regenerate it below
            arrays, cached_args = None, None
        if arrays is not None and cached_args == args_json:
            return arrays
    arrays = generate()
    buf = io.BytesIO()
    np.savez(buf, args_json=np.array(args_json), **arrays)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise DataError(f"cannot write the mnist1d cache {path}: {e.strerror or e}") from e
    return arrays


class MNIST1D(Dataset):
    """MNIST-1D: 10 classes of 40-step 1-D signals; separates regularizers well at small n."""

    name = "mnist1d"
    description = "MNIST-1D (Greydanus 2020): 5,000 synthetic 1-D digits, generated offline"
    default_model = "cnn1d"
    num_classes = 10
    input_shape = (1, 40)

    def load(self, data_dir: pathlib.Path, split_seed: int = 0, train_size: int | None = None, *,
             train_per_class: int | None = None, augment: str | None = None) -> Splits:
        a = load_arrays(data_dir)
        x = np.concatenate([a["x"], a["x_test"]]).astype(np.float32)[:, None, :]
        y = np.concatenate([a["y"], a["y_test"]]).astype(np.int64)
        test = range(len(a["y"]), len(y))
        indices = stratified_split(y, N_VAL, seed=split_seed, test_indices=test)
        return make_splits(self.name, x, y, indices, self.num_classes, self.input_shape, split_seed, train_size,
                           train_per_class, augment or self.default_augment)
