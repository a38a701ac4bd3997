"""Search indexes over the stored training vectors: exact (streamed) and approximate (faiss IVF).

Both search the weighted distance of :mod:`actclust.analysis.retrieval` through one inner product:
a training row is ``[u_1 / sqrt(s_1) ... u_L / sqrt(s_L), ||u_1||^2 / s_1 ... ||u_L||^2 / s_L]`` (``u_l``
the layer's vector centred on its mean, ``s_l`` its scale), zero-padded to a multiple of 8 values,
and the query for weights ``w`` is ``[2 w_l u_l(x) / sqrt(s_l) ..., -w_1 ... -w_L]``: the largest inner
products are the smallest distances, for any weights, so one index serves every weighting.

:class:`Index` (exact) reads the store once per call in chunks; its backend (:mod:`actclust.compute`)
scores each chunk (faiss on the host, matrix products on a device, where the rows may stay).
:class:`ApproximateIndex` is an IVF index whose lists are the Voronoi cells of k-means centres in the
equal-weight space (``[u_l / sqrt(s_l)]``): each row goes to its nearest centre, and a query probes the
lists whose centres are nearest *in its own weighting* (a centre is stored as a row, with its own
squared norms, so the inner product with the query ranks centres exactly). Codes are float32 (exact
scores) while the index holds at most :data:`FLAT_BYTES`, else 8-bit (a quarter), whose candidates are
re-ranked by exact distances from the store. Rows of several layers wider than :data:`PCA_WIDTH` keep only
each layer's :data:`PCA_DIMS` leading principal components (8-bit; the squared norms stay whole, so a score
is the weighted distance up to the product of the parts left out), and their candidates are re-ranked too.
Principal-component codes also get a 4-bit twin over the same lists (:mod:`actclust.analysis.fastscan`), scanned
first; its best candidates are scored again by the 8-bit codes.
Lists grow with ``n`` (:func:`n_lists`); past :data:`HNSW_LISTS` the centres are trained by faiss' two-level
k-means and the rows assigned to them through an HNSW graph; queries search the centres flat (one matrix product per batch) below
:data:`GRAPH_QUERY_LISTS` lists, past that through the graph. The probes (and the re-ranked share)
are calibrated per weighting on first use for recall@10 >= :data:`TARGET_RECALL`.

An approximate index is saved with a run (:func:`index_files`: the faiss file and its parameters,
attached to the run and checked by SHA-256 at load) and read back memory-mapped (:func:`load_index`).
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
from tqdm.auto import tqdm

from ..compute import HOST
from ..exceptions import InvalidSaveError
from ..store.vectors import chunk_rows, iter_rows, release, take
from .fastscan import SHORTLIST, FastScan, fits

__all__ = ["Index", "ApproximateIndex", "n_lists", "index_files", "load_index", "SavedFile", "FLAT_BYTES", "HNSW_LISTS",
           "GRAPH_QUERY_LISTS", "TARGET_RECALL", "EXACT_SHARE"]

_ROWS = 8192  # training rows per chunk of the exact search
_PAD = 8  # index rows are zero-padded to a multiple of this many values
_QUERY_CHUNK = 4096  # queries per chunk (exact search: with _ROWS training rows, 128 MiB of scores)
_QUERY_FLOATS = 1 << 25  # and at most this many query values per chunk (16,384 queries up to 2,048 values)
_GATHER_FLOATS = 1 << 23  # neighbours' vectors gathered per chunk to split distances by layer
_CALIBRATION_QUERIES = 300
#: Recall@10 (after re-ranking) each weighting's probes are calibrated for.
TARGET_RECALL = 0.97
_RERANKS = (2, 3, 4, 8, 16, 32, 64)  # 8-bit codes: candidates re-ranked exactly, k + (rerank - 1) * k for k <= 10
#: An approximate index keeps float32 codes (exact scores, nothing re-ranked) while they take at most this.
FLAT_BYTES = 1 << 30
#: Rows of several layers wider than this are searched through each layer's :data:`PCA_DIMS` leading principal
#: components (8-bit codes; a layer no wider is kept whole), their candidates re-ranked by exact distances from
#: the store. In ``benchmarks/search_scale.py`` (1,792 values per row, recall@10 >= 0.96) a query took
#: 0.39-0.42 / 0.25-0.27 / 0.30-0.31 ms at 100k rows and 0.79-0.93 / 0.42-0.52 / 0.51-0.66 ms at 1M
#: (low / high / equal weights, two runs), against 1.07 / 0.63 / 0.71 and 3.76 / 1.42 / 1.96 ms with
#: float32 or 8-bit codes of whole rows; the index files shrank from 1.75 GiB to 207 MiB at 1M.
PCA_WIDTH = 512
#: Principal components kept per projected layer (see :data:`PCA_WIDTH`).
PCA_DIMS = 64
_PCA_ROWS = 65536  # training rows the principal components are computed from
#: A layer up to this wide gets its axes from its covariance (``eigh``: 0.9 s at 2,048 values, 7 s at 4,096);
#: a wider one (a flattened map passed through whole) by randomized SVD of a sample of rows held at once,
#: at most :data:`_PCA_FLOATS` values (25,088 values: 2,674 rows, 2.8 s), where its covariance alone would
#: take gigabytes and ``eigh`` tens of minutes.
_EIGH_WIDTH = 2048
_PCA_FLOATS = 1 << 26
_TWIN_TRAIN = 16384  # training rows (at most about) whose residuals the 4-bit twin's codes are trained on
_BUILD_FLOATS = 1 << 26  # values of full-width rows read per chunk while the index is built (256 MiB)
#: Calibration's cost of a search: the bytes of codes scanned plus, per value of the candidates re-ranked (read
#: from the store, then a distance term), this many. Measured on ``benchmarks/search_scale.py``'s data at 1M rows
#: (64 components per layer, 200 bytes per row): 171 lists probed 0.58 ms per query with 20 candidates, 0.77
#: with 50; 85 lists 0.39 ms with 20 (1,792 values per candidate): about 3.5 ns per value re-ranked and 0.11 ns
#: per byte scanned.
_RERANK_COST = 32
#: With a 4-bit twin (:mod:`actclust.analysis.fastscan`): its scan costs a quarter of the 8-bit scan of the same
#: rows (0.14 s against 0.55 s, 1,000 queries probing 340 of 10,000 lists at 1M rows), and scoring the shortlist
#: again this many per byte of the 8-bit codes gathered (0.025 s for 1,000 x 120 rows of 200 bytes: 1 ns a byte).
_RESCORE_COST = 9
#: Calibration: past this many lists probed, a doubling that adds less recall than :data:`_PLATEAU` ends the
#: search for that many candidates (approximate scores: the candidates, not the lists, then limit the recall).
_PLATEAU_LISTS, _PLATEAU = 8, 0.005
#: ``search="auto"`` searches exactly where the calibrated probes of whole-row codes cover at least this share of
#: the lists (rows without structure the lists follow): an IVF scan then reads about as many values as the exact
#: search, which scores them by matrix products about 3.3x faster per value. On trust's searches of 4,096- and
#: 16,384-value layers of random features (20,000 rows; 52% and 59% of the lists probed), 500 inputs took
#: 1.8 s and 6.1 s exactly against 3.2 s and 12.0 s approximately.
EXACT_SHARE = 0.5
#: Calibration: where the fewest candidates fell short of the target from at least 1 / _SPREAD of the lists, one
#: search with the most candidates from every list decides whether any setting can reach it.
_SPREAD = 4
#: From this many lists on, the lists' centres are trained in two levels and rows assigned to them through an
#: HNSW graph.
HNSW_LISTS = 4096
#: From this many lists on, queries find the lists to probe through that graph too; below, by a flat search of
#: the centres, one matrix product per batch of queries. At 1M rows (10,000 lists of 1,800 values, 171
#: probed), a whole similar() call took 4.92 ms per query flat and 5.40 through the graph in the same
#: process (an earlier run: 5.15 and 5.10); the centre search alone on random centres 0.28 and 2.24 ms
#: (``benchmarks/explore_quantizer.py``). The flat search grows with the lists, the graph's as their log.
GRAPH_QUERY_LISTS = 32768
_HNSW_M = 32
_COARSE_ITERATIONS = 10  # k-means iterations of the lists' centres (faiss' default 25)
_TRAIN_PER_LIST = 39  # faiss' fewest training rows per centre without a warning
_MAX_TRAIN = 256 * 1024  # training rows at most (the two-level k-means reads them in memory)
#: and at most this many of their values (as the index holds them: projected for "pca" codes), so that a wide
#: layer searched alone (trust; 4,096 values at 1M rows: 256k rows, 4 GiB) trains its lists in bounded memory
_TRAIN_FLOATS = 1 << 27
_FORMAT = "actclust.index/1"
#: A search for m neighbours probes lists holding at least this many times m rows (recall@200 of a
#: synthetic clustered layer, 6,000 rows: 2x 0.75, 4x 0.88, 8x 0.96; tests/test_search.py)
_DEEP_ROWS = 4
#: faiss' IVF parallel mode 3: a search of given lists (``search_preassigned``) shares its queries among
#: the threads (in mode 0, the default, only ``search`` does, and a search of given lists runs on one)
_PARALLEL_QUERIES = 3


_LISTS_PER_ROOT = 4.0
#: Past about 160,000 rows the lists hold this many rows each, so that their number grows with ``n``.
ROWS_PER_LIST = 100


def n_lists(n: int) -> int:
    """Lists of an approximate index of ``n`` rows: ``4 sqrt(n)`` (faiss' low end) or ``n / ROWS_PER_LIST``,
    whichever is more, with at least 39 rows each. With ``4 sqrt(n)`` alone a list would hold 250 rows at
    1M, 3.2x as many as at 100k. Lists of a fixed size do not keep the rows a query scans constant,
    though: in ``benchmarks/search_scale.py`` (1,792 values per row) the lists probed for recall@10
    0.97 grew 3-4x from 100k to 1M rows (1,265 to 10,000 lists), as a query's neighbours fall in
    more, finer cells. Finding the lists to probe grows with their number (a flat search of the
    centres), as ``log n`` past :data:`GRAPH_QUERY_LISTS` lists (an HNSW graph over them)."""
    return int(max(1, min(max(round(_LISTS_PER_ROOT * np.sqrt(n)), n // ROWS_PER_LIST), n // _TRAIN_PER_LIST)))


class Index:
    """Exact search: one pass over the stored vectors per call, scoring every row for any weights.

    Nothing is copied on the host: each layer's rows are read from the store in chunks (memory-mapped
    when the store is on disk), centred and scaled, and scored by the backend (the host's faiss, or a
    device that may keep them). The top ``k`` are re-ranked by their exact distances from the layer
    terms (which also split each distance by layer); a search that needs no split (one layer, trust)
    takes its distances from a device's scores directly.
    """

    query_chunk = _QUERY_CHUNK  # queries searched at once (memory: their scores against a chunk of rows)

    def __init__(self, train_vectors: Mapping, stats: dict, progress: bool = False, backend=None):
        self.layers = list(train_vectors)
        self.train_vectors = train_vectors
        self.means = {l: stats[l][0].astype(np.float32) for l in self.layers}
        self.scales = np.array([stats[l][1] for l in self.layers], dtype=np.float64)
        self.n = len(train_vectors[self.layers[0]])
        self.d = None  # the padded width of full rows, where an index stores them (ApproximateIndex)
        self.backend = backend or HOST
        self.progress = progress
        self._sq_norms: dict = {}
        self._cache: dict = {}  # rows the backend keeps between calls, per set of layers read
        self.scores_are_distances = self.backend.on_device  # float32 scores of centred rows: exact enough

    def sq_norms(self, l) -> np.ndarray:
        """``||u_l||^2`` of every training row of layer ``l`` (one pass over the store, on first use)."""
        if l not in self._sq_norms:
            parts = [np.einsum("ij,ij->i", x - self.means[l], x - self.means[l])
                     for _, x in iter_rows(self.train_vectors[l], _ROWS)]
            self._sq_norms[l] = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        return self._sq_norms[l]

    def n_candidates(self, k: int, weights=None) -> int:
        return k

    def candidates(self, part: dict, k: int, weights: list, exclude=None, share: bool = True) -> list:
        """``(ids (b, k), scores (b, k))`` of the ``k`` best rows of the queries ``part``, for each weight
        vector in ``weights``; the store is read once per call, in chunks (``share`` changes nothing here)."""
        used = [l for j, l in enumerate(self.layers) if any(w[j] > 0 for w in weights)]
        queries = [self._query(part, w, used) for w in weights]
        for l in used:
            self.sq_norms(l)
        return self.backend.top_inner_products(queries, lambda a, b: self._rows(slice(a, b), used), self.n, k,
                                               exclude, cache=self._cache.setdefault(tuple(used), {}))

    def _rows(self, which, layers=None, norms: bool = True) -> np.ndarray:
        """Index rows ``[u_l / sqrt(s_l) ..., ||u_l||^2 / s_l ...]`` of some training rows (all layers:
        zero-padded to ``self.d`` columns); without ``norms``, the blocks alone."""
        layers = self.layers if layers is None else layers
        scales = [self.scales[self.layers.index(l)] for l in layers]
        width = sum(self.train_vectors[l].shape[1] for l in layers) + (len(layers) if norms else 0)
        out, at = None, 0  # written in place, block by block: one chunk-sized array, not a copy per step
        for l, s in zip(layers, scales):
            x = _take(self.train_vectors[l], which)
            if out is None:
                out = np.zeros((len(x), self._padded(width, layers)), np.float32)
            block = out[:, at:at + x.shape[1]]
            np.subtract(x, self.means[l], out=block)
            np.divide(block, np.float32(np.sqrt(s)), out=block)
            at += x.shape[1]
            del x
        _release(self.train_vectors)
        for j, (l, s) in enumerate(zip(layers, scales) if norms else ()):
            out[:, at + j] = self.sq_norms(l)[which] / np.float32(s)
        return out

    def _query(self, part: dict, weights, layers=None) -> np.ndarray:
        """The inner-product query of ``part`` for ``weights`` (``C(x)`` is left out: it ranks nothing)."""
        layers = self.layers if layers is None else layers
        b = len(next(iter(part.values())))
        w = [weights[self.layers.index(l)] for l in layers]
        scales = [self.scales[self.layers.index(l)] for l in layers]
        q = [(part[l] - self.means[l]) * np.float32(2 * wl / np.sqrt(s)) if wl > 0 else
             np.zeros((b, self.train_vectors[l].shape[1]), np.float32) for l, wl, s in zip(layers, w, scales)]
        return self._pad(np.hstack(q + [np.tile(-np.asarray(w, np.float32), (b, 1))]), layers)

    def _padded(self, width: int, layers) -> int:
        """Columns of index rows ``width`` values wide: ``self.d`` for rows of every layer, where set."""
        return self.d if self.d is not None and len(layers) == len(self.layers) and self.d >= width else width

    def _pad(self, rows: np.ndarray, layers) -> np.ndarray:
        width = self._padded(rows.shape[1], layers)
        return np.ascontiguousarray(np.hstack([rows, np.zeros((len(rows), width - rows.shape[1]), np.float32)]))

    def _constant(self, part: dict, weights) -> np.ndarray:
        """``C(x) = sum_l w_l ||u_l(x)||^2 / s_l``: the distance is ``C(x)`` minus the score."""
        return sum(np.float32(w / s) * np.einsum("ij,ij->i", part[l] - self.means[l], part[l] - self.means[l])
                   for l, w, s in zip(self.layers, weights, self.scales) if w > 0)

    def search(self, vectors: dict, k: int, weights: np.ndarray, progress: bool = False, exclude=None,
               shares: bool = True):
        """``(ids, distances, layer shares)`` of the ``k`` nearest training rows of each query; with
        ``shares=False`` the shares are ``None``, and an index whose scores are exact distances (float32
        codes, a device) reads no training row to find them."""
        return self.search_many(vectors, k, [weights], progress, exclude, shares)[0]

    def _direct(self, shares: bool) -> bool:
        """Whether each weighting of a search takes its own top ``k`` from the scores, reading no training row:
        where they are exact distances (float32 codes, a device) and no layer shares are asked for."""
        return not shares and self.scores_are_distances

    def search_many(self, vectors: dict, k: int, weights: list, progress: bool = False, exclude=None,
                    shares: bool = True) -> list:
        """:meth:`search` for each weight vector of ``weights`` at once: the store is read once (exact),
        or one candidate search serves them all and each re-ranks the same candidates exactly
        (approximate), their rows gathered once. Without ``shares``, where the scores are exact
        distances (float32 codes, a device), each weighting takes its own top ``k`` and no row is gathered
        (explain's "low" and "high": two searches at their own probes cost less than one shared search
        of the mean weighting at more probes, with 8x as many candidates re-ranked from the store)."""
        weights = [np.asarray(w, np.float64) for w in weights]
        n = len(next(iter(vectors.values())))
        k = min(k, self.n)
        outs = [(np.empty((n, k), dtype=np.int64), np.empty((n, k), dtype=np.float32),
                 np.empty((n, k, len(self.layers)), dtype=np.float32) if shares else None) for _ in weights]
        # Scores that are exact distances, and no layer shares asked for: each weighting takes its own top k
        # (a search of its own, at its own probes, in an approximate index) and no training row is read.
        direct = self._direct(shares)
        gather = self.query_chunk
        if not direct:  # candidates' rows are gathered: as many queries at a time as keep them under _GATHER_FLOATS
            width = max(v.shape[1] for v in self.train_vectors.values())
            m = self.n_candidates(k, weights[0] if len(weights) == 1 else weights)
            gather = max(1, min(self.query_chunk, _GATHER_FLOATS // (m * width * len(weights))))
        used = [l for j, l in enumerate(self.layers) if any(w[j] > 0 for w in weights)]
        # queries searched at once (more share more of what a search reads), fewer of very wide rows
        chunk = chunk_rows(sum(v.shape[1] for v in vectors.values()), self.query_chunk, _QUERY_FLOATS)
        starts = tqdm(range(0, n, chunk), desc="searching similar samples", disable=not progress or n <= chunk,
                      leave=False)
        for start in starts:  # memory O(chunk x candidates + gather x candidates x d), never n x n_train
            part = {l: np.asarray(v[start:start + chunk], np.float32) for l, v in vectors.items()}
            found = self.candidates(part, k, weights, exclude, share=not direct)
            for sub in range(0, len(next(iter(part.values()))), gather):  # rows gathered for so many queries
                q, at = {l: v[sub:sub + gather] for l, v in part.items()}, start + sub
                rows: dict = {}  # per candidate set (shared by weightings): each layer's squared distances
                for w, (i_all, scores), (idx, dist, out_shares) in zip(weights, found, outs):
                    i = i_all[sub:sub + gather]
                    b = len(i)
                    if direct:
                        i = np.where(i < 0, i.max(1, keepdims=True), i)  # an approximate search may find fewer
                        idx[at:at + b] = i[:, :k]
                        dist[at:at + b] = np.maximum(self._constant(q, w)[:, None] - scores[sub:sub + b, :k], 0)
                        continue
                    if id(i_all) not in rows:
                        # Distances from the layer terms: exact (no cancellation between large inner products
                        # for near neighbours), split by layer at once; candidates re-ranked by them.
                        ids = np.where(i < 0, i.max(1, keepdims=True), i)
                        rows[id(i_all)] = (ids, {l: _sq_dist(q[l], take(self.train_vectors[l], ids)) for l in used})
                        _release(self.train_vectors)
                    ids, raw = rows[id(i_all)]
                    factors = w / self.scales
                    per = np.stack([raw[l] * np.float32(f) if f > 0 else np.zeros(ids.shape, np.float32)
                                    for l, f in zip(self.layers, factors)], 2)
                    order = np.argsort(per.sum(2), axis=1, kind="stable")[:, :k]
                    top, per = np.take_along_axis(ids, order, 1), np.take_along_axis(per, order[..., None], 1)
                    total = per.sum(2, keepdims=True)
                    idx[at:at + b], dist[at:at + b] = top, total[..., 0]
                    if shares:
                        out_shares[at:at + b] = np.divide(per, total, out=np.zeros_like(per), where=total > 0)
        return outs


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
    """Approximate search: a faiss IVF index (see the module), candidates re-ranked exactly unless its codes are
    float32.

    ``codes`` is ``"flat"`` (float32), ``"sq8"`` (faiss ``QT_8bit``, one byte per value) or ``"pca"`` (8-bit
    codes of each layer's :data:`PCA_DIMS` leading principal components, ``bases``); ``"auto"`` takes
    ``"pca"`` for rows of several layers wider than :data:`PCA_WIDTH`, else keeps float32 while the codes
    take at most :data:`FLAT_BYTES`. ``settings`` holds, per weight vector,
    ``(nprobe, rerank)`` and ``recall`` the recall@10 its calibration reached.
    """

    #: faiss keeps only the results: more queries at once share more of the lists each one scans (see
    #: :meth:`_search_by_list`; 10,000 queries took 0.18 s together, 0.23 s in chunks of 4,096)
    query_chunk = 16384

    def __init__(self, train_vectors: Mapping, stats: dict, random_state: int = 0, progress: bool = False,
                 codes: str = "auto", backend=None, *, index=None, saved: Optional[dict] = None):
        super().__init__(train_vectors, stats, progress, HOST)
        n = self.n
        # One layer (trust's searches): plain L2 over the scaled rows, whose distances faiss computes from
        # the differences (no cancellation for near neighbours); several: the inner product of the module.
        self.metric = "l2" if len(self.layers) == 1 else "ip"
        self.widths = [int(v.shape[1]) for v in train_vectors.values()]
        extra = len(self.layers) if self.metric == "ip" else 0  # the blocks' squared norms
        full = sum(self.widths) + extra
        if saved is None:
            self.codes = codes if codes != "auto" else (
                "pca" if self.metric == "ip" and sum(self.widths) > PCA_WIDTH else
                "flat" if n * (full + (-full % _PAD)) * 4 <= FLAT_BYTES else "sq8")
        else:
            self.codes = saved["codes"]
        # layer -> (PCA_DIMS, width) principal axes of the projected layers (computed in _build, or read back)
        self.bases: dict = {} if saved is None else dict(saved.get("bases") or {})
        if saved is None and self.codes == "pca":  # values kept per layer: at most PCA_DIMS
            self.dims = [min(w, PCA_DIMS) for w in self.widths]
        else:
            self.dims = [self.bases[l].shape[0] if l in self.bases else w for l, w in zip(self.layers, self.widths)]
        self.d = sum(self.dims) + extra + (-(sum(self.dims) + extra) % _PAD)
        self.rng = np.random.default_rng(random_state)
        if saved is not None:  # read back with a run: nothing is trained, filled or calibrated again
            self.index, self.nlist = index, int(index.nlist)
            self.metric = saved["metric"]
            self.held = np.asarray(saved["held"], dtype=np.int64)
            self.settings = {_from_json(w): (int(p), int(r)) for w, p, r in saved["settings"]}
            self.recall = {_from_json(w): float(v) for w, v in saved["recall"]}
            self.scores_are_distances = self.codes == "flat"
            self.index.parallel_mode = _PARALLEL_QUERIES
            self._lists_of = None
            self.fast = None  # set by load_index where the run saved one
            return
        self.scores_are_distances = self.codes == "flat"
        self.nlist = n_lists(n)
        self.fast = None  # a 4-bit twin of the lists, scanned first (principal-component codes: _build makes it)
        self.index = self._build(progress)
        self.index.parallel_mode = _PARALLEL_QUERIES
        self.held = np.sort(self.rng.choice(n, min(n, _CALIBRATION_QUERIES), replace=False))
        self.settings, self.recall = {}, {}  # per weight vector: (nprobe, rerank), its calibration recall
        self._lists_of = None  # each row's list (calibration's bound on the recall), read when first needed

    def _build(self, progress: bool):
        import faiss

        size = min(self.n, max(_TRAIN_PER_LIST * self.nlist, 256 * 40), _MAX_TRAIN)
        size = min(size, max(self.nlist, _TRAIN_FLOATS // self.d))  # wide rows: fewer (at least one per list)
        train = np.sort(self.rng.choice(self.n, size, replace=False))
        if self.codes == "pca":
            self.bases = self._principal_axes(train)
        # read in chunks: full rows of the whole sample would take n_train x width floats at once
        step = chunk_rows(sum(self.widths) + len(self.layers), _ROWS, _BUILD_FLOATS)
        rows = np.vstack([self._index_rows(train[s:s + step]) for s in range(0, len(train), step)])
        centres = self._centres(rows[:, :sum(self.dims)])
        metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        centre_rows = self._centre_rows(centres)
        # Many lists: rows are assigned through an HNSW graph over the centres (a flat search of n rows
        # against 10,000 centres would take minutes); queries search the centres flat below
        # GRAPH_QUERY_LISTS lists
        quantizer = faiss.IndexHNSWFlat(self.d, _HNSW_M, metric) if self.nlist >= HNSW_LISTS \
            else faiss.IndexFlat(self.d, metric)
        quantizer.add(centre_rows)
        if self.codes == "flat":
            index = faiss.IndexIVFFlat(quantizer, self.d, self.nlist, metric)
        else:
            index = faiss.IndexIVFScalarQuantizer(quantizer, self.d, self.nlist, faiss.ScalarQuantizer.QT_8bit, metric)
        index.train(rows)  # the lists' centres are in place: this trains the 8-bit codes' ranges only
        # principal-component codes get a 4-bit twin over the same lists, scanned first (see fastscan.py)
        self.fast = FastScan.build(index, self._residuals(rows, centre_rows, quantizer), self._row_lists) \
            if self.codes == "pca" else None
        del rows  # the training sample (up to _TRAIN_FLOATS values, 512 MiB) is not held while the lists fill
        # Two passes over the rows: their lists first, then the rows added, each list sized once for all of its
        # rows (appended a block at a time, its storage grew by doubling: 40% more than its rows at the end)
        equal = np.ones(len(self.layers))
        starts = range(0, self.n, step)
        assign = np.empty(self.n, np.int64)
        with tqdm(total=2 * len(starts), desc="building the approximate index", disable=not progress,
                  leave=False) as bar:
            for start in starts:
                stop = min(start + step, self.n)
                # Each row goes to its nearest centre in the equal-weight space: the centre of largest inner
                # product with the row's equal-weight query (of smallest distance, for one layer).
                if self.metric == "l2":
                    _, found = index.quantizer.search(self._index_rows(slice(start, stop)), 1)
                else:
                    part = {l: _take(self.train_vectors[l], slice(start, stop)) for l in self.layers}
                    _, found = index.quantizer.search(self._index_query(part, equal), 1)
                    del part
                    _release(self.train_vectors)  # the store's pages handed back, as _index_rows does
                assign[start:stop] = found[:, 0]
                bar.update()
            _reserve(index, np.bincount(assign, minlength=self.nlist))
            for start in starts:
                stop = min(start + step, self.n)
                block = self._index_rows(slice(start, stop))
                index.add_core(len(block), faiss.swig_ptr(block), None, faiss.swig_ptr(assign[start:stop]))
                if self.fast is not None:
                    self.fast.add(block, assign[start:stop], start)
                bar.update()
        if self.nlist < GRAPH_QUERY_LISTS and not isinstance(quantizer, faiss.IndexFlat):
            quantizer = faiss.IndexFlat(self.d, metric)  # the same centres in the same order, searched exactly
            quantizer.add(centre_rows)
            index.quantizer = quantizer
            index.referenced_objects = []  # the faiss wrapper's reference to the graph: freed now
        index.own_fields = True  # the index keeps (and frees) its quantizer
        quantizer.this.disown()
        if self.fast is not None:
            index.parallel_mode = _PARALLEL_QUERIES  # (the twin takes the index's)
            self.fast.finish(index)
        return index

    def _residuals(self, rows: np.ndarray, centre_rows: np.ndarray, quantizer) -> np.ndarray:
        """Index rows ``rows`` (of several layers) minus the centre row of the list each goes to: the nearest centre
        in the equal-weight space, as :meth:`_build` assigns rows (its query, built from the rows themselves: the
        blocks doubled, the squared norms' weights -1)."""
        rows = rows[::max(1, len(rows) // _TWIN_TRAIN)]  # (faiss trains each 16-value codebook on 4,096 of them)
        width = sum(self.dims)
        query = rows.copy()
        query[:, :width] *= 2
        query[:, width:width + len(self.layers)] = -1
        query[:, width + len(self.layers):] = 0
        best = quantizer.search(query, 1)[1][:, 0]
        return rows - centre_rows[best]

    def _principal_axes(self, train: np.ndarray) -> dict:
        """Per layer wider than :data:`PCA_DIMS`, its ``PCA_DIMS`` leading principal axes ``(PCA_DIMS, width)``
        of the centred rows: from the covariance of up to :data:`_PCA_ROWS` of the training rows ``train``, or
        for a layer wider than :data:`_EIGH_WIDTH`, by randomized SVD of as many as fit in :data:`_PCA_FLOATS`."""
        ids = train if len(train) <= _PCA_ROWS else np.sort(self.rng.choice(train, _PCA_ROWS, replace=False))
        bases = {l: np.ascontiguousarray((self._axes_by_svd if w > _EIGH_WIDTH else self._axes_by_eigh)(l, w, ids),
                                         dtype=np.float32)
                 for l, w in zip(self.layers, self.widths) if w > PCA_DIMS}
        _release(self.train_vectors)
        return bases

    def _axes_by_eigh(self, l: str, w: int, ids: np.ndarray) -> np.ndarray:
        cov = np.zeros((w, w), np.float64)
        for s in range(0, len(ids), _ROWS):
            b = _take(self.train_vectors[l], ids[s:s + _ROWS]) - self.means[l]
            cov += b.T @ b
        return np.linalg.eigh(cov)[1][:, ::-1][:, :PCA_DIMS].T  # eigh: ascending eigenvalues

    def _axes_by_svd(self, l: str, w: int, ids: np.ndarray) -> np.ndarray:
        from sklearn.utils.extmath import randomized_svd

        m = min(len(ids), max(4 * PCA_DIMS, _PCA_FLOATS // w))
        sample = ids if m == len(ids) else np.sort(self.rng.choice(ids, m, replace=False))
        b = _take(self.train_vectors[l], sample) - self.means[l]
        axes = randomized_svd(b, PCA_DIMS, random_state=int(self.rng.integers(2 ** 31)))[2]
        if len(axes) < PCA_DIMS:  # fewer rows than axes: completed by orthonormal directions
            fill = self.rng.standard_normal((w, PCA_DIMS - len(axes)))
            axes = np.linalg.qr(np.hstack([axes.T, fill]))[0].T
        return axes

    def _project(self, rows: np.ndarray) -> np.ndarray:
        """Full-width index rows or queries as the index holds them: each projected layer's block on its
        principal axes (a linear map, so a query's weights carry over), the squared norms as they are."""
        if not self.bases:
            return rows
        parts, s = [], 0
        for l, w in zip(self.layers, self.widths):
            block = rows[:, s:s + w]
            parts.append(block @ self.bases[l].T if l in self.bases else block)
            s += w
        if self.metric == "ip":
            parts.append(rows[:, s:s + len(self.layers)])
        return self._pad(np.hstack(parts), self.layers)

    def _centres(self, x: np.ndarray) -> np.ndarray:
        """k-means centres of the lists in the equal-weight space (faiss; two levels for many lists)."""
        import faiss

        x = np.ascontiguousarray(x)
        seed = int(self.rng.integers(2 ** 31))
        if self.nlist >= HNSW_LISTS:
            from faiss.contrib.clustering import two_level_clustering

            # (the first level runs _COARSE_ITERATIONS, the second faiss' default: the call takes one niter)
            centres, _ = two_level_clustering(x, int(np.sqrt(self.nlist)), self.nlist,
                                              clustering_niter=_COARSE_ITERATIONS, seed=seed, min_points_per_centroid=1)
            return np.ascontiguousarray(centres, dtype=np.float32)
        km = faiss.Kmeans(x.shape[1], self.nlist, niter=_COARSE_ITERATIONS, seed=seed, min_points_per_centroid=1,
                          max_points_per_centroid=max(_TRAIN_PER_LIST, -(-len(x) // self.nlist)))
        km.train(x)
        return np.ascontiguousarray(km.centroids, dtype=np.float32)

    def _index_rows(self, which) -> np.ndarray:
        """The rows the faiss index holds: :meth:`Index._rows`, or for one layer ``u / sqrt(s)`` (padded);
        projected (:meth:`_project`) where the codes are ``"pca"``."""
        return self._project(self._rows(which, norms=self.metric == "ip"))

    def _index_query(self, part: dict, weights) -> np.ndarray:
        if self.metric == "ip":
            return self._project(self._query(part, weights))
        l = self.layers[0]
        return self._project(self._pad((part[l] - self.means[l]) / np.float32(np.sqrt(self.scales[0])), self.layers))

    def _constant(self, part: dict, weights) -> np.ndarray:
        if self.metric == "ip":
            return super()._constant(part, weights)
        return np.zeros(len(next(iter(part.values()))), np.float32)  # scores are minus the distances

    def _centre_rows(self, centres: np.ndarray) -> np.ndarray:
        """Centres as index rows: their blocks and each block's own squared norm (so a query's inner
        product with a centre ranks it by the query's weighted distance to it); for one layer, as they are."""
        if self.metric == "l2":
            return self._pad(centres, self.layers)
        blocks, norms, s = [], [], 0
        for width in self.dims:
            b = centres[:, s:s + width]
            s += width
            blocks.append(b)
            norms.append(np.einsum("ij,ij->i", b, b)[:, None])
        return self._pad(np.hstack(blocks + norms), self.layers)

    def n_candidates(self, k: int, weights=None) -> int:
        """Candidates re-ranked exactly: ``k`` for float32 codes and one weighting; more for 8-bit codes or
        a group of weightings (a list) sharing one search, as calibrated."""
        group = isinstance(weights, list)
        if self.codes == "flat" and not group:
            return k
        return self._n_reranked(k, _RERANKS[-1] if weights is None else self._settings(weights)[1])

    def _n_reranked(self, k: int, rerank: int) -> int:
        # calibrated on the 10 nearest; deeper searches (trust's 50) re-rank as many extra as 10 would
        return min(self.n, k + (rerank - 1) * k if k <= 10 else max(k, 10 * rerank))

    def _cost(self, nprobe: int, rerank: int, k: int) -> float:
        """What a query costs, in bytes scanned (see :data:`_RERANK_COST`), probing ``nprobe`` lists and
        re-ranking ``rerank``'s candidates (none for float32 codes searched alone: ``rerank`` 1)."""
        rows = nprobe * self.n / self.nlist
        if self.fast is not None:  # 4-bit codes scanned (a quarter of the 8-bit scan's time), a shortlist scored again
            m = self._n_reranked(k, rerank)
            scanned = rows * self.d / 4 + _RESCORE_COST * SHORTLIST * m * self.d
        else:
            scanned = rows * self.d * (4 if self.codes == "flat" else 1)
        return scanned + (_RERANK_COST * self._n_reranked(k, rerank) * sum(self.widths) if rerank > 1 else 0)

    def candidates(self, part: dict, k: int, weights: list, exclude=None, share: bool = True) -> list:
        """As :meth:`Index.candidates`; a group of weightings shares one search (by their mean weighting,
        more candidates, as calibrated for the group) unless ``share`` is false: then each searches alone."""
        import faiss

        out = []
        keep = None
        if exclude is not None and exclude.any():
            bits = np.packbits(~exclude, bitorder="little")  # kept alive while the selector reads it
            keep = faiss.IDSelectorBitmap(self.n, faiss.swig_ptr(bits))
        if len(weights) > 1 and share:  # one search for the group, by the mean of its weightings: shared candidates
            group = [np.asarray(w, np.float64) for w in weights]
            nprobe = self._settings(group)[0]
            mean = np.mean([w / w.sum() for w in group], 0)
            scores, ids = self._search_full(self._index_query(part, mean), self.n_candidates(k, group), nprobe, keep)
            return [(ids, scores)] * len(group)
        for w in weights:
            scores, ids = self._search_full(self._index_query(part, w), self.n_candidates(k, w), self._settings(w)[0],
                                            keep)
            out.append((ids, -scores if self.metric == "l2" else scores))
        return out

    def _search_full(self, queries: np.ndarray, m: int, nprobe: int, keep) -> tuple:
        """faiss' ``(scores, ids)`` of the ``m`` best rows of each query, probing ``nprobe`` lists, and more
        (doubling) for the queries whose probed lists held fewer than ``m`` rows left in: a deep search
        (trust's 50 neighbours) or one that leaves rows out must not come back short."""
        # lists hold n / nlist rows on average: probe at least enough of them for _DEEP_ROWS x m rows (the
        # probes are calibrated for 10 neighbours; trust asks for 50)
        nprobe = int(min(self.nlist, max(nprobe, np.ceil(_DEEP_ROWS * m * self.nlist / self.n))))
        scores, ids = self._search_by_list(queries, m, nprobe, keep)
        short = np.flatnonzero((ids < 0).any(1))
        while len(short) and nprobe < self.nlist:
            nprobe = min(2 * nprobe, self.nlist)
            s, i = self._search_by_list(np.ascontiguousarray(queries[short]), m, nprobe, keep)
            scores[short], ids[short] = s, i
            short = short[(i < 0).any(1)]
        return scores, ids

    def _search_by_list(self, queries: np.ndarray, m: int, nprobe: int, keep) -> tuple:
        """faiss' search, its queries taken in the order of their nearest list: the lists to probe are
        found first (as faiss would), then the queries that share lists are scanned one after the other
        by the same thread, which finds those lists' rows still in its cache. On the Fashion-MNIST
        explain benchmark (10,000 queries, 272 values per row) this took 0.18 s instead of 0.29 s; on one
        layer's 16-128 values, about as long as faiss' own order."""
        params = _quantizer_params(nprobe, keep)
        graph = self._graph_quantizer()
        near, lists = self.index.quantizer.search(queries, nprobe, params=params.inner if graph else None)
        order = np.argsort(lists[:, 0], kind="stable")
        q, near, lists = (np.ascontiguousarray(a[order]) for a in (queries, near, lists))
        # faiss' parallel_mode 3 (set on the index): the scan runs its queries on every thread, in this order
        if self.fast is None or keep is not None:
            scores, ids = self._scan(q, m, lists, near, params)
        else:  # the 4-bit scan first, its best scored again (fastscan.py)
            scores, ids = self.fast.search(q, m, lists, near, params)
            # queries it left short (lists of fewer rows; 4-bit values a crafted run made overflow) scan the 8-bit codes
            redo = np.flatnonzero((ids < 0).any(1))
            if len(redo):
                again = [np.ascontiguousarray(a[redo]) for a in (q, lists, near)]
                scores[redo], ids[redo] = self._scan(*again[:1], m, *again[1:], params)
        out_scores, out_ids = np.empty_like(scores), np.empty_like(ids)
        out_scores[order], out_ids[order] = scores, ids
        return out_scores, out_ids

    def _scan(self, q, m, lists, near, params) -> tuple:
        """faiss' scan of the 8-bit (or float32) codes of the lists ``lists`` (their centres' scores ``near``):
        ``(scores, ids)`` of the ``m`` best rows of each query."""
        import faiss

        n = len(q)
        scores, ids = np.empty((n, m), np.float32), np.empty((n, m), np.int64)
        self.index.search_preassigned_c(n, faiss.swig_ptr(q), m, faiss.swig_ptr(lists), faiss.swig_ptr(near),
                                        faiss.swig_ptr(scores), faiss.swig_ptr(ids), False, params)
        return scores, ids

    def _settings(self, weights) -> tuple:
        """``(nprobe, rerank)`` for ``weights`` (or a group of weightings, a list, that share one search): of
        those reaching the target recall for each, the cheapest by :meth:`_cost` (the fewest lists for each
        number of candidates, stopping where it cannot beat the best so far), calibrated once."""
        group = isinstance(weights, list)
        key = tuple(_key(w) for w in weights) if group else _key(weights)
        if key not in self.settings:
            ws = [np.asarray(w, np.float64) for w in weights] if group else [np.asarray(weights, np.float64)]
            queries = {l: take(self.train_vectors[l], self.held) for l in self.layers}
            k = min(11, self.n)  # each held-out row finds itself: it is left out of both sides
            # a new weighting waits for an exact search and a few trial searches (25 s at 1M rows): say so
            with tqdm(desc="calibrating the approximate search", unit=" search", disable=not self.progress,
                      leave=False) as bar:
                truth = [i for i, _ in Index.candidates(self, queries, k, ws)]
                bar.update()
                cover = self._coverage(queries, ws, truth, group)
                best = None  # (cost, nprobe, rerank, recall)
                reranks = (1,) if self.codes == "flat" and not group else _RERANKS
                w = ws if group else ws[0]
                for rerank in reranks:
                    cap = None if best is None else best[0]
                    if cap is not None and self._cost(1, rerank, k) >= cap:
                        break  # more candidates only cost more
                    start = self._fewest_lists(cover, k, rerank)
                    if cap is not None and self._cost(start, rerank, k) >= cap:
                        continue  # the lists it needs at least already cost more than the best
                    nprobe, recall = self._probes(key, rerank, queries, k, w, truth, bar, cap,
                                                  last=rerank == reranks[-1], start=start)
                    if recall >= TARGET_RECALL and (best is None or self._cost(nprobe, rerank, k) < best[0]):
                        best = (self._cost(nprobe, rerank, k), nprobe, rerank, recall)
                    if best is None and rerank == reranks[0] and len(reranks) > 1 and nprobe * _SPREAD >= self.nlist:
                        # Short of the target with the fewest candidates, from a good part of the lists (neighbours
                        # spread over them: little structure): where even the most candidates from every list fall
                        # short too, no setting reaches it, and the loop would only end at that setting after
                        # trying every other number of candidates (82 s on benchmarks/wide_layers.py's 16,384-value
                        # rows): stop there now. (Not where the fewest candidates needed few lists: there this one
                        # search of every list would cost more than the rest of the calibration.)
                        nprobe, rerank = self.nlist, reranks[-1]
                        recall = self._recall_at(key, nprobe, rerank, queries, k, w, truth, bar)
                        if recall < TARGET_RECALL:
                            break
                if best is not None:  # else the last tried: the most candidates, the most lists
                    _, nprobe, rerank, recall = best
                self.settings[key] = (nprobe, rerank)
            self.recall[key] = recall
        return self.settings[key]

    def calibrated_recall(self, weights: list, shares: bool = True) -> float:
        """The recall@10 that calibration reached (calibrating first, where not yet done) for the weightings
        ``weights`` searched together as :meth:`search_many` searches them with ``shares``: the worst of them."""
        return min(self.recall[key] for key in self._calibrated(weights, shares))

    def scans_most(self, weights: list, shares: bool = True) -> bool:
        """Whether searching ``weights`` (as :meth:`calibrated_recall`, calibrated) probes at least
        :data:`EXACT_SHARE` of the lists of whole-row codes: it then reads about as many values as the exact
        search, which scores them by matrix products, several times faster per value."""
        if self.codes == "pca":  # codes a fraction of the rows' width: scanning them all still reads less
            return False
        return max(self.settings[key][0] for key in self._calibrated(weights, shares)) >= EXACT_SHARE * self.nlist

    def _calibrated(self, weights: list, shares: bool) -> list:
        """The settings keys that a search of ``weights`` with ``shares`` uses (as :meth:`search_many`: one for a
        group sharing a search, else one per weighting), each calibrated where not yet done."""
        ws = [np.asarray(w, np.float64) for w in weights]
        if len(ws) > 1 and not self._direct(shares):  # one search for the group (see search_many)
            self._settings(ws)
            return [tuple(_key(w) for w in ws)]
        for w in ws:
            self._settings(w)
        return [_key(w) for w in ws]

    def _probes(self, key, rerank, queries, k, w, truth, bar=None, cap: Optional[float] = None,
                last: bool = True, start: int = 1) -> tuple:
        """The fewest lists probed (doubling from ``start``, then halving the last step) for which the
        calibration queries reach the target recall with ``rerank``: ``(nprobe, recall)``, kept in ``settings``.
        Fewer than ``start`` lists are known to fall short (:meth:`_fewest_lists`). It gives up (short of the
        target) before a doubling would cost ``cap`` or more (:meth:`_cost`), and, unless ``last``, past
        :data:`_PLATEAU_LISTS` lists once a doubling adds less than :data:`_PLATEAU`."""
        def recall_at(nprobe):
            return self._recall_at(key, nprobe, rerank, queries, k, w, truth, bar)

        low, nprobe = start - 1, start
        recall = recall_at(nprobe)
        while recall < TARGET_RECALL and nprobe < self.nlist:
            if cap is not None and self._cost(min(2 * nprobe, self.nlist), rerank, k) >= cap:
                break
            before = recall
            low, nprobe = nprobe, min(2 * nprobe, self.nlist)
            recall = recall_at(nprobe)
            if not last and nprobe > _PLATEAU_LISTS and recall - before < _PLATEAU:
                break
        while recall >= TARGET_RECALL and nprobe - low > 1:  # the smallest in (low, nprobe] that still reaches it
            mid = (low + nprobe) // 2
            r = recall_at(mid)
            if r >= TARGET_RECALL:
                nprobe, recall = mid, r
            else:
                low = mid
        self.settings[key] = (nprobe, rerank)
        return nprobe, recall

    def _coverage(self, queries: dict, ws: list, truth: list, group: bool) -> Optional[np.ndarray]:
        """``cover[p]``, ``p = 0 .. nlist``: the share of the calibration queries' exact neighbours (each query's
        own row left out) that lie in the ``p`` lists a search probes first, the worst of the weightings ``ws``
        (probed by their mean for a ``group``). No search probing ``p`` lists finds more of them, whatever its
        candidates: a bound on its recall, from one ranking of the centres (``None`` where queries find their
        lists through a graph, which ranks only the first few)."""
        if self._graph_quantizer():
            return None
        probed = [np.mean([w / w.sum() for w in ws], 0)] * len(ws) if group else ws
        rows, own = np.arange(len(self.held))[:, None], self.held[:, None]
        cover = np.ones(self.nlist + 1)
        for w, t in zip(probed, truth):
            _, order = self.index.quantizer.search(self._index_query(queries, w), self.nlist)
            rank = np.empty_like(order)
            rank[rows, order] = np.arange(self.nlist)  # each list's place in the query's probing order
            place = rank[rows, self._row_lists()[t]]  # (queries, k): the place of each neighbour's list
            keep = t != own
            share = keep / np.maximum(keep.sum(1, keepdims=True), 1) / len(t)
            found = np.bincount(place[keep] + 1, weights=share[keep], minlength=self.nlist + 1).cumsum()
            cover = np.minimum(cover, found)
        return cover

    def _row_lists(self) -> np.ndarray:
        """Each row's list, read from the index once."""
        import faiss

        if self._lists_of is None:
            invlists = self.index.invlists
            lists_of = np.empty(self.n, np.int32)
            for j in range(self.nlist):
                size = invlists.list_size(j)
                if size:
                    ptr = invlists.get_ids(j)
                    lists_of[faiss.rev_swig_ptr(ptr, size)] = j
                    invlists.release_ids(j, ptr)
            self._lists_of = lists_of
        return self._lists_of

    def _graph_quantizer(self) -> bool:
        """Whether queries find their lists through an HNSW graph (:data:`GRAPH_QUERY_LISTS`), not a flat search."""
        import faiss

        return not isinstance(faiss.downcast_index(self.index.quantizer), faiss.IndexFlat)

    def _fewest_lists(self, cover: Optional[np.ndarray], k: int, rerank: int) -> int:
        """The fewest lists a calibration search may probe to reach the target recall (1 when not known): below
        it, ``cover`` is short of the target. A search probes at least :data:`_DEEP_ROWS` times its candidates'
        rows (:meth:`_search_full`), so asking for fewer lists than that probes as many."""
        if cover is None:
            return 1
        floor = int(min(self.nlist, np.ceil(_DEEP_ROWS * self._n_reranked(k, rerank) * self.nlist / self.n)))
        if cover[floor] >= TARGET_RECALL - 1e-9:
            return 1
        return int(min(self.nlist, np.searchsorted(cover, TARGET_RECALL - 1e-9)))

    def _recall_at(self, key, nprobe, rerank, queries, k, w, truth, bar=None) -> float:
        """Recall of the calibration queries searched at ``(nprobe, rerank)``: the worst of the weightings."""
        ws = w if isinstance(w, list) else [w]
        self.settings[key] = (nprobe, rerank)
        # one weighting: its own search, which reads no training row where the scores are exact (float32)
        found = self.search_many(queries, k, ws, shares=len(ws) > 1)
        recall = min(_recall(f[0], t, self.held) for f, t in zip(found, truth))
        if bar is not None:
            bar.set_postfix(lists=nprobe, recall=f"{recall:.3f}", refresh=False)
            bar.update()
        return recall


def _key(weights) -> tuple:
    return tuple(np.round(np.asarray(weights, np.float64), 12).tolist())


def _to_json(key: tuple) -> list:
    """A settings key (a weighting, or a group of them) as JSON lists."""
    return [list(w) for w in key] if key and isinstance(key[0], tuple) else list(key)


def _from_json(value: list) -> tuple:
    return tuple(tuple(float(x) for x in w) for w in value) if value and isinstance(value[0], list) \
        else tuple(float(x) for x in value)


def _quantizer_params(nprobe: int, selector=None):
    """faiss search parameters: ``nprobe`` lists, an HNSW quantizer exploring at least twice as many."""
    import faiss

    inner = faiss.SearchParametersHNSW(efSearch=max(2 * nprobe, 64))
    params = faiss.SearchParametersIVF(nprobe=nprobe, quantizer_params=inner)
    params.inner = inner  # kept alive with the parameters
    if selector is not None:
        params.sel = selector
        params.selector = selector
    return params


def _reserve(index, sizes: np.ndarray) -> None:
    """Give each list of ``index`` (faiss' ``ArrayInvertedLists``) room for ``sizes`` rows before any is added: a
    list resized up then back to empty keeps its room, and rows added later fill it without moving it."""
    import faiss

    lists = faiss.downcast_InvertedLists(index.invlists)
    if not isinstance(lists, faiss.ArrayInvertedLists):
        return
    for i in np.flatnonzero(sizes):
        lists.resize(int(i), int(sizes[i]))
        lists.resize(int(i), 0)


def _recall(found: np.ndarray, truth: np.ndarray, own: np.ndarray) -> float:
    """Mean share of each exact neighbour list found, each query's own row left out."""
    shares = []
    for a, b, o in zip(found, truth, own):
        b = set(b.tolist()) - {int(o)}
        shares.append(len((set(a.tolist()) - {int(o)}) & b) / max(len(b), 1))
    return float(np.mean(shares))


# ---------------------------------------------------------------------------- saved with a run
def index_files(index: ApproximateIndex, token: str) -> dict:
    """The files that keep ``index`` with a run (``files=`` of :func:`actclust.io.persistence.save`):
    the faiss index, streamed, and its parameters (layers, codes, calibration) as safetensors."""
    import faiss
    from safetensors.numpy import save

    def write_index(write):
        source = getattr(index, "source", None)
        if source is not None:  # read back memory-mapped: faiss would write a reference to the file, so copy it
            with open(source.reading() if isinstance(source, SavedFile) else source, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    write(block)
            return
        faiss.write_index(index.index, faiss.PyCallbackIOWriter(lambda b: write(b) or len(b)))

    meta = {"format": _FORMAT, "layers": index.layers, "n": index.n, "d": index.d, "codes": index.codes,
            "metric": index.metric,
            "widths": [int(index.train_vectors[l].shape[1]) for l in index.layers],
            "settings": [[_to_json(w), p, r] for w, (p, r) in index.settings.items()],
            "fastscan": index.fast is not None,
            "recall": [[_to_json(w), v] for w, v in index.recall.items()]}
    arrays = {"held": index.held.astype(np.int64), "scales": index.scales.astype(np.float64),
              **{f"mean/{j}": index.means[l] for j, l in enumerate(index.layers)},
              **{f"basis/{j}": index.bases[l] for j, l in enumerate(index.layers) if l in index.bases},
              **({f"fastscan/{k}": v for k, v in index.fast.arrays().items()} if index.fast is not None else {})}
    params = save(arrays, metadata={"actclust": json.dumps(meta)})
    return {f"index_{token}-{{sha}}.faiss": write_index, f"index_{token}-{{sha}}.safetensors": params}


def _check(index, path, reading: str, codes: str, metric: str, n: int) -> None:
    """``index`` as read from ``path`` by faiss refused (:class:`InvalidSaveError`) unless it is what
    :func:`index_files` writes: an IVF index of the codes and metric recorded, a flat or graph quantizer of its
    lists, and lists that faiss read from this very file (``read_index`` maps the lists of the format it writes onto
    the file itself; another list format named in a crafted file would be left unmapped, and faiss' first search
    would read memory at addresses the file chose), every stored row of the run in exactly one list."""
    import faiss

    def refuse(what: str):
        raise InvalidSaveError(f"The saved search index {path} is not one actclust writes: {what}.")

    kind = faiss.IndexIVFFlat if codes == "flat" else faiss.IndexIVFScalarQuantizer
    ivf = faiss.downcast_index(index)
    if type(ivf) is not kind:
        refuse(f"a {type(ivf).__name__}, not the {kind.__name__} of its {codes!r} codes")
    want = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    quantizer = faiss.downcast_index(ivf.quantizer)
    if ivf.metric_type != want or type(quantizer) not in (faiss.IndexFlat, faiss.IndexFlatL2, faiss.IndexFlatIP,
                                                        faiss.IndexHNSWFlat) \
            or quantizer.ntotal != ivf.nlist or quantizer.d != ivf.d or quantizer.metric_type != want:
        refuse("its metric or the quantizer of its lists does not match its parameters")
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if lists.nlist != ivf.nlist or lists.code_size != ivf.code_size:
        refuse("its lists do not match the index")
    entry = 8 + ivf.code_size  # an id and a code per row
    if isinstance(lists, faiss.OnDiskInvertedLists):  # memory-mapped: read_index mapped them onto this file
        size = os.stat(reading).st_size
        if lists.filename or not int(lists.ptr) or lists.totsize != size:
            refuse("its lists are not stored in it")
        for i in range(lists.nlist):
            part = lists.lists.at(i)
            if part.size > part.capacity or part.offset + part.capacity * entry > size:
                refuse(f"list {i} lies outside the file")
    elif not isinstance(lists, faiss.ArrayInvertedLists):
        refuse(f"its lists are {type(lists).__name__}")
    sizes = [lists.list_size(i) for i in range(lists.nlist)]
    ids = np.concatenate([np.zeros(0, np.int64)] + [faiss.rev_swig_ptr(lists.get_ids(i), m).copy()
                                                    for i, m in enumerate(sizes) if m])
    if len(ids) != n or (n and (ids.min() < 0 or ids.max() >= n or (np.bincount(ids, minlength=n) != 1).any())):
        refuse("its lists do not hold each of the run's rows exactly once")


class SavedFile:
    """A file of a loaded run, opened when the run is loaded (its SHA-256 checked then) and read later, on first use,
    through that descriptor: the content load checked, even where a save over the run's folder has since replaced
    or removed the name (another process's ``fit --out RUN --overwrite``: the loaded explainer's searches, and its
    saves elsewhere, failed with ``FileNotFoundError`` for good)."""

    def __init__(self, path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
        self._close = weakref.finalize(self, os.close, self.fd)

    def reading(self) -> str:
        """A name that opens this very file: its descriptor's (Linux, macOS), or its path while that still names it."""
        name = _descriptor_name(self.fd)
        if name is not None:
            return name
        try:
            now, then = os.stat(self.path), os.fstat(self.fd)
            if (now.st_dev, now.st_ino) == (then.st_dev, then.st_ino):
                return str(self.path)
        except OSError:
            pass
        raise InvalidSaveError(f"{self.path} was replaced or removed since its run was loaded (a save over the run's "
                               "folder?); load the run again.")

    def __str__(self) -> str:
        return str(self.path)


class _UnnamedFile(SavedFile):
    """A temporary file without a name (:func:`tempfile.TemporaryFile`), read through its open descriptor; the
    system deletes it when the descriptor closes (this object is dropped, or the process ends, even killed)."""

    def __init__(self, file, where):
        self.file, self.fd, self.path = file, file.fileno(), Path(where) / f"<unnamed file {file.fileno()}>"

    def reading(self) -> str:
        name = _descriptor_name(self.fd)
        if name is None:
            raise InvalidSaveError("this system names no open file descriptor (/proc/self/fd, /dev/fd)")
        return name


def _descriptor_name(fd: int) -> Optional[str]:
    """A name that opens the file of the open descriptor ``fd`` again (Linux, macOS), or None."""
    return next((name for name in (f"/proc/self/fd/{fd}", f"/dev/fd/{fd}") if os.path.exists(name)), None)


def keep_on_disk(index: ApproximateIndex, directory) -> None:
    """Move the lists of a freshly built ``index`` into an unnamed temporary file in ``directory`` and map them from
    it, as a loaded run's index is mapped from the run: they then take page-cache memory, which the system reclaims
    under pressure, not the process's own. A disk store's indexes live beside it: ``prepare`` builds every index
    (trust's per-layer ones with float32 or 8-bit codes, up to :data:`FLAT_BYTES` each), and with them all in
    memory the process peaked at 4.9 GB at 1M training samples of 1,792 values, at 2.4 GB with each mapped once
    built (``docs/speed.md``; a similar-sample index's 4-bit twin, :mod:`~actclust.analysis.fastscan`, stays in memory:
    faiss cannot map its lists). The answers are the same: the same lists, read from the file. The index is left as it
    was where the file cannot be made (a folder without write permission, a full disk) or read back by a name (a
    system without ``/proc/self/fd`` or ``/dev/fd``)."""
    import tempfile

    import faiss

    try:
        file = tempfile.TemporaryFile(dir=directory)
    except OSError:
        return
    held = _UnnamedFile(file, directory)
    try:
        held.reading()
        faiss.write_index(index.index, faiss.PyCallbackIOWriter(lambda b: file.write(b) or len(b)))
        file.flush()
        mapped = faiss.read_index(held.reading(), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except (OSError, RuntimeError, InvalidSaveError):  # faiss reports a failed write or read as a RuntimeError
        try:
            file.close()  # flushes what is buffered: on a full disk that fails again (it escaped here: an outside check)
        except OSError:
            pass
        return
    mapped.parallel_mode = index.index.parallel_mode
    if index.fast is not None:
        index.fast.rebind(mapped)
    index.index, index.source = mapped, held  # the lists in memory are freed with the index they belonged to


#: faiss' index headers hold this value twice where there is no size (its "dummy" fields)
_HEADER_DUMMY = 1 << 20


class _AtTheLists(Exception):
    """Raised through faiss' reader where an index's lists begin: what comes before is checked."""


def _check_sizes(read: str, shown) -> None:
    """Refuse a faiss file one of whose sizes, before its lists, exceeds the bytes left in it. faiss allocates what a
    size field says (up to 2^40 elements) before it reads the data, so 162 crafted bytes made it fill 2 GiB (an outside
    check). The file is read through faiss' own reader by a callback that sees each field, up to the lists (those are
    memory-mapped, and faiss checks their sizes against the file): a whole-number field larger than the rest of the
    file is refused. (A double or a value of 2^40 or more is no size: faiss refuses those sizes itself.)"""
    import faiss

    with open(read, "rb") as f:
        total = os.fstat(f.fileno()).st_size

        def field(n: int) -> bytes:
            chunk = f.read(n)
            if n == 4 and chunk == b"ilar":
                raise _AtTheLists
            if n == 8 and len(chunk) == 8:
                value = int.from_bytes(chunk, "little")
                if total - f.tell() < value < 1 << 40 and value != _HEADER_DUMMY:
                    raise InvalidSaveError(f"The saved search index {shown} says {value} values follow, where "
                                           f"{total - f.tell()} bytes are left in it: it is damaged or crafted.")
            return chunk

        try:
            faiss.read_index(faiss.PyCallbackIOReader(field))
        except _AtTheLists:
            pass


def load_index(train_vectors: Mapping, faiss_path, params_path, *, mmap: bool = True) -> ApproximateIndex:
    """An :class:`ApproximateIndex` saved by :func:`index_files`, its faiss file memory-mapped (not read
    into memory, not rebuilt); its parameters are checked against ``train_vectors``. The files are paths, or
    :class:`SavedFile` (a loaded run's, opened at its load). A parameters file that is not one (not safetensors,
    its metadata not the JSON object written, arrays missing) is an :class:`InvalidSaveError` naming it."""
    from safetensors import SafetensorError

    try:
        return _load_index(train_vectors, faiss_path, params_path, mmap)
    except InvalidSaveError:  # said already (a ValueError too)
        raise
    except (SafetensorError, KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError,
            RecursionError) as e:
        raise InvalidSaveError(f"The saved search index {params_path} is damaged: {type(e).__name__}: "
                               f"{str(e)[:200]}") from None


def _load_index(train_vectors: Mapping, faiss_path, params_path, mmap: bool) -> ApproximateIndex:
    import faiss
    from safetensors import safe_open

    held = faiss_path if isinstance(faiss_path, SavedFile) else None
    read_faiss = faiss_path.reading() if isinstance(faiss_path, SavedFile) else str(faiss_path)
    read_params = params_path.reading() if isinstance(params_path, SavedFile) else str(params_path)
    with safe_open(read_params, framework="numpy") as f:
        meta = json.loads((f.metadata() or {}).get("actclust", "{}"))
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    if not isinstance(meta, dict):
        raise InvalidSaveError(f"The saved search index {params_path} is damaged: its metadata is a "
                               f"{type(meta).__name__}, not an object.")
    layers = list(train_vectors)
    widths = [int(train_vectors[l].shape[1]) for l in layers]
    n = len(train_vectors[layers[0]])
    if meta.get("format") != _FORMAT or meta.get("layers") != layers or meta.get("n") != n \
            or meta.get("widths") != widths or meta.get("codes") not in ("flat", "sq8", "pca") \
            or meta.get("metric") != ("l2" if len(layers) == 1 else "ip"):
        raise InvalidSaveError(f"The saved search index {params_path} does not describe this run's vectors "
                               f"({meta.get('layers')} of {meta.get('n')} rows; the run has {layers} of {n}).")
    try:
        _check_sizes(read_faiss, faiss_path)
        index = faiss.read_index(read_faiss, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0)
    except RuntimeError as e:  # faiss' own checks of its format
        said = str(e).strip()
        said = said.split("Error: ", 1)[-1] if "Error: " in said else said  # faiss' text, not its source position
        raise InvalidSaveError(f"The saved search index {faiss_path} is not a faiss index faiss can read: "
                               f"{said[:300]}") from None
    if index.ntotal != n or index.d != meta.get("d"):
        raise InvalidSaveError(f"The saved search index {faiss_path} holds {index.ntotal} rows of {index.d} values; "
                               f"the run has {n} rows of {meta.get('d')}.")
    _check(index, faiss_path, read_faiss, meta["codes"], meta["metric"], n)
    stats = {l: (arrays[f"mean/{j}"], float(arrays["scales"][j])) for j, l in enumerate(layers)}
    bases = {l: arrays[f"basis/{j}"] for j, l in enumerate(layers) if f"basis/{j}" in arrays}
    width = dict(zip(layers, widths))
    if (bases and meta["codes"] != "pca") or any(b.ndim != 2 or not 0 < b.shape[0] <= b.shape[1] == width[l]
                                                 for l, b in bases.items()):
        raise InvalidSaveError(f"The saved search index {params_path} has principal axes that do not fit its codes "
                               f"({meta['codes']}) or this run's layers ({width}).")
    out = ApproximateIndex(train_vectors, stats, index=index, saved={**meta, "held": arrays["held"], "bases": bases})
    if out.d != index.d:
        raise InvalidSaveError(f"The saved search index {faiss_path} holds rows of {index.d} values; its parameters "
                               f"describe {out.d}.")
    if meta.get("fastscan"):  # its 4-bit twin (an older run has none: its 8-bit codes are scanned, as before)
        if meta["codes"] != "pca" or not fits(index):
            raise InvalidSaveError(f"The saved search index {params_path} has 4-bit codes, which an index of "
                                   f"{meta['codes']!r} codes and {meta['metric']!r} scores never gets.")
        out.fast = FastScan.from_arrays(index, arrays["fastscan/centroids"], arrays["fastscan/codes"], out._row_lists)
        if out.fast is None:
            raise InvalidSaveError(f"The saved search index {params_path} has 4-bit codes that do not fit its index "
                                   f"({n} rows of {index.d} values).")
    out.source = (held or Path(faiss_path)) if mmap else None  # what a later save copies (see index_files)
    return out
