"""CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019) in the official Zenodo layout.

A folder (`CIFAR-10-C/` or `CIFAR-100-C/`, as extracted from the Zenodo tar) holds one
`<corruption>.npy` per corruption, uint8 (N, 32, 32, 3) HWC, and `labels.npy` (N,). Rows come in 5
severity blocks of N/5 (officially N = 50,000, blocks of the 10,000 test images in test-set order):
rows [(s-1)*N/5 : s*N/5] are severity s.

`load_cifar_c` checks each file it needs against its md5 (the Zenodo per-file table below, or the
`md5` map of a generated set's sidecar, or a map passed in; a generated set whose sidecar has no
md5 map is read unverified), opens it memory-mapped (no pickles:
`allow_pickle=False`) and returns read-only memmap slices, one per (corruption, severity); nothing
is read into memory until the caller touches it. A verified file is remembered by (path, size,
mtime) for the life of the process, so repeated loads do not re-hash 150 MB files.

`official_folder(data_dir, dataset)` returns DATA_DIR/CIFAR-10-C/ (CIFAR-100-C/), extracting it first from the
Zenodo tar (`ARCHIVES`: name, md5, size, URL) when only the tar is there; offline and absent, it is a one-line
DataError naming the tar, its size, md5, URL and where to put it.

`write_cifar_c_layout` writes the same layout (for locally generated "CIFAR-10-C-style" sets) with
each file written atomically, plus a JSON sidecar `regbench_sidecar.json` (the name that
`corruptions.generate_style_set` uses) recording the caller's metadata, the severity order and
the md5 of every written file, so the reader can verify generated sets too.
"""

from __future__ import annotations

import json
import pathlib
from typing import NamedTuple

import numpy as np

from regbench.errors import ConfigError, DataError

from .base import atomic_write_bytes
from .cifar import extract_archive, md5_file, verify
from .corruptions import (  # one list of the 15 + 4 names for the reader and the generator
    BENCHMARK,
    EXTRA,
)

CORRUPTIONS = BENCHMARK + EXTRA
SEVERITIES = (1, 2, 3, 4, 5)
SIDECAR = "regbench_sidecar.json"  # the name datasets/corruptions.py uses too
FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}
URLS = {
    "cifar10": "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar (md5 56bf5dcef84df0e2308c6dcbcbbd8499)",
    "cifar100": "https://zenodo.org/records/3555552/files/CIFAR-100-C.tar (md5 11f0ed0f1191edbf9fa23466ae6021d3)",
}
# The Zenodo tar of each set: file name, md5, size in bytes, download URL (docs/datasets.md §5, CIFAR-10-C table).
ARCHIVES = {
    "cifar10": ("CIFAR-10-C.tar", "56bf5dcef84df0e2308c6dcbcbbd8499", 2_918_471_680,
                "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar?download=1"),
    "cifar100": ("CIFAR-100-C.tar", "11f0ed0f1191edbf9fa23466ae6021d3", 2_918_473_216,
                 "https://zenodo.org/records/3555552/files/CIFAR-100-C.tar?download=1"),
}

MD5 = {
    "cifar10": {
        "brightness": "0a81ef75e0b523c3383219c330a85d48", "contrast": "3c8262171c51307f916c30a3308235a8",
        "defocus_blur": "7d1322666342a0702b1957e92f6254bc", "elastic_transform": "9421657c6cd452429cf6ce96cc412b5f",
        "fog": "7b397314b5670f825465fbcd1f6e9ccd", "frost": "31f6ab3bce1d9934abfb0cc13656f141",
        "gaussian_blur": "c33370155bc9b055fb4a89113d3c559d", "gaussian_noise": "ecaf8b9a2399ffeda7680934c33405fd",
        "glass_blur": "7361fb4019269e02dbf6925f083e8629", "impulse_noise": "2090e01c83519ec51427e65116af6b1a",
        "jpeg_compression": "2b9cc4c864e0193bb64db8d7728f8187", "labels": "c439b113295ed5254878798ffe28fd54",
        "motion_blur": "fffa5f852ff7ad299cfe8a7643f090f4", "pixelate": "0f14f7e2db14288304e1de10df16832f",
        "saturate": "1cfae0964219c5102abbb883e538cc56", "shot_noise": "3a7239bb118894f013d9bf1984be7f11",
        "snow": "bb238de8555123da9c282dea23bd6e55", "spatter": "8a5a3903a7f8f65b59501a6093b4311e",
        "speckle_noise": "ef00b87611792b00df09c0b0237a1e30", "zoom_blur": "6ea8e63f1c5cdee1517533840641641b",
    },
    "cifar100": {
        "brightness": "f22d7195aecd6abb541e27fca230c171", "contrast": "322bb385f1d05154ee197ca16535f71e",
        "defocus_blur": "d923e3d9c585a27f0956e2f2ad832564", "elastic_transform": "a0792bd6581f6810878be71acedfc65a",
        "fog": "4efc7ebd5e82b028bdbe13048e3ea564", "frost": "3a39c6823bdfaa0bf8b12fe7004b8117",
        "gaussian_blur": "5204ba0d557839772ef5a4196a052c3e", "gaussian_noise": "ecc4d366eac432bdf25c024086f5e97d",
        "glass_blur": "0bf384f38e5ccbf8dd479d9059b913e1", "impulse_noise": "3b3c210ddfa0b5cb918ff4537a429fef",
        "jpeg_compression": "c851b7f1324e1d2ffddeb76920576d11", "labels": "bb4026e9ce52996b95f439544568cdb2",
        "motion_blur": "732a7e2e54152ff97c742d4c388c5516", "pixelate": "96c00c60f144539e14cffb02ddbd0640",
        "saturate": "c0697e9fdd646916a61e9c312c77bf6b", "shot_noise": "b0a1fa6e1e465a747c1b204b1914048a",
        "snow": "0237be164583af146b7b144e73b43465", "spatter": "12ccf41d62564d36e1f6a6ada5022728",
        "speckle_noise": "e3f215b1a0f9fd9fd6f0d1cf94a7ce99", "zoom_blur": "0204613400c034a81c4830d5df81cb82",
    },
}

