"""Published trust and out-of-distribution scores, as baselines for :mod:`actclust.analysis.trust`.

Each takes features or logits the caller computed (NumPy arrays; no model, no torch), and returns
a score where **higher means more trustworthy** (or more in-distribution), like actclust's own:

- :func:`max_softmax` (Hendrycks & Gimpel 2017): the largest softmax probability.
- :func:`energy` (Liu et al. 2020): ``T * logsumexp(logits / T)``, the negative free energy.
- :class:`Mahalanobis` (Lee et al. 2018, without input perturbation or layer ensembles): class
  means and one shared covariance of training features; minus the smallest squared Mahalanobis
  distance to a class mean.
- :class:`TrustScore` (Jiang et al. 2018) with the reference implementation's scoring: per class
  the alpha-high-density set of its training points, then the distance to the ``k``-th nearest
  point of the closest other class's set over that to the predicted class's set (``k=2`` in the
  authors' code and in alibi; the paper's text describes ``k=1``).

Deep k-nearest-neighbours credibility (Papernot & McDaniel 2018) is
:func:`actclust.analysis.trust.trust_signals` with ``layer_weights="equal"``.
"""

from __future__ import annotations

import numbers

import numpy as np

from ..exceptions import DataError, ParameterError

__all__ = ["max_softmax", "energy", "Mahalanobis", "TrustScore"]


def _logits(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise DataError(f"logits must be a 2-D array (n_samples, n_classes >= 2); got shape {z.shape}.")
    return z


def max_softmax(logits) -> np.ndarray:
    """Largest softmax probability of each row of ``logits`` ``(n, C)``."""
    z = _logits(logits)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True)).max(1)


def energy(logits, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy ``T * logsumexp(logits / T)`` of each row (higher = in-distribution)."""
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) or not temperature > 0:
        raise ParameterError(f"The 'temperature' parameter of energy must be a float > 0. Got {temperature!r} instead.")
    z = _logits(logits) / temperature
    m = z.max(1)
    return temperature * (m + np.log(np.exp(z - m[:, None]).sum(1)))


def _features(X, name: str, d=None) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or len(X) == 0:
        raise DataError(f"{name} must be a non-empty 2-D array (n_samples, n_features); got shape {X.shape}.")
    if d is not None and X.shape[1] != d:
        raise DataError(f"{name} has {X.shape[1]} features but the baseline was fitted on {d}.")
    if not np.isfinite(X).all():
        raise DataError(f"{name} has NaN or infinite values.")
    return X


def _labels(y, n: int, name: str = "y") -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and y.min() < 0):
        raise DataError(f"{name} must be {n} non-negative integer class ids; got shape {y.shape}, dtype {y.dtype}.")
    return y.astype(np.int64)


class Mahalanobis:
    """Lee et al. (2018): class-conditional Gaussians with a shared covariance on features.

    ``fit(X, y)`` estimates the class means and the pooled covariance (its pseudo-inverse is
    used, so collinear features are fine); ``score(X)`` is ``-min_c (x - mu_c)^T S^-1 (x - mu_c)``.
    """

    def fit(self, X, y) -> "Mahalanobis":
        X = _features(X, "X").astype(np.float64)
        y = _labels(y, len(X))
        classes = np.unique(y)
        self.means_ = np.stack([X[y == c].mean(0) for c in classes])
        self.classes_ = classes
        centred = X - self.means_[np.searchsorted(classes, y)]
        self.precision_ = np.linalg.pinv(centred.T @ centred / len(X), hermitian=True)
        return self

    def distances(self, X) -> np.ndarray:
        """Squared Mahalanobis distance of each row to each class mean ``(n, n_classes)``."""
        X = _features(X, "X", self.means_.shape[1]).astype(np.float64)
        out = np.empty((len(X), len(self.means_)))
        for j, m in enumerate(self.means_):
            c = X - m
            out[:, j] = np.einsum("ij,jk,ik->i", c, self.precision_, c)
        return np.maximum(out, 0)

    def score(self, X) -> np.ndarray:
        return -self.distances(X).min(1)


class TrustScore:
    """Jiang et al. (2018), "To Trust Or Not To Trust A Classifier", scored as in their code.

    Parameters
    ----------
    k : int, default=2
        The score uses the distance to the ``k``-th nearest point of each class's set.
    alpha : float in [0, 1), default=0.0
        Share of each class's points removed as low-density: those whose distance to their
        ``k_filter``-th nearest point of the class (the point itself counted first, as in the
        reference code) is above the class's ``1 - alpha`` quantile.
    k_filter : int, default=10
        Neighbours defining the density radius of the filtering.

    Notes
    -----
    ``fit(X, y)`` builds the sets; ``score(X, pred)`` returns, per row, the distance to the
    closest class other than ``pred`` over the distance to class ``pred`` (``1e-12`` added to
    the denominator, as in the reference code).
    """

    def __init__(self, k: int = 2, alpha: float = 0.0, k_filter: int = 10):
        for name, v in (("k", k), ("k_filter", k_filter)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ParameterError(f"The '{name}' parameter of TrustScore must be an int >= 1. Got {v!r} instead.")
        if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not 0 <= alpha < 1:
            raise ParameterError(f"The 'alpha' parameter of TrustScore must be a float in [0, 1). Got {alpha!r} instead.")
        self.k, self.alpha, self.k_filter = int(k), float(alpha), int(k_filter)

    def fit(self, X, y) -> "TrustScore":
        import faiss

        X = np.ascontiguousarray(_features(X, "X"), dtype=np.float32)
        y = _labels(y, len(X))
        self.n_classes_ = int(y.max()) + 1
        self.indexes_ = []
        for c in range(self.n_classes_):
            members = X[y == c]
            if len(members) < self.k:
                raise DataError(f"class {c} has {len(members)} training points; TrustScore(k={self.k}) needs at least "
                                f"{self.k} per class.")
            if self.alpha > 0:
                depth = min(self.k_filter, len(members))
                index = faiss.IndexFlatL2(X.shape[1])
                index.add(members)
                radius = index.search(members, depth)[0][:, -1]
                members = members[radius <= np.quantile(radius, 1 - self.alpha)]
                if len(members) < self.k:
                    raise DataError(f"alpha={self.alpha} leaves class {c} with {len(members)} points; TrustScore("
                                    f"k={self.k}) needs at least {self.k}. Lower alpha.")
            index = faiss.IndexFlatL2(X.shape[1])
            index.add(members)
            self.indexes_.append(index)
        return self

    def class_distances(self, X) -> np.ndarray:
        """Distance of each row to the ``k``-th nearest point of each class's set ``(n, n_classes)``."""
        X = np.ascontiguousarray(_features(X, "X", self.indexes_[0].d), dtype=np.float32)
        d = np.stack([ix.search(X, self.k)[0][:, -1] for ix in self.indexes_], 1)
        return np.sqrt(np.maximum(d.astype(np.float64), 0))

    def score(self, X, pred) -> np.ndarray:
        d = self.class_distances(X)
        pred = _labels(pred, len(d), "pred")
        if pred.max(initial=0) >= self.n_classes_:
            raise DataError(f"pred holds class {pred.max()} but TrustScore was fitted on {self.n_classes_} classes.")
        rows = np.arange(len(d))
        d_pred = d[rows, pred].copy()
        d[rows, pred] = np.inf
        return d.min(1) / (d_pred + 1e-12)
