import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from actclust.analysis.baselines import Mahalanobis, TrustScore, energy, max_softmax

# 1-D fixture, distances by hand: class 0 at 0, 1, 2; class 1 at 10, 12.
X = np.array([[0.0], [1.0], [2.0], [10.0], [12.0]])
Y = np.array([0, 0, 0, 1, 1])


# Jiang et al.'s score, k=1 (the paper's text): nearest other class over nearest predicted class.
def test_trust_score_k1_by_hand():
    ts = TrustScore(k=1).fit(X, Y)
    np.testing.assert_allclose(ts.class_distances([[3.0], [11.0]]), [[1, 7], [9, 1]])
    # x=3 predicted 0: 7 / 1; predicted 1: 1 / 7; x=11 predicted 1: 9 / 1
    np.testing.assert_allclose(ts.score([[3.0], [3.0], [11.0]], np.array([0, 1, 1])), [7, 1 / 7, 9], rtol=1e-6)


# The authors' code and alibi score by the 2nd nearest point of each class.
def test_trust_score_k2_by_hand():
    ts = TrustScore(k=2).fit(X, Y)
    # x=3: class 0 at distances 1, 2, 3 -> 2; class 1 at 7, 9 -> 9
    np.testing.assert_allclose(ts.class_distances([[3.0]]), [[2, 9]])
    np.testing.assert_allclose(ts.score([[3.0]], np.array([0])), [4.5], rtol=1e-6)
    np.testing.assert_allclose(ts.score([[3.0]], np.array([1])), [2 / 9], rtol=1e-6)


# alpha removes the low-density points: radius = distance to the k_filter-th nearest, self first.
def test_trust_score_alpha_filters_outliers():
    x = np.array([[0.0], [1.0], [2.0], [9.0], [10.0], [12.0]])
    y = np.array([0, 0, 0, 0, 1, 1])
    # class 0 radii with k_filter=2: 1, 1, 1, 7; the 0.75 quantile is 2.5, so 9 is dropped
    plain = TrustScore(k=1).fit(x, y).score([[8.0]], np.array([0]))
    filtered = TrustScore(k=1, alpha=0.25, k_filter=2).fit(x, y).score([[8.0]], np.array([0]))
    np.testing.assert_allclose(plain, [2 / 1], rtol=1e-6)
    np.testing.assert_allclose(filtered, [2 / 6], rtol=1e-6)


def test_trust_score_errors():
    with pytest.raises(ValueError, match=r"'k' parameter of TrustScore must be an int >= 1. Got 0"):
        TrustScore(k=0)
    with pytest.raises(ValueError, match=r"'alpha' parameter of TrustScore must be a float in \[0, 1\). Got 1.0"):
        TrustScore(alpha=1.0)
    with pytest.raises(ValueError, match=r"class 1 has 2 training points; TrustScore\(k=3\) needs at least 3"):
        TrustScore(k=3).fit(X, Y)
    with pytest.raises(ValueError, match=r"alpha=0.5 leaves class 1 with 2 points; TrustScore\(k=3\) needs at least 3"):
        TrustScore(k=3, alpha=0.5, k_filter=2).fit(np.r_[X, [[20.0]]], np.r_[Y, 1])  # class 1 radii 2, 2, 8
    ts = TrustScore().fit(X, Y)
    with pytest.raises(ValueError, match=r"pred holds class 2 but TrustScore was fitted on 2 classes"):
        ts.score([[1.0]], np.array([2]))
    with pytest.raises(ValueError, match=r"X has 2 features but the baseline was fitted on 1"):
        ts.score([[1.0, 2.0]], np.array([0]))
    with pytest.raises(ValueError, match=r"X has NaN or infinite values"):
        ts.fit([[np.nan]] * 5, Y)
    with pytest.raises(ValueError, match=r"y must be 5 non-negative integer class ids; got shape \(5,\), dtype float64"):
        ts.fit(X, Y.astype(float))


# Against SciPy's Mahalanobis distance with the pooled (biased) within-class covariance.
def test_mahalanobis_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3)) @ np.array([[2.0, 0.3, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 0.2]])
    y = np.repeat([0, 1, 2], 20)
    x[y == 1] += 3.0
    m = Mahalanobis().fit(x, y)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    centred = x - means[y]
    vi = np.linalg.inv(centred.T @ centred / len(x))
    q = rng.normal(size=(5, 3))
    expected = np.array([[scipy_mahalanobis(r, mu, vi) ** 2 for mu in means] for r in q])
    np.testing.assert_allclose(m.distances(q), expected, rtol=1e-8)
    np.testing.assert_allclose(m.score(q), -expected.min(1), rtol=1e-8)


def test_softmax_and_energy_by_hand():
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0], [1000.0, 0.0]])
    np.testing.assert_allclose(max_softmax(logits), [0.5, 0.75, 1.0])
    np.testing.assert_allclose(energy(logits), [np.log(2), np.log(4), 1000.0])
    np.testing.assert_allclose(energy(logits[:1], temperature=2.0), [2 * np.log(2)])
    with pytest.raises(ValueError, match=r"'temperature' parameter of energy must be a float > 0. Got 0"):
        energy(logits, temperature=0)
    with pytest.raises(ValueError, match=r"logits must be a 2-D array \(n_samples, n_classes >= 2\); got shape \(3,\)"):
        max_softmax(np.zeros(3))
