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

from ..exceptions import ParameterError
from ..store.vectors import iter_rows, release, take

if TYPE_CHECKING:  # the analyses read a fitted state and a query pass; no import at run time
    from ..state import FittedState, Query

__all__ = ["Neighbours", "layer_weights", "check_args", "search", "search_by_class", "check_search", "resolve_search",
           "WEIGHT_PRESETS", "SEARCH_NAMES", "AUTO_EXACT_FLOATS", "layer_neighbours", "layer_stats", "layer_scales"]

WEIGHT_PRESETS = ("equal", "low", "high")
SEARCH_NAMES = ("auto", "exact", "approximate")
#: ``search="auto"`` searches exactly while ``n_train x width`` is below this: about 15,000 training
#: samples of 266 floats, where exact and approximate search cost the same per query on Fashion-MNIST
#: (5,000 / 15,000 / 60,000 samples: approximate / exact time 1.6 / 0.9 / 0.55).
AUTO_EXACT_FLOATS = 4_000_000
_CALIBRATION_QUERIES = 300
_TARGET_RECALL = 0.97
_QUERY_CHUNK = 4096
_GATHER_FLOATS = 1 << 23  # neighbours' vectors gathered per chunk to split distances by layer
_ROWS = 8192  # training rows read per chunk by the exact search
_RERANKS = (8, 16, 32, 64)  # candidates re-ranked exactly: k + (rerank - 1) * k for k <= 10
_MAX_LISTS = 1024  # 4 sqrt(n) lists up to n = 65,536; capped so training and filling stay minutes at 1M rows
_COARSE_ITERATIONS = 10  # k-means iterations of the lists' centres (faiss' default 25)
_PAD = 8  # index rows are zero-padded to a multiple of this many values


@dataclass
class Neighbours:
    """The ``k`` most similar training samples of each of ``n`` inputs.

    Attributes
    ----------
    indices : ndarray of shape (n, k)
        Positions in the training data ``fit`` saw, nearest first.
    distances : ndarray of shape (n, k)
        Combined scaled squared distances ``D`` (see :mod:`actclust.analysis.retrieval`).
    layer_shares : ndarray of shape (n, k, n_layers)
        Each layer's share of each distance (rows sum to 1; 0 where the distance is 0).
    weights : ndarray of shape (n_layers,)
        The layer weights used, summing to 1.
    """

    indices: np.ndarray
    distances: np.ndarray
    layer_shares: np.ndarray
    weights: np.ndarray

    def _repr_html_(self) -> str:
        """A table (or, with training inputs, pictures) for notebooks: :mod:`actclust.views.notebook`."""
        from ..views.notebook import neighbours_html

        return neighbours_html(self)

    def show(self, train=None, **display):
        """Drawn with the training inputs ``train`` (and :func:`actclust.report`'s display options)."""
        from ..views.notebook import HTML, show_neighbours

        return HTML(show_neighbours(self, train=train, **display))


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


def layer_stats(train_vectors: Mapping) -> dict:
    """Per layer ``(mean vector, scale)``: the scale is the mean squared distance between two
    training samples, ``2 * sum of variances`` (streamed in float64 over the stored vectors)."""
    out = {}
    for l, v in train_vectors.items():
        total, total_sq = np.zeros(v.shape[1]), np.zeros(v.shape[1])
        for _, x in iter_rows(v, _ROWS):
            x = x.astype(np.float64)
            total += x.sum(0)
            total_sq += (x * x).sum(0)
        n = max(len(v), 1)
        out[l] = (total / n, max(2.0 * float((total_sq / n - (total / n) ** 2).clip(0).sum()), 1e-12))
    return out


def layer_scales(train_vectors: Mapping) -> dict:
    """The scale of :func:`layer_stats` alone, per layer."""
    return {l: s for l, (_, s) in layer_stats(train_vectors).items()}


