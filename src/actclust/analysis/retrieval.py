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
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np

from ..compute import HOST
from ..exceptions import ParameterError, SearchWarning
from ..store.vectors import chunk_rows, iter_rows
from .indexes import TARGET_RECALL, ApproximateIndex, Index, SavedFile, index_files, keep_on_disk, load_index

if TYPE_CHECKING:  # the analyses read a fitted state and a query pass; no import at run time
    from ..state import FittedState, Query

__all__ = ["Neighbours", "layer_weights", "check_args", "search", "search_by_class", "check_search", "resolve_search",
           "WEIGHT_PRESETS", "SEARCH_NAMES", "AUTO_EXACT_ROWS", "search_many", "layer_neighbours", "layer_stats",
           "layer_scales", "Index", "ApproximateIndex", "saved_index_files", "attach_saved_indexes", "prepare"]

WEIGHT_PRESETS = ("equal", "low", "high")
SEARCH_NAMES = ("auto", "exact", "approximate")
#: ``search="auto"`` searches exactly while the training set has fewer rows than this (on the host). With
#: the IVF index of float32 codes the approximate search was 5-26x faster per query than the exact one at
#: every size measured on Fashion-MNIST, 2,000 to 60,000 rows, one layer (trust: 32 or 128 floats, 200
#: neighbours) or all (266 floats, 5 neighbours); below 2,000 rows an index build is not worth it.
AUTO_EXACT_ROWS = 2_000


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
        elif isinstance(weights, (list, tuple, np.ndarray)):
            values = list(np.ravel(weights)) if isinstance(weights, np.ndarray) else list(weights)
        else:  # None, a number: not iterable (a bare TypeError said so)
            raise ParameterError(f"weights must be one of {list(WEIGHT_PRESETS)}, a list or a dict of per-layer "
                                 f"weights. Got {weights!r} instead.")
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
        for _, x in iter_rows(v, chunk_rows(2 * v.shape[1])):  # float64 copies: half the rows of float32
            x = x.astype(np.float64)
            total += x.sum(0)
            total_sq += (x * x).sum(0)
        n = max(len(v), 1)
        out[l] = (total / n, max(2.0 * float((total_sq / n - (total / n) ** 2).clip(0).sum()), 1e-12))
    return out


def layer_scales(train_vectors: Mapping) -> dict:
    """The scale of :func:`layer_stats` alone, per layer."""
    return {l: s for l, (_, s) in layer_stats(train_vectors).items()}


def check_search(search) -> str:
    """``search`` itself, if it names a search method."""
    if search not in SEARCH_NAMES:
        raise ParameterError(f"The 'search' parameter must be one of {list(SEARCH_NAMES)}. Got {search!r} instead.")
    return search


def resolve_search(search, n: int, width: int, backend=None) -> str:
    """``"exact"`` or ``"approximate"`` for ``search``. ``"auto"``: exact below ``AUTO_EXACT_ROWS`` training
    rows on the host, and always exact on a device (``backend.on_device``): chunked matrix products there (the
    approximate index is faiss on the host; a GPU index, faiss' or cuVS', has not been measured against them: no
    GPU was available). ``width`` is kept for callers."""
    if check_search(search) == "auto":
        if backend is not None and backend.on_device:
            return "exact"
        return "exact" if n < AUTO_EXACT_ROWS else "approximate"
    return search


def check_args(state: FittedState, k, weights) -> tuple:
    """``(k, weights)`` checked against the fitted state: an int k in 1..n_train, weights resolved."""
    w = layer_weights(weights, state.layers)
    n_train = state.n_samples
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= n_train:
        raise ParameterError(f"k must be an int between 1 and the {n_train} training samples. Got {k!r} instead.")
    return int(k), w


def search(state: FittedState, query: Query, k: int, weights: np.ndarray, *, method: str = "auto",
           progress: bool = False, backend=None) -> Neighbours:
    """The ``k`` training samples nearest each input of ``query`` (a pass with ``vectors=True``),
    under per-layer ``weights`` (from :func:`check_args`), by ``method`` (``"exact"``,
    ``"approximate"`` or ``"auto"``), computed by ``backend`` (:mod:`actclust.compute`; the host by
    default); see :meth:`ActivationClustering.similar`."""
    if query.vectors is None:
        raise ParameterError("similar-sample search needs the reduced vectors: make the query with vectors=True.")
    index = _searching(state, method, [weights], True, progress, backend=backend)
    part = {l: query.vectors[state.retrieval_key(l)] for l in state.layers}
    idx, dist, shares = index.search(part, k, weights, progress)
    return Neighbours(indices=idx, distances=dist, layer_shares=shares, weights=weights)


