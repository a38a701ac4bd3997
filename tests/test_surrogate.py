import numpy as np

from actclust.analysis import surrogate


# posteriors are per-cluster class mixes smoothed toward the class prior; an empty cluster is the prior
def test_posteriors_smoothed_toward_prior():
    assign = np.eye(3)[[0, 0, 1, 1]]  # cluster 2 empty
    targets = np.array([0, 0, 1, 0])
    post = surrogate.fit_posteriors(assign, targets, 2, smoothing=1.0)
    prior = np.array([0.75, 0.25])
    np.testing.assert_allclose(post, [(np.array([2, 0]) + prior) / 3, (np.array([1, 1]) + prior) / 3, prior],
                               rtol=1e-6)


# soft assignments count fractionally; hand-computed on 6 samples, 2 clusters, 3 classes
def test_posteriors_from_soft_assignments():
    assign = np.array([[1.0, 0.0], [0.5, 0.5], [0.25, 0.75], [0.0, 1.0], [0.9, 0.1], [0.0, 1.0]])
    targets = np.array([0, 1, 2, 2, 0, 0])  # prior [1/2, 1/6, 1/3]
    # soft counts: cluster 0 [1 + 0.9, 0.5, 0.25] (2.65 in all), cluster 1 [0.1 + 1, 0.5, 0.75 + 1] (3.35)
    counts = np.array([[1.9, 0.5, 0.25], [1.1, 0.5, 1.75]])
    smoothed = (counts + 2 * np.array([1 / 2, 1 / 6, 1 / 3])) / np.array([[2.65 + 2], [3.35 + 2]])
    np.testing.assert_allclose(surrogate.fit_posteriors(assign, targets, 3, smoothing=2.0), smoothed, rtol=1e-6)
    np.testing.assert_allclose(surrogate.fit_posteriors(assign, targets, 3, smoothing=0.0),
                               counts / counts.sum(1, keepdims=True), rtol=1e-6)


# the combination divides by the sum of the weights, not by the number of layers
def test_combine_normalises_by_sum_of_weights():
    p = np.array([[[1.0, 0.0], [0.5, 0.5]],
                  [[0.0, 1.0], [0.2, 0.8]],
                  [[0.3, 0.7], [1.0, 0.0]]])  # three layers, two samples
    out = surrogate.combine(p, np.array([3.0, 0.0, 1.0]))
    np.testing.assert_allclose(out, [[0.75 + 0.075, 0.175], [0.375 + 0.25, 0.375]], rtol=1e-6)


# the likelihood-optimal mixture weights: two layers giving the target 0.8 / 0.2 on three samples
# and 0.2 / 0.8 on a fourth; d/dw of 3 log(0.2 + 0.6 w) + log(0.8 - 0.6 w) is 0 at w = 11/12
def test_learn_weights_known_optimum():
    p = np.zeros((2, 4, 2))
    p[0, :, 0] = [0.8, 0.8, 0.8, 0.2]
    p[1, :, 0] = [0.2, 0.2, 0.2, 0.8]
    p[:, :, 1] = 1 - p[:, :, 0]
    np.testing.assert_allclose(surrogate.learn_weights(p, np.zeros(4, dtype=int)), [11 / 12, 1 / 12], atol=2e-3)


def _fidelity(probas, w, targets):
    return (np.tensordot(w, probas, 1).argmax(1) == targets).mean()


# learned weights go to the layer that predicts the targets; fidelity weights are at least as good
# as equal weights and as every single layer, and equal weights win ties
def test_weights_favour_the_informative_layer():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 500)
    good = np.eye(3)[targets] * 0.8 + 0.2 / 3
    noise = rng.dirichlet(np.ones(3), size=500)
    probas = np.stack([noise, good])
    assert surrogate.learn_weights(probas, targets)[1] > 0.9
    w = surrogate.fidelity_weights(probas, targets)
    assert _fidelity(probas, w, targets) == 1.0
    assert _fidelity(probas, [0.5, 0.5], targets) < 1.0  # so equal weights were rightly not kept
    same = np.stack([noise, noise])  # every candidate ties: equal weights are kept
    np.testing.assert_array_equal(surrogate.fidelity_weights(same, targets), [0.5, 0.5])


# scores: fidelity against the DNN and accuracy against the labels, combined and per layer
def test_scores_known_answer():
    probas = np.array([[[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4]],
                       [[0.2, 0.8], [0.6, 0.4], [0.1, 0.9], [0.1, 0.9]]])
    dnn, labels = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    s = surrogate.scores(dnn, probas, labels, np.array([0.5, 0.5]), ["a", "b"])
    # layer a predicts 0, 0, 1, 0; layer b 1, 0, 1, 1; combined (class 0: 0.55, 0.75, 0.15, 0.35) 0, 0, 1, 1
    assert s == {"n": 4, "fidelity": 1.0, "accuracy": 0.75, "dnn_accuracy": 0.75,
                 "per_layer": {"a": {"fidelity": 0.75, "accuracy": 0.5}, "b": {"fidelity": 0.75, "accuracy": 0.5}}}
    assert surrogate.scores(dnn, probas, None, np.array([1.0, 0.0]), ["a", "b"])["accuracy"] is None
