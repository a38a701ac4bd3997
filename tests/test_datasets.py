import gzip

import numpy as np
import pytest
from conftest import FASHION_MNIST_FILES, require_fashion_mnist

from actclust import ActClustError
from actclust.datasets import _read_idx, load_dataset, load_digits, load_fashion_mnist


# the built-in digits: the 0..16 grey levels divided by 16, (n, 1, 8, 8), a quarter held out in
# every class (stratified), the same split on every call
def test_digits():
    x_tr, y_tr, x_te, y_te = load_digits()
    assert x_tr.shape[1:] == (1, 8, 8) and len(x_tr) + len(x_te) == 1797 and x_tr.dtype == np.float32
    levels = np.unique(np.concatenate([x_tr, x_te]) * 16)
    np.testing.assert_array_equal(levels, np.arange(17))
    per_class = np.bincount(np.concatenate([y_tr, y_te]))
    assert per_class.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # scikit-learn's digits
    assert np.abs(np.bincount(y_te, minlength=10) - per_class / 4).max() <= 1
    again = load_digits()
    assert np.array_equal(again[0], x_tr) and np.array_equal(again[3], y_te)


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


# the real Fashion-MNIST from Debian's package: 60,000 + 10,000 images of 28x28, 6,000 and 1,000
# per class, in the published order (labels of the first ten images of each split)
@pytest.mark.slow
def test_fashion_real():
    require_fashion_mnist()
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(as_uint8=True)
    assert x_tr.shape == (60000, 1, 28, 28) and x_te.shape == (10000, 1, 28, 28) and x_tr.dtype == np.uint8
    assert np.bincount(y_tr).tolist() == [6000] * 10 and np.bincount(y_te).tolist() == [1000] * 10
    assert y_tr[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5] and y_te[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    x = load_fashion_mnist()[0][:100]
    assert x.dtype == np.float32 and np.allclose(x * 255, x_tr[:100], atol=1e-3)


# the data-dependent tests skip without Fashion-MNIST, but fail under CI, which installs it
@pytest.mark.parametrize("ci, outcome", [(None, "skip"), ("", "skip"), ("false", "skip"), ("0", "skip"),
                                         ("true", "fail"), ("1", "fail"), ("yes", "fail")])
def test_require_fashion_mnist_skips_or_fails(tmp_path, monkeypatch, ci, outcome):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    expected = {"skip": pytest.skip.Exception, "fail": pytest.fail.Exception}[outcome]
    with pytest.raises(expected, match="t10k-labels-idx1-ubyte"):
        require_fashion_mnist(tmp_path)
    for name in FASHION_MNIST_FILES[:3]:
        (tmp_path / f"{name}.gz").touch()
    with pytest.raises(expected, match=r"\['t10k-labels-idx1-ubyte'\]"):  # names what is missing
        require_fashion_mnist(tmp_path)
    (tmp_path / FASHION_MNIST_FILES[3]).touch()  # uncompressed counts too
    assert require_fashion_mnist(tmp_path) == tmp_path