def search_many(state: FittedState, query: Query, k: int, weights: dict, *, method: str = "auto",
                progress: bool = False, backend=None, shares: bool = True) -> dict:
    """:func:`search` for several weightings (``name -> weights``) at once: one pass over the store
    (exact), or one search whose candidates each weighting re-ranks exactly (approximate; calibrated
    for recall@10 >= 0.97 of every weighting). ``name -> Neighbours``; with ``shares=False`` their
    ``layer_shares`` are ``None`` (and an index whose scores are exact distances searches each
    weighting alone, reading no training row: see :meth:`Index.search_many`)."""
    if query.vectors is None:
        raise ParameterError("similar-sample search needs the reduced vectors: make the query with vectors=True.")
    index = _searching(state, method, list(weights.values()), shares, progress, backend=backend)
    part = {l: query.vectors[state.retrieval_key(l)] for l in state.layers}
    found = index.search_many(part, k, list(weights.values()), progress, shares=shares)
    return {name: Neighbours(indices=i, distances=d, layer_shares=s, weights=w)
            for (name, w), (i, d, s) in zip(weights.items(), found)}


def prepare(state: FittedState, weights: list, *, method: str = "auto", shares: bool = True, progress: bool = False,
            backend=None) -> None:
    """Build now the similar-sample index that :func:`search_many` of these ``weights`` (with ``shares``) would
    build on first use, calibrated for each: an approximate index is then saved with the run (nothing to build
    for an exact search)."""
    _searching(state, method, weights, shares, progress, backend=backend)


def search_by_class(state: FittedState, query: Query, classes: np.ndarray, k: int, weights: np.ndarray, *,
                    progress: bool = False, backend=None) -> np.ndarray:
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
    labels = state.row_classes
    index = _index(state, "exact", progress, backend=backend)  # a filtered approximate search can miss a small class altogether
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
                     exclude=None, progress: bool = False, backend=None):
    """The ``k`` training rows nearest ``vectors`` in one layer alone (its clustering vectors), by
    ``method``, leaving out the rows where the boolean mask ``exclude`` is true: ``(ids (n, k),
    squared distances (n, k))``, nearest first. Each layer has its own index (built on first use)."""
    index = _searching(state, method, [np.ones(1)], False, progress, space=layer, backend=backend)
    idx, dist, _ = index.search({layer: vectors}, k, np.ones(1), exclude=exclude, shares=False)
    return idx, dist.astype(np.float64) * index.scales[0]


def _searching(state: FittedState, method: str, weights: list, shares: bool, progress: bool = False,
               space: str = "retrieval", backend=None) -> Index:
    """The index that searches ``weights`` (as :meth:`Index.search_many` with ``shares``) in ``space``: that
    of :func:`_index`, unless ``method`` is ``"auto"`` and the approximate index cannot reach recall@10
    :data:`~actclust.analysis.indexes.TARGET_RECALL` for them (calibrated on first use; a layer of nearly
    flat spectrum leaves principal-component codes far from its distances): then the exact one, which is
    right (calibration has by then probed every list, with 64x the candidates re-ranked). Either way a
    :class:`SearchWarning` says so, once per index and weighting. With ``"auto"``, the exact index also where
    the approximate one reaches the target only by probing most of its lists of whole-row codes
    (:meth:`ApproximateIndex.scans_most`): exact answers, sooner, nothing to warn about."""
    index = _index(state, method, progress, space, backend)
    if not isinstance(index, ApproximateIndex):
        return index
    recall = index.calibrated_recall(weights, shares)
    if recall >= TARGET_RECALL:
        # probing most lists of whole-row codes reads about what the exact search reads, which is faster (matrix
        # products): the exact answers, sooner
        return _index(state, "exact", progress, space, backend) if method == "auto" and index.scans_most(
            weights, shares) else index
    where = "similar-sample search" if space == "retrieval" else f"the neighbour search of layer {space!r}"
    fallback = method == "auto"
    said = state.cache.setdefault("search_warned", set())
    key = (space, tuple(tuple(np.round(np.asarray(w, np.float64), 12)) for w in weights), shares)
    if key not in said:
        said.add(key)
        warnings.warn(f"The approximate index of {where} reaches recall@10 {recall:.3f} at most on this data "
                      f"(target {TARGET_RECALL}, {index.codes} codes of {index.d} values): "
                      + ("searching exactly instead." if fallback else
                         "its neighbours are approximate; search='exact' (or 'auto') finds the exact ones."),
                      SearchWarning, stacklevel=4)
    return _index(state, "exact", progress, space, backend) if fallback else index