class Index:
    """Exact search: one pass over the stored vectors per call, scoring every row for any weights.

    Nothing is copied: each layer's rows are read from the store in chunks (memory-mapped when
    the store is on disk), centred on the layer's mean ``m_l`` (distances do not change; the
    inner products and norms below become small, so float32 and compressed codes resolve
    neighbours), and scored by ``sum_l (w_l / s_l) (2 u_l(x) . u_l(t) - ||u_l(t)||^2)`` with
    ``u = v - m``, the part of ``-D(x, t)`` that depends on ``t``; only the squared norms (``n``
    floats per layer) are kept, and layers of weight 0 are not read. The top ``k`` are then
    re-ranked by their distances from the layer terms.
    """

    def __init__(self, train_vectors: Mapping, stats: dict, progress: bool = False):
        self.layers = list(train_vectors)
        self.train_vectors = train_vectors
        self.means = {l: stats[l][0].astype(np.float32) for l in self.layers}
        self.scales = np.array([stats[l][1] for l in self.layers], dtype=np.float64)
        self.n = len(train_vectors[self.layers[0]])
        self.d = None  # the padded width of full rows, where an index stores them (ApproximateIndex)
        self.sq_norms = {}
        for l in tqdm(self.layers, desc="indexing training vectors", disable=not progress, leave=False):
            parts = [np.einsum("ij,ij->i", x - self.means[l], x - self.means[l])
                     for _, x in iter_rows(train_vectors[l], _ROWS)]
            self.sq_norms[l] = np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def n_candidates(self, k: int, weights=None) -> int:
        return k

    def candidates(self, part: dict, k: int, weights: list, exclude=None) -> list:
        """Exact top ``k`` ids ``(b, k)`` of the queries ``part`` for each weight vector in ``weights``.

        The store is read once per call, ``_ROWS`` rows at a time: each chunk's rows of the layers
        with a weight become a temporary faiss ``IndexFlatIP`` that every query searches, and the
        chunks' results are merged (faiss ``ResultHeap``).
        """
        import faiss

        b, k = len(next(iter(part.values()))), min(k, self.n)
        used = [l for j, l in enumerate(self.layers) if any(w[j] > 0 for w in weights)]
        heaps = [faiss.ResultHeap(b, k, keep_max=True) for _ in weights]
        queries = [self._query(part, w, used) for w in weights]
        for start in range(0, self.n, _ROWS):
            stop = min(start + _ROWS, self.n)
            index = faiss.IndexFlatIP(queries[0].shape[1])
            index.add(self._rows(slice(start, stop), used))
            params = None
            if exclude is not None and exclude[start:stop].any():
                left_out = faiss.IDSelectorBatch(np.flatnonzero(exclude[start:stop]).astype(np.int64))
                params = faiss.SearchParameters(sel=faiss.IDSelectorNot(left_out))
            for heap, q in zip(heaps, queries):
                d, i = index.search(q, min(k, stop - start), params=params)
                heap.add_result(d, np.where(i >= 0, i + start, -1))
        for heap in heaps:
            heap.finalize()
        return [heap.I for heap in heaps]

    def _rows(self, which, layers=None) -> np.ndarray:
        """Index rows ``[u_l / sqrt(s_l) ..., ||u_l||^2 / s_l ...]`` of some training rows (all layers:
        zero-padded to ``self.d`` columns)."""
        layers = self.layers if layers is None else layers
        scales = [self.scales[self.layers.index(l)] for l in layers]
        blocks = [(_take(self.train_vectors[l], which) - self.means[l]) / np.float32(np.sqrt(s))
                  for l, s in zip(layers, scales)]
        norms = [(self.sq_norms[l][which] / np.float32(s))[:, None] for l, s in zip(layers, scales)]
        _release(self.train_vectors)
        return self._pad(np.hstack(blocks + norms), layers)

    def _query(self, part: dict, weights, layers=None) -> np.ndarray:
        """The inner-product query of ``part`` for ``weights`` (``C(x)`` is left out: it ranks nothing)."""
        layers = self.layers if layers is None else layers
        b = len(next(iter(part.values())))
        w = [weights[self.layers.index(l)] for l in layers]
        scales = [self.scales[self.layers.index(l)] for l in layers]
        q = [(part[l] - self.means[l]) * np.float32(2 * wl / np.sqrt(s)) if wl > 0 else
             np.zeros((b, self.train_vectors[l].shape[1]), np.float32) for l, wl, s in zip(layers, w, scales)]
        return self._pad(np.hstack(q + [np.tile(-np.asarray(w, np.float32), (b, 1))]), layers)

    def _pad(self, rows: np.ndarray, layers) -> np.ndarray:
        width = self.d if self.d is not None and len(layers) == len(self.layers) else rows.shape[1]
        return np.ascontiguousarray(np.hstack([rows, np.zeros((len(rows), width - rows.shape[1]), np.float32)]))

    def search(self, vectors: dict, k: int, weights: np.ndarray, progress: bool = False, exclude=None):
        """``(ids, distances, layer shares)`` of the ``k`` nearest training rows of each query."""
        n = len(next(iter(vectors.values())))
        k = min(k, self.n)
        idx = np.empty((n, k), dtype=np.int64)
        dist = np.empty((n, k), dtype=np.float32)
        shares = np.empty((n, k, len(self.layers)), dtype=np.float32)
        width = max(v.shape[1] for v in self.train_vectors.values())
        chunk = max(1, min(_QUERY_CHUNK, _GATHER_FLOATS // (self.n_candidates(k, weights) * width)))
        factors = weights / self.scales
        starts = tqdm(range(0, n, chunk), desc="searching similar samples", disable=not progress or n <= chunk,
                      leave=False)
        for start in starts:  # memory O(chunk x candidates x d), never n x n_train
            part = {l: np.asarray(v[start:start + chunk], np.float32) for l, v in vectors.items()}  # layers of w > 0
            i = self.candidates(part, k, [weights], exclude)[0]
            i = np.where(i < 0, i.max(1, keepdims=True), i)  # an approximate search may find fewer
            # Distances from the layer terms: exact (no cancellation between large inner products
            # for near neighbours), split by layer at once; candidates re-ranked by them.
            per = np.stack([_sq_dist(part[l], take(self.train_vectors[l], i)) * np.float32(f)
                            if f > 0 else np.zeros(i.shape, np.float32) for l, f in zip(self.layers, factors)], 2)
            _release(self.train_vectors)
            order = np.argsort(per.sum(2), axis=1, kind="stable")[:, :k]
            i, per = np.take_along_axis(i, order, 1), np.take_along_axis(per, order[..., None], 1)
            total = per.sum(2, keepdims=True)
            idx[start:start + len(i)], dist[start:start + len(i)] = i, total[..., 0]
            shares[start:start + len(i)] = np.divide(per, total, out=np.zeros_like(per), where=total > 0)
        return idx, dist, shares


def _take(v, which) -> np.ndarray:
    """Rows of ``v`` by slice (read in order) or by index (gathered in blocks: :func:`take`)."""
    return np.asarray(v[which], np.float32) if isinstance(which, slice) else take(v, which)


def _sq_dist(q: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Squared distances ``(b, c)`` from each query ``(b, d)`` to its candidates' rows ``(b, c, d)``."""
    diff = rows  # a fresh float32 gather: subtracting in place saves a temporary
    diff -= q[:, None, :]
    return np.einsum("bcd,bcd->bc", diff, diff)


def _release(store) -> None:
    for v in store.values():
        release(v)


class ApproximateIndex(Index):
    """Approximate search: faiss IVF with 8-bit scalar codes, candidates re-ranked exactly.

    The index holds, per training row, the rows of :meth:`Index._rows` (``[u_l / sqrt(s_l) ...,
    ||u_l||^2 / s_l ...]``, centred) as one byte per value (faiss ``IndexIVFScalarQuantizer``,
    ``QT_8bit``: a quarter of float32) plus an 8-byte id, in ``nlist = 4 sqrt(n)`` lists (the low
    end of faiss' ``4..16 sqrt(n)``), at most ``_MAX_LISTS``; it is trained on at most
    ``max(39 nlist, 256 x 40)`` rows and filled by streaming the store. A query for weights ``w``
    is the inner-product query of :meth:`Index._query`. The ``n_candidates(k)`` best codes are
    re-ranked by their exact distances from the stored vectors. ``nprobe`` and the re-ranked share
    are calibrated per weight vector on first use: the fewest candidates, then the smallest power
    of two of lists probed, for which the exact top-10 of ``_CALIBRATION_QUERIES`` held-out
    training rows is found with recall >= ``_TARGET_RECALL`` after re-ranking (``recall`` keeps
    what was reached).
    """

    def __init__(self, train_vectors: Mapping, stats: dict, random_state: int = 0, progress: bool = False):
        import faiss

        super().__init__(train_vectors, stats, progress)
        n = self.n
        width = sum(v.shape[1] for v in train_vectors.values()) + len(self.layers)
        self.d = width + (-width % _PAD)
        self.nlist = int(max(1, min(round(4 * np.sqrt(n)), n // 39, _MAX_LISTS)))
        self.rng = np.random.default_rng(random_state)
        train = np.sort(self.rng.choice(n, min(n, max(39 * self.nlist, 256 * 40)), replace=False))
        self.quantizer = faiss.IndexFlatIP(self.d)  # faiss keeps a raw pointer: it must outlive the index
        # 8-bit scalar codes (one byte per value, its range per dimension learned on the sample)
        self.index = faiss.IndexIVFScalarQuantizer(self.quantizer, self.d, self.nlist, faiss.ScalarQuantizer.QT_8bit,
                                                   faiss.METRIC_INNER_PRODUCT)
        self.index.cp.niter = _COARSE_ITERATIONS
        self.index.train(self._rows(train))
        for start in tqdm(range(0, n, _ROWS), desc="building the approximate index", disable=not progress,
                          leave=False):
            self.index.add(self._rows(slice(start, start + _ROWS)))
        self.held = np.sort(self.rng.choice(n, min(n, _CALIBRATION_QUERIES), replace=False))
        self.settings, self.recall = {}, {}  # per weight vector: (nprobe, rerank), its calibration recall

    def n_candidates(self, k: int, weights=None) -> int:
        rerank = _RERANKS[-1] if weights is None else self._settings(weights)[1]
        # calibrated on the 10 nearest; deeper searches (trust's 200) re-rank as many extra as 10 would
        return min(self.n, k + (rerank - 1) * k if k <= 10 else max(k, 10 * rerank))

    def candidates(self, part: dict, k: int, weights: list, exclude=None) -> list:
        import faiss

        out = []
        for w in weights:
            params = faiss.SearchParametersIVF(nprobe=self._settings(w)[0])
            if exclude is not None and exclude.any():
                params.sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.flatnonzero(exclude).astype(np.int64)))
            out.append(self.index.search(self._query(part, w), self.n_candidates(k, w), params=params)[1])
        return out

    def _settings(self, weights) -> tuple:
        """``(nprobe, rerank)`` for ``weights``: the cheapest reaching the target recall (calibrated once)."""
        key = tuple(np.round(np.asarray(weights, np.float64), 12))
        if key not in self.settings:
            w = np.asarray(weights, np.float64)
            queries = {l: take(self.train_vectors[l], self.held) for l in self.layers}
            k = min(11, self.n)  # each held-out row finds itself: it is left out of both sides
            truth = Index.candidates(self, queries, k, [w])[0]
            for rerank in _RERANKS:
                nprobe = 1
                while True:
                    self.settings[key] = (nprobe, rerank)
                    recall = _recall(self.search(queries, k, w)[0], truth, self.held)
                    if recall >= _TARGET_RECALL or nprobe >= self.nlist:
                        break
                    nprobe = min(2 * nprobe, self.nlist)
                if recall >= _TARGET_RECALL:
                    break
            self.recall[key] = recall
        return self.settings[key]


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
    index = _index(state, method, progress)
    part = {l: query.vectors[state.retrieval_key(l)] for l in state.layers}
    idx, dist, shares = index.search(part, k, weights, progress)
    return Neighbours(indices=idx, distances=dist, layer_shares=shares, weights=weights)


def search_by_class(state: FittedState, query: Query, classes: np.ndarray, k: int, weights: np.ndarray, *,
                    progress: bool = False) -> np.ndarray:
    """For input ``i`` and each class ``classes[i, j]``: the ``k`` training samples *of that class* nearest
    the input, by the distance of :func:`search` (an exact search within each class, not a filter
    of the overall nearest, which may hold no sample of a less likely class).

    A training sample's class is its label where ``fit`` had labels, else the DNN's prediction
    (as trust uses). Returns ids ``(n, m, k)``, nearest first, padded with -1 where a class has
    fewer than ``k`` training samples.
    """
    if query.vectors is None:
        raise ParameterError("similar-sample search needs the reduced vectors: make the query with vectors=True.")
    classes = np.asarray(classes)
    if classes.ndim != 2 or len(classes) != query.n:
        raise ParameterError(f"classes must have one row of classes per input, shape ({query.n}, m). "
                             f"Got shape {classes.shape} instead.")
    labels = state.train_labels if state.train_labels is not None else state.train_predictions
    index = _index(state, "exact", progress)  # a filtered approximate search can miss a small class altogether
    part = {l: np.asarray(query.vectors[state.retrieval_key(l)], np.float32) for l in state.layers}
    out = np.full(classes.shape + (k,), -1, dtype=np.int64)
    for c in np.unique(classes):
        members = labels == c
        rows, cols = np.nonzero(classes == c)
        found = min(k, int(members.sum()))
        if found == 0:
            continue
        idx, _, _ = index.search({l: v[rows] for l, v in part.items()}, found, weights, exclude=~members)
        out[rows, cols, :found] = idx
    return out


def layer_neighbours(state: FittedState, layer: str, vectors: np.ndarray, k: int, *, method: str = "auto",
                     exclude=None, progress: bool = False):
    """The ``k`` training rows nearest ``vectors`` in one layer alone (its clustering vectors), by
    ``method``, leaving out the rows where the boolean mask ``exclude`` is true: ``(ids (n, k),
    squared distances (n, k))``, nearest first. Each layer has its own index (built on first use)."""
    index = _index(state, method, progress, space=layer)
    idx, dist, _ = index.search({layer: vectors}, k, np.ones(1), exclude=exclude)
    return idx, dist.astype(np.float64) * index.scales[0]


def _index(state: FittedState, method: str, progress: bool = False, space: str = "retrieval") -> Index:
    """The exact or approximate index of a fitted state, built on first use and cached with it:
    over every layer's retrieval vectors (spatial summaries where stored) for ``space="retrieval"``,
    or over one layer's clustering vectors for ``space=layer``."""
    vectors = ({l: state.train_vectors[state.retrieval_key(l)] for l in state.layers} if space == "retrieval"
               else {space: state.train_vectors[state.check_layer(space)]})
    method = resolve_search(method, state.n_samples, sum(v.shape[1] for v in vectors.values()))
    cache = state.cache.setdefault("retrieval", {})
    if (space, "stats") not in cache:
        cache[space, "stats"] = layer_stats(vectors)
    if (space, method) not in cache:
        cache[space, method] = (Index(vectors, cache[space, "stats"], progress) if method == "exact"
                                else ApproximateIndex(vectors, cache[space, "stats"], state.random_state, progress))
    return cache[space, method]
