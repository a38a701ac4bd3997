"""Similar training samples: exact nearest neighbours over the stored per-layer training vectors.

The distance between an input ``x`` and a training sample ``t`` combines the layers::

    D(x, t) = sum_l  w_l * ||v_l(x) - v_l(t)||^2 / s_l

where ``v_l`` is layer ``l``'s reduced (and, by default, L2-normalised) vector and ``s_l`` is the
mean squared distance between two training samples in that layer (``2 * trace(cov)``, exact).
After this scaling a distance of 1 in any layer means "as far apart as two typical training
samples", so layers of different width and spread are comparable and ``w`` alone says how much
each layer counts. The search is exact: faiss over the concatenation of
``sqrt(w_l / s_l) * v_l``, whose squared Euclidean distance is ``D``.

Weight presets, for ``L`` layers at relative depth ``t_i = i / (L - 1)`` (0 for the first):
``"equal"``: ``w_i = 1``; ``"low"``: ``w_i = 10 ** -t_i`` (the first layer counts ten times the
last: looks alike); ``"high"``: ``w_i = 10 ** t_i`` (the last layer counts ten times the first:
means alike). Weights are normalised to sum to 1.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np
from tqdm.auto import tqdm

from .exceptions import ParameterError

if TYPE_CHECKING:  # the analyses read a fitted state and a query pass; no import at run time
    from .state import FittedState, Query

__all__ = ["Neighbours", "layer_weights", "check_args", "search", "WEIGHT_PRESETS"]

WEIGHT_PRESETS = ("equal", "low", "high")
_QUERY_CHUNK = 4096
_GATHER_FLOATS = 1 << 23  # neighbours' vectors gathered per chunk to split distances by layer
_CACHE_SIZE = 3


@dataclass
class Neighbours:
    """The ``k`` most similar training samples of each of ``n`` inputs.

    Attributes
    ----------
    indices : ndarray of shape (n, k)
        Positions in the training data ``fit`` saw, nearest first.
    distances : ndarray of shape (n, k)
        Combined scaled squared distances ``D`` (see :mod:`actclust.retrieval`).
    layer_shares : ndarray of shape (n, k, n_layers)
        Each layer's share of each distance (rows sum to 1; 0 where the distance is 0).
    weights : ndarray of shape (n_layers,)
        The layer weights used, summing to 1.
    """

    indices: np.ndarray
    distances: np.ndarray
    layer_shares: np.ndarray
    weights: np.ndarray


def layer_weights(weights, layers: list) -> np.ndarray:
    """Resolve a preset name, list or dict into non-negative weights summing to 1."""
    n = len(layers)
    if isinstance(weights, str):
        if weights not in WEIGHT_PRESETS:
            raise ParameterError(f"weights must be one of {list(WEIGHT_PRESETS)}, a list or a dict of per-layer "
                             f"weights. Got {weights!r} instead.")
        depth = np.arange(n) / max(n - 1, 1)
        w = {"equal": np.ones(n), "low": 10.0 ** -depth, "high": 10.0 ** depth}[weights]
    else:
        if isinstance(weights, Mapping):
            unknown = [k for k in weights if k not in layers]
            if unknown:
                raise ParameterError(f"weights name layers that were not fitted: {unknown}; fitted layers are {layers}.")
            values = [weights.get(l, 0.0) for l in layers]
        else:
            values = list(weights)
        if len(values) != n or not all(isinstance(v, numbers.Real) for v in values):
            raise ParameterError(f"weights must give one number per layer ({n}: {layers}). Got {weights!r} instead.")
        w = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            raise ParameterError(f"weights must be finite, non-negative and not all zero. Got {weights!r} instead.")
    return w / w.sum()


def layer_scales(train_vectors: dict) -> dict:
    """Mean squared distance between two training samples, per layer: ``2 * sum of variances``."""
    return {l: max(2.0 * float(v.astype(np.float64).var(0).sum()), 1e-12) for l, v in train_vectors.items()}


class Index:
    """Exact faiss search over the weighted, scaled concatenation of the training vectors."""

    def __init__(self, train_vectors: dict, weights: np.ndarray, scales: dict):
        import faiss

        self.layers = list(train_vectors)
        self.factors = np.sqrt(weights / np.array([scales[l] for l in self.layers])).astype(np.float32)
        self.train_vectors = train_vectors
        data = self._stack(train_vectors)
        self.index = faiss.IndexFlatL2(data.shape[1])
        self.index.add(data)

    def _stack(self, vectors: dict) -> np.ndarray:
        return np.ascontiguousarray(np.hstack([
            vectors[l].astype(np.float32, copy=False) * f for l, f in zip(self.layers, self.factors)
        ]))

    def search(self, vectors: dict, k: int, progress: bool = False):
        n = len(next(iter(vectors.values())))
        idx = np.empty((n, k), dtype=np.int64)
        dist = np.empty((n, k), dtype=np.float32)
        shares = np.empty((n, k, len(self.layers)), dtype=np.float32)
        width = max(v.shape[1] for v in self.train_vectors.values())
        chunk = max(1, min(_QUERY_CHUNK, _GATHER_FLOATS // (k * width)))
        starts = tqdm(range(0, n, chunk), desc="searching similar samples", disable=not progress or n <= chunk,
                      leave=False)
        for start in starts:  # memory O(chunk x k x d), never n x n_train
            part = {l: v[start:start + chunk] for l, v in vectors.items()}
            d, i = self.index.search(self._stack(part), k)
            idx[start:start + len(d)], dist[start:start + len(d)] = i, np.maximum(d, 0.0)
            per = np.stack([
                ((part[l][:, None, :] - self.train_vectors[l][i]) ** 2).sum(2) * f * f
                for l, f in zip(self.layers, self.factors)
            ], 2)
            total = per.sum(2, keepdims=True)
            shares[start:start + len(d)] = np.divide(per, total, out=np.zeros_like(per), where=total > 0)
        return idx, dist, shares


def check_args(state: FittedState, k, weights) -> tuple:
    """``(k, weights)`` checked against the fitted state: an int k in 1..n_train, weights resolved."""
    w = layer_weights(weights, state.layers)
    n_train = state.n_samples
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= n_train:
        raise ParameterError(f"k must be an int between 1 and the {n_train} training samples. Got {k!r} instead.")
    return int(k), w


def search(state: FittedState, query: Query, k: int, weights: np.ndarray, *, progress: bool = False) -> Neighbours:
    """The ``k`` training samples nearest each input of ``query`` (a pass with ``vectors=True``),
    under per-layer ``weights`` (from :func:`check_args`); see :meth:`ActivationClustering.similar`."""
    if query.vectors is None:
        raise ParameterError("similar-sample search needs the reduced vectors: make the query with vectors=True.")
    idx, dist, shares = _index(state, weights).search(query.vectors, k, progress)
    return Neighbours(indices=idx, distances=dist, layer_shares=shares, weights=weights)


def _index(state: FittedState, w: np.ndarray) -> Index:
    """Indices are cached per weights with the fitted state (a few, most recent kept)."""
    cache = state.cache.setdefault("retrieval", {})
    if "scales" not in cache:
        cache["scales"] = layer_scales(state.train_vectors)
    key = tuple(np.round(w, 12))
    indices = cache.setdefault("indices", {})
    if key not in indices:
        while len(indices) >= _CACHE_SIZE:
            indices.pop(next(iter(indices)))
        indices[key] = Index(state.train_vectors, w, cache["scales"])
    return indices[key]
