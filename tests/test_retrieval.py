import numpy as np
import pytest

import actclust
from actclust import DataError, NotFittedError
from actclust.explainer import SPATIAL_GRID
from actclust.analysis.retrieval import layer_weights

from conftest import LAYERS, layer_vectors, sq_distances


def _brute(model, x_train, x, w, spatial_grid=SPATIAL_GRID):
    """Combined scaled distances (n, n_train) and per-layer parts, computed densely from the
    layer vectors computed by hand: D = sum_l w_l ||v_l(x) - v_l(t)||^2 / (2 * sum of variances);
    the conv layer by its spatial summary (the default ``spatial_grid``)."""
    train, query = layer_vectors(model, x_train, spatial_grid), layer_vectors(model, x, spatial_grid)
    parts = np.stack([wl * sq_distances(query[l], train[l]) / (2 * train[l].var(0).sum())
                      for l, wl in zip(LAYERS, w)], 2)
    return parts.sum(2), parts


# the documented weights for three layers at depths 0, 1/2, 1, before normalising
PRESETS = {"equal": [1, 1, 1], "low": [1, 10 ** -0.5, 0.1], "high": [1, 10 ** 0.5, 10]}


# the search is exact: same neighbours, distances and layer shares as a dense computation
@pytest.mark.parametrize("weights, raw", [("equal", PRESETS["equal"]), ("low", PRESETS["low"]),
                                          ("high", PRESETS["high"]), ([1, 2, 3], [1, 2, 3]),
                                          ({"fc1": 1.0}, [0, 1, 0])])
def test_similar_matches_brute_force(fitted, model, data, weights, raw):
    x = data[0][:10] + 0.1
    nb = fitted.similar(x, k=5, weights=weights)
    w = np.array(raw) / np.sum(raw)
    np.testing.assert_allclose(nb.weights, w, rtol=1e-12)
    dense, parts = _brute(model, data[0], x, w)
    order = np.argsort(dense, 1, kind="stable")[:, :5]
    np.testing.assert_array_equal(nb.indices, order)
    np.testing.assert_allclose(nb.distances, np.take_along_axis(dense, order, 1), rtol=1e-4, atol=1e-6)
    shares = np.take_along_axis(parts, order[:, :, None], 1) / np.take_along_axis(dense, order, 1)[:, :, None]
    np.testing.assert_allclose(nb.layer_shares, shares, atol=1e-3)


# without spatial summaries, the conv layer is searched by its clustering vector (channel means)
def test_similar_without_spatial_summaries(model, data):
    ac = actclust.ActivationClustering(model, LAYERS, n_clusters=4, spatial_grid=None, progress=False).fit(*data)
    assert list(ac.train_vectors_) == LAYERS
    x = data[0][:10] + 0.1
    w = np.array(PRESETS["low"]) / np.sum(PRESETS["low"])
    dense, _ = _brute(model, data[0], x, w, spatial_grid=None)
    np.testing.assert_array_equal(ac.similar(x, k=5, weights="low").indices, np.argsort(dense, 1, kind="stable")[:, :5])


# a training sample's nearest training sample is itself, at distance 0
def test_training_sample_finds_itself(fitted, data):
    nb = fitted.similar(data[0][:20], k=3, weights="high")
    assert np.array_equal(nb.indices[:, 0], np.arange(20))
    assert np.allclose(nb.distances[:, 0], 0, atol=1e-5)


# small query chunks give the same answer as one chunk (memory is O(chunk), results unchanged)
def test_chunked_search_is_identical(model, data, monkeypatch):
    import actclust.analysis.indexes as r

    def fresh():  # a new fit: nothing built before the patch is reused
        return actclust.ActivationClustering(model, LAYERS, n_clusters=4, progress=False).fit(*data)

    full = fresh().similar(data[0][:30], k=4)
    monkeypatch.setattr(r, "_QUERY_CHUNK", 7)
    part = fresh().similar(data[0][:30], k=4)
    assert np.array_equal(full.indices, part.indices) and np.allclose(full.distances, part.distances)


# presets: 10 ** -t ("low") and 10 ** t ("high") at relative depth t, normalised; any number of layers
def test_presets():
    four = ["a", "b", "c", "d"]
    low = np.array([1, 10 ** (-1 / 3), 10 ** (-2 / 3), 0.1])
    np.testing.assert_allclose(layer_weights("low", four), low / low.sum(), rtol=1e-12)
    np.testing.assert_allclose(layer_weights("high", four), low[::-1] / low.sum(), rtol=1e-12)
    np.testing.assert_allclose(layer_weights("equal", four), [0.25] * 4, rtol=1e-12)
    np.testing.assert_allclose(layer_weights("low", ["only"]), [1.0])
    np.testing.assert_allclose(layer_weights({"b": 3, "d": 1}, four), [0, 0.75, 0, 0.25])


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
    with pytest.raises(DataError, match=r"per-sample shape \(1, 7, 7\) but .* fitted on inputs of shape \(1, 6, 6\)"):
        fitted.similar(np.zeros((2, 1, 7, 7), np.float32))
    with pytest.raises(NotFittedError, match="not fitted yet"):
        actclust.ActivationClustering(model, LAYERS).similar(x)


# the training vectors are part of the saved run: a loaded run finds the same neighbours
def test_similar_after_load(fitted, data, model, tmp_path):
    fitted.save(tmp_path / "run")
    loaded = actclust.load(tmp_path / "run", model, progress=False)
    a, b = fitted.similar(data[0][:8], k=4, weights="low"), loaded.similar(data[0][:8], k=4, weights="low")
    assert np.array_equal(a.indices, b.indices) and np.allclose(a.distances, b.distances)