def _vectors(state: FittedState, space: str) -> dict:
    return ({l: state.train_vectors[state.retrieval_key(l)] for l in state.layers} if space == "retrieval"
            else {space: state.train_vectors[state.check_layer(space)]})


def _index(state: FittedState, method: str, progress: bool = False, space: str = "retrieval", backend=None) -> Index:
    """The exact or approximate index of a fitted state, built on first use (or read back from its saved
    run) and cached with it: over every layer's retrieval vectors (spatial summaries where stored) for
    ``space="retrieval"``, or over one layer's clustering vectors for ``space=layer``."""
    backend = backend or HOST
    vectors = _vectors(state, space)
    method = resolve_search(method, state.n_samples, sum(v.shape[1] for v in vectors.values()), backend)
    cache = state.cache.setdefault("retrieval", {})
    # the approximate index is faiss on the host; an exact one is kept per backend (rows may live on its device)
    where = f"{backend.name}:{backend.device}" if method == "exact" else "host"
    if (space, method, where) not in cache:
        saved = state.cache.get("saved_indexes", {}).get(space) if method == "approximate" else None
        if saved is not None:
            cache[space, method, where] = load_index(vectors, *saved)
        else:
            if (space, "stats") not in cache:
                cache[space, "stats"] = layer_stats(vectors)
            stats = cache[space, "stats"]
            if method == "exact":
                cache[space, method, where] = Index(vectors, stats, progress, backend)
            else:
                index = cache[space, method, where] = ApproximateIndex(vectors, stats, state.random_state, progress)
                store = getattr(state.train_vectors, "directory", None)
                if store is not None:  # a disk store's indexes live beside it, mapped, not in the process's memory
                    keep_on_disk(index, store)
    return cache[space, method, where]


def _token(state: FittedState, space: str) -> str:
    """A file-name token for an index space: ``retrieval``, or ``l<position>`` of a layer."""
    return "retrieval" if space == "retrieval" else f"l{state.layers.index(space)}"


def saved_index_files(state: FittedState) -> dict:
    """The approximate indexes built so far, as files to keep with a saved run (``files=`` of
    :func:`actclust.io.persistence.save`): each is then read back memory-mapped, not rebuilt."""
    files, opened = {}, set()
    for key, index in state.cache.get("retrieval", {}).items():
        if len(key) == 3 and key[1] == "approximate":
            files.update(index_files(index, _token(state, key[0])))
            opened.add(key[0])
    # those a loaded run holds but has not opened yet: copied as they are (a run loaded and saved again keeps them)
    for space, paths in state.cache.get("saved_indexes", {}).items():
        if space not in opened:
            files.update({f"index_{_token(state, space)}-{{sha}}.{p.path.name.rsplit('.', 1)[1]}": _copy_of(p)
                          for p in paths})
    return files


def _copy_of(file: SavedFile):
    """``write -> None`` streaming a loaded run's ``file`` (a ``files=`` entry of a save)."""
    def copy(write):
        with open(file.reading(), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                write(block)
    return copy


def attach_saved_indexes(state: FittedState, path, names) -> None:
    """Tell ``state`` where the indexes saved with its run are (``names``: the run's attached index files,
    already checked against their SHA-256): each is opened now and memory-mapped on first use."""
    from pathlib import Path

    tokens = {_token(state, space): space for space in ["retrieval", *state.layers]}
    found: dict = {}
    for name in names:
        token, suffix = name.split("_", 1)[1].split("-")[0], name.rsplit(".", 1)[1]
        if token in tokens:  # opened now: read on first use as loaded, whatever later saves do to the folder
            found.setdefault(tokens[token], {})[suffix] = SavedFile(Path(path) / name)
    state.cache["saved_indexes"] = {space: (f["faiss"], f["safetensors"]) for space, f in found.items()
                                    if {"faiss", "safetensors"} <= set(f)}
