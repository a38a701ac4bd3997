import gzip

import numpy as np
import pytest

from actclust import ActClustError
from actclust.datasets import FASHION_MNIST_DIR, _read_idx, load_dataset, load_digits, load_fashion_mnist


# the built-in digits split is stratified, scaled to [0, 1], (n, 1, 8, 8)
def test_digits():
    x_tr, y_tr, x_te, y_te = load_digits()
    assert x_tr.shape[1:] == (1, 8, 8) and len(x_tr) + len(x_te) == 1797
    assert x_tr.dtype == np.float32 and 0 <= x_tr.min() and x_tr.max() <= 1
    assert set(y_te) == set(range(10))


def _write_idx(path, arr, cut=0):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    body = (header + arr.astype(np.uint8).tobytes())
    with gzip.open(path, "wb") as f:
        f.write(body[: len(body) - cut])


# IDX files are parsed; a truncated one is reported
def test_idx_reader(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(_read_idx(tmp_path / "a.gz"), arr)
    _write_idx(tmp_path / "b.gz", arr, cut=5)
    with pytest.raises(ActClustError, match="truncated"):
        _read_idx(tmp_path / "b.gz")


# a folder without the files says how to install them
def test_fashion_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


# unknown data set names list the built-in ones
def test_unknown_dataset():
    with pytest.raises(ValueError, match=r"Unknown data set 'mnist'; the built-in ones are \['digits', 'fashion-mnist'\]"):
        load_dataset("mnist")


# the real Fashion-MNIST from Debian's package: 60,000 + 10,000 images of 28x28
@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="dataset-fashion-mnist is not installed")
def test_fashion_real():
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(as_uint8=True)
    assert x_tr.shape == (60000, 1, 28, 28) and x_te.shape == (10000, 1, 28, 28)
    assert np.bincount(y_tr).tolist() == [6000] * 10