_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> md5 that matched


class CifarC(NamedTuple):
    """One entry per requested (corruption, severity): `x[i]` uint8 (n, 32, 32, 3) read-only
    memmap slice, `labels[i]` int64 (n,), `index[i]` = (corruption, severity)."""

    x: list
    labels: list
    index: list


def _check_choices(corruptions, severities):
    corruptions = list(BENCHMARK if corruptions is None else corruptions)
    severities = list(SEVERITIES if severities is None else severities)
    bad = [c for c in corruptions if c not in CORRUPTIONS]
    if bad:
        raise ConfigError(f"unknown CIFAR-C corruption {bad[0]!r}; choose from: {', '.join(CORRUPTIONS)}")
    for s in severities:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 1 <= s <= 5:
            raise ConfigError(f"CIFAR-C severity {s!r} is outside 1..5; choose from 1, 2, 3, 4, 5")
    return corruptions, [int(s) for s in severities]


def _verified(path: pathlib.Path, md5: str, hint: str) -> None:
    try:
        st = path.stat()
    except OSError:
        st = None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns) if st else None
    if key is not None and _VERIFIED.get(key) == md5:
        return
    verify(path, md5, hint=hint)
    if key is not None:
        _VERIFIED[key] = md5


def _open_npy(path: pathlib.Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"cannot read {path} as a .npy file ({e}); it is truncated or corrupt: "
                        f"delete it and put a good copy there") from e


def _read_sidecar(root: pathlib.Path) -> dict | None:
    path = root / SIDECAR
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read {path} ({e}); regenerate the set") from e
    if not isinstance(doc, dict):
        raise DataError(f"{path} is not a JSON object; regenerate the set")
    return doc


def load_cifar_c(root, corruptions=None, severities=None, *, dataset: str = "cifar10",
                 md5s: dict[str, str] | None = None) -> CifarC:
    """Memory-mapped blocks of `corruptions` (default: the 15 benchmark ones) x `severities`.

    `root` is the folder holding the .npy files. Official folder (no sidecar): 5 severity blocks,
    checked against the Zenodo md5 table of `dataset` ("cifar10" or "cifar100"). Generated set
    (a `regbench_sidecar.json` is present): its `severities` list (default 1..5) gives the block
    order, its `md5` map the checksums; a generated set whose sidecar has no md5 map is read
    unverified (the files are plain .npy, never unpickled). `md5s` (name without .npy -> md5)
    overrides either table.
    """
    corruptions, severities = _check_choices(corruptions, severities)
    root = pathlib.Path(root)
    side = _read_sidecar(root) if root.is_dir() else None
    hint = ""
    block_sev = list(SEVERITIES)
    if side is not None:
        block_sev = [int(v) for v in side.get("severities", SEVERITIES)]
        missing = [v for v in severities if v not in block_sev]
        if missing:
            raise ConfigError(f"severity {missing[0]} is not in the generated set {root} "
                              f"(it has {', '.join(map(str, block_sev))}); choose from those")
        if md5s is None:
            md5s = side.get("md5")
    elif md5s is None:
        if dataset not in MD5:
            raise ConfigError(f"unknown CIFAR-C dataset {dataset!r}; choose from: {', '.join(MD5)}")
        md5s = MD5[dataset]
        hint = f" (from {URLS[dataset]}, folder {FOLDERS[dataset]}/)"
    if not root.is_dir():
        raise DataError(f"missing CIFAR-C folder {root}; put the .npy files there{hint}")
    for name in ("labels", *corruptions):
        path = root / f"{name}.npy"
        if md5s is None:  # generated set without checksums: existence only
            if not path.is_file():
                raise DataError(f"missing data file {path}; regenerate the set or pick another corruption")
        elif name not in md5s:
            raise DataError(f"no md5 known for {path}; refusing an unverified file")
        else:
            _verified(path, md5s[name], hint)

    labels = _open_npy(root / "labels.npy")
    k = len(block_sev)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) == 0 or len(labels) % k:
        raise DataError(f"{root / 'labels.npy'} has {labels.dtype}{labels.shape}; expected N integer "
                        f"labels with N a positive multiple of {k} (the number of severity blocks)")
    n = len(labels)
    block = n // k
    arrays, shape = {}, None
    for c in corruptions:
        a = _open_npy(root / f"{c}.npy")
        shape = shape or (n, *a.shape[1:])
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3 or a.shape != shape:
            raise DataError(f"{root / (c + '.npy')} has {a.dtype}{a.shape}; expected uint8 {shape} "
                            f"(N x H x W x 3, N = len(labels.npy))")
        arrays[c] = a
    out = CifarC([], [], [])
    for c in corruptions:
        for s in severities:
            j = block_sev.index(s)
            rows = slice(j * block, (j + 1) * block)
            out.x.append(arrays[c][rows])
            out.labels.append(np.asarray(labels[rows], dtype=np.int64))
            out.index.append((c, s))
    return out


