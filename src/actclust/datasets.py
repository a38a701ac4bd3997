"""Built-in data sets, read from local files only (nothing is downloaded).

``load_digits``: scikit-learn's bundled 8x8 digits (1,797 images). ``load_fashion_mnist``:
the IDX files of Debian's ``dataset-fashion-mnist`` package
(``apt-get install -y dataset-fashion-mnist``). Images come as float32 arrays of shape
``(n, 1, H, W)`` scaled to [0, 1], labels as int64.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from .exceptions import DataError, DataNotFoundError, ParameterError

__all__ = ["load_digits", "load_fashion_mnist", "load_dataset", "DATASETS", "FASHION_MNIST_DIR"]

FASHION_MNIST_DIR = Path(os.environ.get("ACTCLUST_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DATASETS = ("digits", "fashion-mnist")
#: How each built-in data set is prepared, in words (the CLI's --help and the README say it).
PREPARATION = (
    "built-in data sets are images (n, 1, H, W), float32 pixel values scaled to [0, 1] (no standardisation): "
    "'digits' is scikit-learn's 8x8 digits divided by 16, split 75/25 stratified with seed 0; 'fashion-mnist' "
    "is Debian's 28x28 Fashion-MNIST divided by 255, with its own train/test split. A model trained on other "
    "inputs (standardised, another size) needs your own .npz prepared as in training"
)


def load_digits(test_size: float = 0.25, random_state: int = 0):
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``, images ``(n, 1, 8, 8)``.

    The split is stratified and seeded, so it is the same on every machine.
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    d = _load()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=random_state, stratify=y)
    return x_tr, y_tr, x_te, y_te


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes.")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).copy()
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}.")
    return arr.reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).exists():
            return directory / name
    raise DataNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {directory}. Install it with "
        "'apt-get install -y dataset-fashion-mnist', or set ACTCLUST_FASHION_MNIST to its folder."
    )


def load_fashion_mnist(directory=None, as_uint8: bool = False):
    """Fashion-MNIST as ``(x_train, y_train, x_test, y_test)``, images ``(n, 1, 28, 28)``.

    Parameters
    ----------
    directory : path, optional
        Folder of the IDX files; default ``$ACTCLUST_FASHION_MNIST`` or Debian's location.
    as_uint8 : bool, default=False
        Return the raw bytes (0-255) instead of float32 in [0, 1], to save memory.
    """
    directory = Path(directory) if directory is not None else FASHION_MNIST_DIR
    out = []
    for split in ("train", "t10k"):
        x = _read_idx(_find(directory, f"{split}-images-idx3-ubyte"))[:, None]
        y = _read_idx(_find(directory, f"{split}-labels-idx1-ubyte")).astype(np.int64)
        out += [x if as_uint8 else x.astype(np.float32) / 255.0, y]
    return tuple(out)


def load_dataset(name: str):
    """Load a built-in data set by name: one of :data:`DATASETS`."""
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":
        return load_fashion_mnist()
    raise ParameterError(f"Unknown data set {name!r}; the built-in ones are {list(DATASETS)}.")
