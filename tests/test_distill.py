"""Tests of the distillation refinement (clustering="distill")."""

import numpy as np
import pytest
from conftest import sq_distances

from actclust.analysis import surrogate
from actclust.clustering.distill import DistillKMeans, DistillResult, DistillWarning, refine
from actclust.clustering import KMeans, make_clustering


def _toy(n, seed):
    """Two layers of uniform 2-D vectors; the 'DNN' splits layer a at x = 0.3, which k-means
    (4 clusters on a square, boundaries near 0.5) does not respect."""
    rng = np.random.default_rng(seed)
    vectors = {l: rng.uniform(0, 1, size=(n, 2)).astype(np.float32) for l in ("a", "b")}
    p1 = 1 / (1 + np.exp(-8 * (vectors["a"][:, 0] - 0.3)))
    return vectors, np.stack([1 - p1, p1], 1).astype(np.float32)


FAST = {"n_threads": 1}  # tiny problems: one thread avoids thread start-up and contention costs


@pytest.fixture(scope="module")
def toy():
    vectors, proba = _toy(800, 0)
    kmeans = {l: KMeans(4, random_state=0).fit(v) for l, v in vectors.items()}
    return vectors, proba, kmeans


@pytest.fixture(scope="module")
def learned(toy):
    vectors, proba, kmeans = toy
    return refine(vectors, kmeans, proba, learn_weights=True, random_state=0, **FAST)


def _heldout(vectors, proba, centers, temps, weights, kmeans, test):
    """Fidelity and KL(DNN || surrogate) on ``test`` of the surrogate with these centres,
    temperatures (relative to k-means' scale) and weights."""
    v_test, p_test = test
    layer_probas = []
    for l in vectors:
        c = KMeans(4)
        c.centers_, c.scale_ = centers[l], kmeans[l].scale_
        post = surrogate.fit_posteriors(c.soft_assign(vectors[l], temps[l]), proba.argmax(1), 2, 1.0)
        layer_probas.append(c.soft_assign(v_test[l], temps[l]) @ post)
    mix = surrogate.combine(np.stack(layer_probas), weights).astype(np.float64)
    kl = (p_test * (np.log(p_test) - np.log(mix))).sum(1).mean()
    return (mix.argmax(1) == p_test.argmax(1)).mean(), kl


def test_refine_raises_fidelity_over_kmeans(toy, learned):
    # On held-out toy data the refined surrogate agrees with the 'DNN' far more than k-means'.
    vectors, proba, kmeans = toy
    test = _toy(1000, 1)
    base = _heldout(vectors, proba, {l: c.centers_ for l, c in kmeans.items()}, dict.fromkeys(vectors, 0.0),
                    np.full(2, 0.5), kmeans, test)[0]
    r = learned
    assert isinstance(r, DistillResult) and r.converged
    refined = _heldout(vectors, proba, r.centers, r.temperatures, r.weights, kmeans, test)[0]
    assert base < 0.8 and refined > base + 0.1


def test_learned_weights_favour_the_layer_the_dnn_reads(learned):
    # The 'DNN' reads layer a only (b is independent noise): learned weights go to a.
    assert learned.weights.shape == (2,) and learned.weights[0] > 0.9


def test_learned_temperatures_lower_heldout_kl(toy, learned):
    # The learned temperatures, not the initial one, make the refined surrogate match the DNN's
    # distribution: at the same centres and weights, held-out KL is far lower than at 0.1.
    vectors, proba, kmeans = toy
    test = _toy(1000, 1)
    r = learned
    at_learned = _heldout(vectors, proba, r.centers, r.temperatures, r.weights, kmeans, test)[1]
    at_init = _heldout(vectors, proba, r.centers, dict.fromkeys(vectors, 0.1), r.weights, kmeans, test)[1]
    assert at_learned < 0.5 * at_init


def test_equal_weights_stay_equal(toy):
    # learn_weights=False keeps the given (default equal) weights.
    vectors, proba, kmeans = toy
    r = refine(vectors, kmeans, proba, learn_weights=False, **FAST)
    np.testing.assert_array_equal(r.weights, [0.5, 0.5])
    r = refine(vectors, kmeans, proba, learn_weights=False, weights=[3, 1], **FAST)
    np.testing.assert_allclose(r.weights, [0.75, 0.25])


