import numpy as np
import pytest

from actclust.clustering import KMeans, make_clustering


def _blobs(seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0], [10, 0], [0, 10]], dtype=np.float32)
    return (centres[rng.integers(0, 3, 300)] + rng.standard_normal((300, 2))).astype(np.float32)


# k-means finds well-separated blobs, and the same seed gives the same centres
def test_kmeans_finds_blobs_and_is_reproducible():
    x = _blobs()
    a, b = KMeans(3, random_state=0).fit(x), KMeans(3, random_state=0).fit(x)
    assert np.array_equal(a.centers_, b.centers_)
    found = sorted(map(tuple, np.round(a.centers_ / 10)))
    assert found == [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0)]
    assert a.cluster_sizes_.sum() == 300 and (a.cluster_sizes_ > 0).all()


# soft assignments are distributions; temperature 0 is the hard assignment; small T approaches it
def test_soft_assignment_limits():
    x = _blobs()
    c = KMeans(3).fit(x)
    hard = c.soft_assign(x, 0.0)
    assert np.array_equal(hard.argmax(1), c.predict(x)) and np.allclose(hard.sum(1), 1)
    soft = c.soft_assign(x, 1.0)
    assert np.allclose(soft.sum(1), 1) and (soft < 1).any()
    assert np.allclose(c.soft_assign(x, 1e-3), hard, atol=1e-4)


# more clusters than distinct points leaves some empty, and they are counted
def test_empty_clusters_are_counted():
    x = np.repeat(np.eye(2, dtype=np.float32), 10, axis=0)
    c = KMeans(4).fit(x)
    assert c.cluster_sizes_.sum() == 20 and (c.cluster_sizes_ == 0).sum() >= 2


# an unknown clustering name gets the allowed names
def test_unknown_clustering():
    with pytest.raises(ValueError, match=r"'clustering' parameter .* one of \['kmeans', 'idec', 'distill'\]. Got 'dec'"):
        make_clustering("dec", 3)
