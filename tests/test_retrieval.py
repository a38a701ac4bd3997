import numpy as np
import pytest

import actclust
from actclust import DataError, NotFittedError
from actclust.retrieval import layer_weights

from conftest import LAYERS


def _brute(ac, x, w):
    """Combined scaled distances (n, n_train) and per-layer parts, computed densely."""
    q = ac._query(x, keep_vectors=True)
    parts = []
    for l, wl in zip(ac.layers_, w):
        t = ac.train_vectors_[l].astype(np.float64)
        scale = 2 * t.var(0).sum()
        d = ((q.vectors[l][:, None, :] - t[None]) ** 2).sum(2)
        parts.append(wl * d / scale)
    parts = np.stack(parts, 2)
    return parts.sum(2), parts


# the search is exact: same neighbours, distances and layer shares as a dense computation
@pytest.mark.parametrize("weights", ["equal", "low", "high", [1, 2, 3], {"fc1": 1.0}])
def test_similar_matches_brute_force(fitted, data, weights):
    x = data[0][:10] + 0.1
    nb = fitted.similar(x, k=5, weights=weights)
    w = layer_weights(weights, LAYERS)
    dense, parts = _brute(fitted, x, w)
    order = np.argsort(dense, 1, kind="stable")[:, :5]
    assert np.allclose(np.take_along_axis(dense, order, 1), nb.distances, rtol=1e-4, atol=1e-6)
    assert np.allclose(np.take_along_axis(dense, nb.indices, 1), nb.distances, rtol=1e-4, atol=1e-6)
    shares = np.take_along_axis(parts, nb.indices[:, :, None], 1) / nb.distances[:, :, None]
    assert np.allclose(shares, nb.layer_shares, atol=1e-3)
    assert np.allclose(nb.layer_shares.sum(2), 1, atol=1e-5) and np.allclose(nb.weights, w)


# a training sample's nearest training sample is itself, at distance 0
def test_training_sample_finds_itself(fitted, data):
    nb = fitted.similar(data[0][:20], k=3, weights="high")
    assert np.array_equal(nb.indices[:, 0], np.arange(20))
    assert np.allclose(nb.distances[:, 0], 0, atol=1e-5)


# small query chunks give the same answer as one chunk (memory is O(chunk), results unchanged)
def test_chunked_search_is_identical(fitted, data, monkeypatch):
    import actclust.retrieval as r

    full = fitted.similar(data[0][:30], k=4)
    fitted.__dict__.pop("_retrieval_cache")
    monkeypatch.setattr(r, "_QUERY_CHUNK", 7)
    part = fitted.similar(data[0][:30], k=4)
    assert np.array_equal(full.indices, part.indices) and np.allclose(full.distances, part.distances)


# presets: low decreases and high increases with depth, first/last ratio 10, any number of layers
def test_presets():
    low, high = layer_weights("low", ["a", "b", "c", "d"]), layer_weights("high", ["a", "b", "c", "d"])
    assert np.all(np.diff(low) < 0) and np.all(np.diff(high) > 0)
    assert low[0] / low[-1] == pytest.approx(10) and high[-1] / high[0] == pytest.approx(10)
    assert np.allclose(low.sum(), 1) and np.allclose(high.sum(), 1)
    assert np.allclose(layer_weights("low", ["only"]), [1.0])


# bad weights, bad k, unfitted explainer and inputs of another shape are clear errors
def test_similar_errors(fitted, data, model):
    x = data[0][:3]
    with pytest.raises(ValueError, match="weights must be one of"):
        fitted.similar(x, weights="middle")
    with pytest.raises(ValueError, match="one number per layer"):
        fitted.similar(x, weights=[1, 2])
    with pytest.raises(ValueError, match="non-negative and not all zero"):
        fitted.similar(x, weights=[1, -1, 1])
    with pytest.raises(ValueError, match="non-negative and not all zero"):
        fitted.similar(x, weights=[0, 0, 0])
    with pytest.raises(ValueError, match="were not fitted"):
        fitted.similar(x, weights={"fc3": 1})
    with pytest.raises(ValueError, match="k must be an int between 1 and the 120"):
        fitted.similar(x, k=121)
    with pytest.raises(ValueError, match="k must be an int between 1"):
        fitted.similar(x, k=0)
    with pytest.raises(DataError, match="differ from the shape"):
        fitted.similar(np.zeros((2, 1, 7, 7), np.float32))
    with pytest.raises(NotFittedError, match="not fitted yet"):
        actclust.ActivationClustering(model, LAYERS).similar(x)


# the training vectors are part of the saved run: a loaded run finds the same neighbours
def test_similar_after_load(fitted, data, model, tmp_path):
    fitted.save(tmp_path / "run")
    loaded = actclust.load(tmp_path / "run", model, progress=False)
    a, b = fitted.similar(data[0][:8], k=4, weights="low"), loaded.similar(data[0][:8], k=4, weights="low")
    assert np.array_equal(a.indices, b.indices) and np.allclose(a.distances, b.distances)
