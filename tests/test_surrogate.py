import numpy as np

from actclust import surrogate


# posteriors are per-cluster distributions; an empty cluster falls back to the class prior
def test_posteriors_smoothed_toward_prior():
    assign = np.eye(3)[[0, 0, 1, 1]]  # cluster 2 empty
    targets = np.array([0, 0, 1, 0])
    post = surrogate.fit_posteriors(assign, targets, 2, smoothing=1.0)
    prior = np.array([0.75, 0.25])
    assert np.allclose(post.sum(1), 1)
    assert np.allclose(post[0], (np.array([2, 0]) + prior) / 3)
    assert np.allclose(post[2], prior)


# the combination divides by the sum of the weights, not by the number of layers
def test_combine_normalises_by_sum_of_weights():
    p = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # two layers, one sample
    out = surrogate.combine(p, np.array([3.0, 1.0]))
    assert np.allclose(out, [[0.75, 0.25]]) and np.allclose(out.sum(1), 1)


# learned weights go to the layer that predicts the targets
def test_weights_favour_the_informative_layer():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 500)
    good = np.eye(3)[targets] * 0.8 + 0.2 / 3
    noise = rng.dirichlet(np.ones(3), size=500)
    probas = np.stack([noise, good])
    assert surrogate.learn_weights(probas, targets)[1] > 0.9
    w = surrogate.fidelity_weights(probas, targets)
    assert np.isclose(w.sum(), 1) and (surrogate.combine(probas, w).argmax(1) == targets).mean() == 1.0
