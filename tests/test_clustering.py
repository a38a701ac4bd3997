import numpy as np
import pytest
from conftest import sq_distances

from actclust.clustering import KMeans, make_clustering


def _blobs(seed=0):
    """300 points around three centres 10 apart (unit noise), and the index of each one's centre."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0], [10, 0], [0, 10]], dtype=np.float32)
    labels = rng.integers(0, 3, 300)
    return (centres[labels] + rng.standard_normal((300, 2))).astype(np.float32), labels


# k-means finds well-separated blobs, with each blob's size and the mean squared distance to the
# nearest centre, and the same seed gives the same centres
def test_kmeans_finds_blobs_and_is_reproducible():
    x, labels = _blobs()
    a, b = KMeans(3, random_state=0).fit(x), KMeans(3, random_state=0).fit(x)
    assert np.array_equal(a.centers_, b.centers_)
    blob = {(0.0, 0.0): 0, (1.0, 0.0): 1, (0.0, 1.0): 2}
    found = [blob[tuple(np.round(c / 10))] for c in a.centers_]
    assert sorted(found) == [0, 1, 2]
    assert a.cluster_sizes_.tolist() == np.bincount(labels, minlength=3)[found].tolist()
    assert a.scale_ == pytest.approx(sq_distances(x, a.centers_).min(1).mean(), rel=1e-5)


# distances are squared Euclidean distances to the centres; predict is the nearest centre
def test_distances_and_predict_match_brute_force():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((200, 5)) * [1, 2, 3, 4, 50]).astype(np.float32)
    c = KMeans(6).fit(x)
    brute = sq_distances(x, c.centers_)
    np.testing.assert_allclose(c.distances(x), brute, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(c.predict(x), brute.argmin(1))


# soft assignment is softmax(-d^2 / (temperature * scale_)); temperature 0 is the nearest centre
def test_soft_assignment_known_answer():
    c = KMeans(2)
    c.centers_, c.scale_ = np.array([[0.0, 0.0], [2.0, 0.0]], dtype=np.float32), 2.0
    x = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]], dtype=np.float32)  # squared distances [0, 4], [1, 1], [9, 1]
    e = np.exp
    np.testing.assert_allclose(c.soft_assign(x, 1.0), [[1 / (1 + e(-2)), e(-2) / (1 + e(-2))], [0.5, 0.5],
                                                       [e(-4.5) / (e(-4.5) + e(-0.5)), e(-0.5) / (e(-4.5) + e(-0.5))]],
                               rtol=1e-5)
    np.testing.assert_allclose(c.soft_assign(x, 0.5)[0], [1 / (1 + e(-4)), e(-4) / (1 + e(-4))], rtol=1e-5)
    np.testing.assert_array_equal(c.soft_assign(x, 0.0), [[1, 0], [1, 0], [0, 1]])  # a tie goes to the first


# on data without ties, a small temperature approaches the hard assignment
def test_soft_assignment_small_temperature_limit():
    x, _ = _blobs()
    c = KMeans(3).fit(x)
    hard = c.soft_assign(x, 0.0)
    assert np.array_equal(hard.argmax(1), c.predict(x))
    assert np.allclose(c.soft_assign(x, 1e-3), hard, atol=1e-4)


# more clusters than distinct points leaves some empty, and they are counted: two points repeated
# ten times each fill two of four clusters
def test_empty_clusters_are_counted():
    x = np.repeat(np.eye(2, dtype=np.float32), 10, axis=0)
    c = KMeans(4).fit(x)
    assert sorted(c.cluster_sizes_.tolist()) == [0, 0, 10, 10]
    assert c.cluster_sizes_.tolist() == np.bincount(sq_distances(x, c.centers_).argmin(1), minlength=4).tolist()


# an unknown clustering name gets the allowed names
def test_unknown_clustering():
    with pytest.raises(ValueError, match=r"'clustering' parameter .* one of \['kmeans', 'idec', 'distill'\]. Got 'dec'"):
        make_clustering("dec", 3)


# k-means of a wide layer reads at most _TRAIN_FLOATS values of rows into memory (at least 256 rows per centre),
# not 1,024 rows per centre whatever their width; narrower layers keep 1,024 per centre
def test_kmeans_of_wide_rows_trains_on_bounded_values(monkeypatch):
    from actclust.clustering import base
    from actclust.compute import HOST

    seen = []

    class Recording(type(HOST)):
        def lloyd(self, X, init, niter, seed):
            seen.append(X.shape)
            return super().lloyd(X, init, niter, seed)

    monkeypatch.setattr(base, "_TRAIN_FLOATS", 1 << 20)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 2048)).astype(np.float32) * 4
    labels = rng.integers(0, 3, 6000)
    x = centres[labels] + rng.standard_normal((6000, 2048)).astype(np.float32)
    km = KMeans(3, random_state=0).fit(x, Recording())
    assert seen == [(768, 2048)]  # 3 x 256 rows: 2^20 values hold only 512
    found = km.distances(x).argmin(1)
    assert len({(a, b) for a, b in zip(found, labels)}) == 3  # the three blobs, found from the bounded sample
    seen.clear()
    KMeans(3, random_state=0).fit(x[:, :64], Recording())
    assert seen == [(3072, 64)]