def test_spread_ratio_reported_and_bounded(toy, learned):
    # The within-cluster spread after refinement over k-means' is reported for every layer and
    # held near max_spread_ratio.
    vectors, _proba, kmeans = toy
    r = learned
    assert set(r.spread_ratio) == {"a", "b"}
    for l, v in vectors.items():  # mean squared distance to the nearest centre, refined over k-means'
        expected = sq_distances(v, r.centers[l]).min(1).mean() / sq_distances(v, kmeans[l].centers_).min(1).mean()
        assert r.spread_ratio[l] == pytest.approx(expected, rel=1e-4)
    assert all(0.5 < s <= 1.25 for s in r.spread_ratio.values())
    assert all(c.shape == (4, 2) and c.dtype == np.float32 for c in r.centers.values())


def test_refine_is_deterministic(toy):
    # Same seed, same result.
    vectors, proba, kmeans = toy
    a = refine(vectors, kmeans, proba, learn_weights=True, **FAST)
    b = refine(vectors, kmeans, proba, learn_weights=True, **FAST)
    np.testing.assert_array_equal(a.centers["a"], b.centers["a"])
    np.testing.assert_array_equal(a.weights, b.weights)


def test_nan_warns_with_history_and_keeps_start(toy):
    # A loss that turns non-finite warns with the loss history and keeps the k-means start.
    vectors, proba, kmeans = toy
    with pytest.warns(DistillWarning, match=r"loss became non-finite.*Loss history: step 0: val_kl=nan"):
        r = refine(vectors, kmeans, proba, learn_weights=True, init_temperature=1e-45, **FAST)
    assert not r.converged
    np.testing.assert_array_equal(r.centers["a"], kmeans["a"].centers_)


def test_non_convergence_warns_with_history(toy):
    # Running out of steps while the held-out loss still improves warns, with the history.
    vectors, proba, kmeans = toy
    with pytest.warns(DistillWarning, match=r"did not converge within max_steps=3.*Loss history: step 0"):
        r = refine(vectors, kmeans, proba, learn_weights=True, max_steps=3, eval_every=1, **FAST)
    assert not r.converged and len(r.loss_history) == 4


@pytest.mark.parametrize("kwargs, error, match", [
    ({"bogus": 1}, ValueError, r"unknown options \['bogus'\]"),  # ParameterError, since the error contract
    ({"validation_fraction": 1.0}, ValueError, r"'validation_fraction' option of refine must be in \(0, 1\)"),
    ({"init_temperature": 0.0}, ValueError, r"'init_temperature' option of refine must be > 0"),
    ({"weights": [1, -1]}, ValueError, r"weights must be 2 non-negative numbers"),
])
def test_refine_parameter_errors(toy, kwargs, error, match):
    # Bad options name the option, the allowed values and the value given.
    vectors, proba, kmeans = toy
    with pytest.raises(error, match=match):
        refine(vectors, kmeans, proba, learn_weights=True, **kwargs)


def test_refine_input_errors(toy):
    # Misaligned layers, rows or probabilities are refused with a message saying what differs.
    vectors, proba, kmeans = toy
    with pytest.raises(ValueError, match=r"must name the same non-empty set of layers"):
        refine({"a": vectors["a"]}, kmeans, proba, learn_weights=True)
    with pytest.raises(ValueError, match=r"vectors of layers \['a', 'b'\] do not have one row per row"):
        refine(vectors, kmeans, proba[:10], learn_weights=True)
    with pytest.raises(ValueError, match=r"dnn_proba must be a finite, non-negative"):
        refine(vectors, kmeans, np.full_like(proba, np.nan), learn_weights=True)


def test_distill_kmeans_state_round_trip(toy, learned):
    # make_clustering("distill") fits k-means, takes refined centres and saves its temperature.
    vectors, _proba, kmeans = toy
    c = make_clustering("distill", 4, 0)
    assert isinstance(c, DistillKMeans) and c.name == "distill"
    c.fit(vectors["a"])
    np.testing.assert_array_equal(c.centers_, kmeans["a"].centers_)
    r = learned
    c.set_refined(vectors["a"], r.centers["a"], r.temperatures["a"])
    # The soft assignment equals the one used during refinement (k-means' scale).
    expected = KMeans(4)
    expected.centers_, expected.scale_ = r.centers["a"], kmeans["a"].scale_
    np.testing.assert_allclose(c.soft_assign(vectors["a"], c.temperature_),
                               expected.soft_assign(vectors["a"], r.temperatures["a"]), atol=1e-5)
    state = c.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    d = DistillKMeans(4)
    d.load_state_dict(state)
    assert d.temperature_ == c.temperature_
    np.testing.assert_array_equal(d.distances(vectors["b"]), c.distances(vectors["b"]))