def _atomic_save_npy(path: pathlib.Path, array: np.ndarray) -> str:
    """np.save to a temp file beside `path`, then rename; returns the file's md5."""
    from regbench import atomic

    with atomic.atomic_file(path) as f:
        np.save(f, array, allow_pickle=False)
    return md5_file(path)


def write_cifar_c_layout(root, arrays_by_corruption: dict[str, np.ndarray], labels, sidecar: dict | None = None,
                         severities=SEVERITIES) -> dict:
    """Write `<root>/<corruption>.npy` (uint8 (N, 32, 32, 3), one block of N/len(severities) rows
    per severity, in `severities` order), `labels.npy` and the sidecar JSON (`sidecar` +
    {"md5": {...}, "severities": [...]}); returns the md5 map.

    Each file is written atomically; the sidecar is written last, so a set whose sidecar exists
    is complete.
    """
    root = pathlib.Path(root)
    _, severities = _check_choices([], severities)
    if len(set(severities)) != len(severities) or not severities:
        raise ConfigError(f"CIFAR-C severities {severities} must be distinct and non-empty")
    labels = np.asarray(labels)
    n, k = len(labels), len(severities)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or n == 0 or n % k:
        raise DataError(f"CIFAR-C labels must be N integers with N a positive multiple of {k} "
                        f"(one block per severity); got {labels.dtype}{labels.shape}")
    for c, a in arrays_by_corruption.items():
        if c not in CORRUPTIONS:
            raise ConfigError(f"unknown CIFAR-C corruption {c!r}; choose from: {', '.join(CORRUPTIONS)}")
        a = np.asarray(a)
        if a.dtype != np.uint8 or a.shape != (n, 32, 32, 3):
            raise DataError(f"CIFAR-C array {c!r} is {a.dtype}{a.shape}; expected uint8 ({n}, 32, 32, 3)")
    root.mkdir(parents=True, exist_ok=True)
    (root / SIDECAR).unlink(missing_ok=True)  # the set is incomplete until the new sidecar lands
    md5s = {"labels": _atomic_save_npy(root / "labels.npy", labels)}
    for c, a in arrays_by_corruption.items():
        md5s[c] = _atomic_save_npy(root / f"{c}.npy", np.ascontiguousarray(a))
    doc = {**(sidecar or {}), "md5": md5s, "severities": severities}
    atomic_write_bytes(root / SIDECAR, json.dumps(doc, sort_keys=True, indent=1).encode("utf-8"))
    return md5s


def official_folder(data_dir, dataset: str = "cifar10") -> pathlib.Path:
    """DATA_DIR/CIFAR-10-C/ (or CIFAR-100-C/), ready for `load_cifar_c`.

    If only the Zenodo tar is in DATA_DIR, its md5 is checked and it is extracted first (into a temp folder that is
    renamed into place, as for CIFAR-10). Nothing goes online: a missing set is a one-line DataError naming the tar,
    its size, md5 and URL and where to put it. The tables are read at call time, so tests can point them at tiny files.
    """
    if dataset not in ARCHIVES:
        raise ConfigError(f"unknown CIFAR-C dataset {dataset!r}; choose from: {', '.join(ARCHIVES)}")
    data_dir = pathlib.Path(data_dir)
    folder = data_dir / FOLDERS[dataset]
    if folder.is_dir():
        return folder
    name, md5, size, url = ARCHIVES[dataset]
    tar = data_dir / name
    if not tar.is_file():
        raise DataError(f"missing {folder}/ and its archive {tar} ({size:,} B, md5 {md5}); download {url} "
                        f"and put it in {data_dir} (or extract it there)")
    verify(tar, md5)
    extract_archive(tar, data_dir, FOLDERS[dataset])
    return folder
