"""Similar training samples: exact nearest neighbours over the stored per-layer training vectors.

The distance between an input ``x`` and a training sample ``t`` combines the layers::

    D(x, t) = sum_l  w_l * ||v_l(x) - v_l(t)||^2 / s_l

where ``v_l`` is layer ``l``'s reduced (and, by default, L2-normalised) vector and ``s_l`` is the
mean squared distance between two training samples in that layer (``2 * trace(cov)``, exact).
After this scaling a distance of 1 in any layer means "as far apart as two typical training
samples", so layers of different width and spread are comparable and ``w`` alone says how much
each layer counts.

One exact index serves every weighting, so the training vectors are copied once, not once per
preset. With ``b_l = v_l(t) / sqrt(s_l)`` and ``n_l = ||b_l||^2``::

    D(x, t) = C(x) + sum_l w_l n_l - 2 sum_l (w_l / sqrt(s_l)) v_l(x) . b_l

where ``C(x) = sum_l w_l ||v_l(x)||^2 / s_l`` does not depend on ``t``. So the index holds the
rows ``[b_1 ... b_L, n_1 ... n_L]`` once (faiss ``IndexFlatIP``, maximum inner product), and a
query for weights ``w`` is ``[2 w_l v_l(x) / sqrt(s_l) ..., -w_1 ... -w_L]``: the largest inner
products are the smallest ``D``, for any ``w``, whether or not the vectors are unit length
(``benchmarks/explore_ann.py`` checks the identity and why the blocks are scaled by ``s_l``).

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

__all__ = ["Neighbours", "layer_weights", "check_args", "search", "check_search", "resolve_search", "WEIGHT_PRESETS",
           "SEARCH_NAMES", "AUTO_EXACT_FLOATS"]

WEIGHT_PRESETS = ("equal", "low", "high")
SEARCH_NAMES = ("auto", "exact", "approximate")
#: ``search="auto"`` searches exactly while ``n_train x width`` is below this: about 50,000 training
#: samples of 960 floats, where exact and IVF-fp16 search cost the same (benchmarks/explore_ann.py).
AUTO_EXACT_FLOATS = 48_000_000
_CALIBRATION_QUERIES = 300
_TARGET_RECALL = 0.97
_QUERY_CHUNK = 4096
_GATHER_FLOATS = 1 << 23  # neighbours' vectors gathered per chunk to split distances by layer


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
    """Exact maximum-inner-product search over one copy of the scaled training vectors, any weights."""

    def __init__(self, train_vectors: dict, scales: dict):
        import faiss

        data = self._prepare(train_vectors, scales)
        self.index = faiss.IndexFlatIP(data.shape[1])
        self.index.add(data)

    def _prepare(self, train_vectors: dict, scales: dict) -> np.ndarray:
        """Keep the layers, their scales and vectors; return the rows :meth:`_data` describes."""
        self.layers = list(train_vectors)
        self.inv_sqrt = 1.0 / np.sqrt(np.array([scales[l] for l in self.layers]))
        self.train_vectors = train_vectors
        return self._data()

    def _data(self) -> np.ndarray:
        """Rows ``[b_1 ... b_L, n_1 ... n_L]``, zero-padded to a multiple of 8 columns (faiss' fp16 codes)."""
        blocks = [self.train_vectors[l].astype(np.float32) * np.float32(f) for l, f in zip(self.layers, self.inv_sqrt)]
        norms = [np.einsum("ij,ij->i", b, b)[:, None] for b in blocks]
        width = sum(b.shape[1] for b in blocks) + len(blocks)
        pad = [np.zeros((len(blocks[0]), -width % 8), np.float32)]
        return np.ascontiguousarray(np.hstack(blocks + norms + pad))

    def _query(self, part: dict, weights: np.ndarray) -> np.ndarray:
        """The inner-product query of ``part`` for ``weights`` (``C(x)`` is left out: it ranks nothing)."""
        q = [part[l].astype(np.float32) for l in self.layers]
        query = np.hstack([v * np.float32(2 * w * f) for v, w, f in zip(q, weights, self.inv_sqrt)]
                          + [np.tile(-weights.astype(np.float32), (len(q[0]), 1))])
        query = np.hstack([query, np.zeros((len(query), self.index.d - query.shape[1]), np.float32)])
        return np.ascontiguousarray(query)

    def search(self, vectors: dict, k: int, weights: np.ndarray, progress: bool = False):
        n = len(next(iter(vectors.values())))
        idx = np.empty((n, k), dtype=np.int64)
        dist = np.empty((n, k), dtype=np.float32)
        shares = np.empty((n, k, len(self.layers)), dtype=np.float32)
        width = max(v.shape[1] for v in self.train_vectors.values())
        chunk = max(1, min(_QUERY_CHUNK, _GATHER_FLOATS // (k * width)))
        factors = weights * self.inv_sqrt ** 2
        starts = tqdm(range(0, n, chunk), desc="searching similar samples", disable=not progress or n <= chunk,
                      leave=False)
        for start in starts:  # memory O(chunk x k x d), never n x n_train
            part = {l: v[start:start + chunk] for l, v in vectors.items()}
            _, i = self.index.search(self._query(part, weights), k)
            i = np.where(i < 0, i.max(1, keepdims=True), i)  # an approximate index may find fewer than k
            # Distances from the layer terms: exact (no cancellation of C(x) - score for near
            # neighbours), and split by layer at once; candidates re-ranked by them.
            per = np.stack([
                ((part[l][:, None, :] - self.train_vectors[l][i]) ** 2).sum(2) * f
                for l, f in zip(self.layers, factors)
            ], 2)
            order = np.argsort(per.sum(2), axis=1, kind="stable")
            i, per = np.take_along_axis(i, order, 1), np.take_along_axis(per, order[..., None], 1)
            total = per.sum(2, keepdims=True)
            idx[start:start + len(i)], dist[start:start + len(i)] = i, total[..., 0]
            shares[start:start + len(i)] = np.divide(per, total, out=np.zeros_like(per), where=total > 0)
        return idx, dist, shares


class ApproximateIndex(Index):
    """IVF over the same rows, stored as float16 (faiss ``IndexIVFScalarQuantizer``), inner product.

    ``nlist = 4 sqrt(n)`` lists, trained on at most ``39 nlist`` rows; ``nprobe`` is calibrated at
    build time: the smallest power of two for which the exact top-10 of ``_CALIBRATION_QUERIES``
    held-out training rows is found with recall >= ``_TARGET_RECALL`` under every weight preset
    (the probes needed depend on the data: 8 to 64 in ``benchmarks/explore_ann.py``). The
    candidates are re-ranked by their exact distances.
    """

    def __init__(self, train_vectors: dict, scales: dict, random_state: int = 0):
        import faiss

        data = self._prepare(train_vectors, scales)
        n, d = data.shape
        nlist = int(max(1, min(round(4 * np.sqrt(n)), n // 39)))
        rng = np.random.default_rng(random_state)
        sample = data[np.sort(rng.choice(n, min(n, 39 * nlist), replace=False))]
        quantizer = faiss.IndexFlatIP(d)
        self.index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                                   faiss.METRIC_INNER_PRODUCT)
        self.index.train(sample)
        self.index.add(data)
        self.quantizer = quantizer  # faiss keeps a raw pointer: the quantizer must outlive the index
        self.index.nprobe = self._calibrate(data, nlist, rng)

    def _calibrate(self, data: np.ndarray, nlist: int, rng) -> int:
        import faiss

        held = np.sort(rng.choice(len(data), min(len(data), _CALIBRATION_QUERIES), replace=False))
        queries = {l: self.train_vectors[l][held] for l in self.layers}
        exact = faiss.IndexFlatIP(data.shape[1])
        exact.add(data)
        k = min(11, len(data))  # each held-out row finds itself: it is left out of both sides
        truth = {p: exact.search(self._query(queries, layer_weights(p, self.layers)), k)[1] for p in WEIGHT_PRESETS}
        del exact
        nprobe = 1
        while nprobe < nlist:
            self.index.nprobe = nprobe
            worst = min(_recall(self.index.search(self._query(queries, layer_weights(p, self.layers)), k)[1], t, held)
                        for p, t in truth.items())
            if worst >= _TARGET_RECALL:
                break
            nprobe *= 2
        return min(nprobe, nlist)


def _recall(found: np.ndarray, truth: np.ndarray, own: np.ndarray) -> float:
    """Mean share of each exact neighbour list found, each query's own row left out."""
    shares = []
    for a, b, o in zip(found, truth, own):
        b = set(b.tolist()) - {int(o)}
        shares.append(len((set(a.tolist()) - {int(o)}) & b) / max(len(b), 1))
    return float(np.mean(shares))


def check_search(search) -> str:
    """``search`` itself, if it names a search method."""
    if search not in SEARCH_NAMES:
        raise ParameterError(f"The 'search' parameter must be one of {list(SEARCH_NAMES)}. Got {search!r} instead.")
    return search


def resolve_search(search, n: int, width: int) -> str:
    """``"exact"`` or ``"approximate"`` for ``search`` (``"auto"``: exact below ``AUTO_EXACT_FLOATS``)."""
    if check_search(search) == "auto":
        return "exact" if n * width < AUTO_EXACT_FLOATS else "approximate"
    return search


def check_args(state: FittedState, k, weights) -> tuple:
    """``(k, weights)`` checked against the fitted state: an int k in 1..n_train, weights resolved."""
    w = layer_weights(weights, state.layers)
    n_train = state.n_samples
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= n_train:
        raise ParameterError(f"k must be an int between 1 and the {n_train} training samples. Got {k!r} instead.")
    return int(k), w


def search(state: FittedState, query: Query, k: int, weights: np.ndarray, *, method: str = "auto",
           progress: bool = False) -> Neighbours:
    """The ``k`` training samples nearest each input of ``query`` (a pass with ``vectors=True``),
    under per-layer ``weights`` (from :func:`check_args`), by ``method`` (``"exact"``,
    ``"approximate"`` or ``"auto"``); see :meth:`ActivationClustering.similar`."""
    if query.vectors is None:
        raise ParameterError("similar-sample search needs the reduced vectors: make the query with vectors=True.")
    width = sum(v.shape[1] for v in state.train_vectors.values())
    method = resolve_search(method, state.n_samples, width)
    idx, dist, shares = _index(state, method).search(query.vectors, k, weights, progress)
    return Neighbours(indices=idx, distances=dist, layer_shares=shares, weights=weights)


def _index(state: FittedState, method: str) -> Index:
    """The exact or approximate index of a fitted state, built on first use and cached with it."""
    cache = state.cache.setdefault("retrieval", {})
    if "scales" not in cache:
        cache["scales"] = layer_scales(state.train_vectors)
    if method not in cache:
        cache[method] = (Index(state.train_vectors, cache["scales"]) if method == "exact"
                         else ApproximateIndex(state.train_vectors, cache["scales"], state.random_state))
    return cache[method]
