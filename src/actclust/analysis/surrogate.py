"""The surrogate model: per-layer cluster posteriors combined over layers.

For layer ``l`` and cluster ``c`` the posterior is the smoothed distribution of the targets
(the DNN's predicted classes, or the true labels) of the training samples in ``c``. An input's
layer distribution is its cluster assignment times the posteriors; the surrogate's distribution
is the weighted sum of the layer distributions divided by the **sum of the weights** (the
official implementation divides by the number of layers, which is wrong for unequal weights).
"""

from __future__ import annotations

import numpy as np

__all__ = ["fit_posteriors", "combine", "learn_weights", "fidelity_weights", "scores"]


def fit_posteriors(assign: np.ndarray, targets: np.ndarray, n_classes: int, smoothing: float,
                   n_clusters: int | None = None) -> np.ndarray:
    """Posteriors ``(n_clusters, n_classes)`` from assignments and targets ``(n,)``.

    ``assign`` is ``(n, n_clusters)`` (soft), or ``(n,)`` cluster ids for hard assignment (then
    ``n_clusters`` is needed; memory ``O(n)`` instead of ``O(n x n_clusters)``). Counts are
    smoothed toward the layer's overall target distribution with weight ``smoothing`` (in
    samples), so an empty or tiny cluster falls back to the class prior instead of to an
    arbitrary class.
    """
    targets = np.asarray(targets)
    if assign.ndim == 1:
        counts = np.bincount(assign.astype(np.int64) * n_classes + targets,
                             minlength=n_clusters * n_classes).reshape(n_clusters, n_classes).astype(np.float64)
    else:
        onehot = np.zeros((len(targets), n_classes), dtype=np.float64)
        onehot[np.arange(len(targets)), targets] = 1.0
        counts = assign.astype(np.float64).T @ onehot
    prior = np.bincount(targets, minlength=n_classes) / max(len(targets), 1)
    post = (counts + smoothing * prior) / (counts.sum(1, keepdims=True) + smoothing)
    empty = counts.sum(1) == 0
    post[empty] = prior  # also covers smoothing == 0
    return post.astype(np.float32)


def layer_proba(assign: np.ndarray, posteriors: np.ndarray) -> np.ndarray:
    """A layer's class distributions ``(n, C)`` from soft ``(n, k)`` or hard ``(n,)`` assignments (a product of few
    columns: NumPy's own loop, not BLAS, as :func:`combine`)."""
    return posteriors[assign] if assign.ndim == 1 else np.einsum("nk,kc->nc", assign, posteriors)


def combine(layer_probas: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean ``(n, C)`` of layer distributions ``(L, n, C)``, normalised by ``sum(weights)``.

    By NumPy's own loop (``einsum``), not BLAS: after a BLAS product NumPy's OpenBLAS threads keep spinning for
    a while, and on a machine of few cores the faiss searches that follow in ``explain`` lost that core (its
    first search took 0.08 s instead of 0.04; ``explain`` 1.99x a forward pass instead of 2.04x, taking turns
    in one process). These products have a few columns: the loop costs about a millisecond."""
    w = np.asarray(weights, dtype=np.float64)
    return (np.einsum("l,lnc->nc", w, layer_probas) / w.sum()).astype(np.float32)


def learn_weights(layer_probas: np.ndarray, targets: np.ndarray, n_iter: int = 300, tol: float = 1e-7) -> np.ndarray:
    """Layer weights (summing to 1) that maximise the held-out likelihood of ``targets``.

    The surrogate is a mixture of the layer distributions, so the weights that maximise
    ``sum_i log sum_l w_l P_l(target_i | x_i)`` are found by the EM update for mixture weights;
    the objective is concave in ``w``, so this reaches the global optimum. Likelihood of the
    DNN's predictions is the smooth stand-in for fidelity.
    """
    p = layer_probas[:, np.arange(len(targets)), targets].astype(np.float64).T  # (n, L)
    p = np.maximum(p, 1e-12)
    w = np.full(p.shape[1], 1.0 / p.shape[1])
    prev = -np.inf
    for _ in range(n_iter):
        mix = p @ w
        ll = np.log(mix).mean()
        w = w * (p / mix[:, None]).mean(0)
        w /= w.sum()
        if ll - prev < tol:
            break
        prev = ll
    return w


def fidelity_weights(layer_probas: np.ndarray, targets: np.ndarray, n_candidates: int = 256,
                     random_state: int = 0) -> np.ndarray:
    """Layer weights (summing to 1) of highest held-out agreement with ``targets``.

    Agreement (fidelity) is piecewise constant in the weights, so it is searched directly over
    candidates: equal weights, each single layer, the likelihood optimum of
    :func:`learn_weights`, and ``n_candidates`` random points of the simplex. Ties go to the
    earliest candidate, so equal weights win unless something is strictly better.
    """
    n_layers = layer_probas.shape[0]
    rng = np.random.default_rng(random_state)
    candidates = np.vstack([
        np.full(n_layers, 1.0 / n_layers), np.eye(n_layers), learn_weights(layer_probas, targets),
        rng.dirichlet(np.ones(n_layers), size=n_candidates),
    ])
    n_layers, n, n_classes = layer_probas.shape
    flat = layer_probas.reshape(n_layers, n * n_classes).astype(np.float32)
    scores = []
    for chunk in np.array_split(candidates.astype(np.float32), max(1, len(candidates) // 64)):
        mixed = (chunk @ flat).reshape(len(chunk), n, n_classes)
        scores.append((mixed.argmax(2) == targets[None]).mean(1))
    return candidates[int(np.concatenate(scores).argmax())].astype(np.float64)


def scores(dnn, probas, labels, weights, layers) -> dict:
    """Fidelity and accuracy, combined and per layer, from layer distributions ``(L, n, C)``."""
    return scores_from_predictions(dnn, combine(probas, weights).argmax(1), probas.argmax(2), labels, layers)


def scores_from_predictions(dnn, combined, per_layer, labels, layers) -> dict:
    """:func:`scores` from the surrogate's predicted classes: combined ``(n,)``, per layer ``(L, n)``."""
    def rates(pred):
        return {"fidelity": float((pred == dnn).mean()),
                "accuracy": None if labels is None else float((pred == labels).mean())}

    result = {"n": int(len(dnn)), **rates(combined),
              "dnn_accuracy": None if labels is None else float((dnn == labels).mean())}
    result["per_layer"] = {l: rates(per_layer[i]) for i, l in enumerate(layers)}
    return result
