"""Per-input trust signals from a fitted :class:`~actclust.ActivationClustering`.

Two kinds of signal. The **surrogate** ones read the fitted clusters: how sure the surrogate
is, how much of its mass sits on the DNN's class, and whether the layers along the input's
cluster path agree with the DNN. The **neighbour** ones follow deep k-nearest-neighbours
(Papernot & McDaniel 2018): in every layer the input's ``k`` nearest training vectors vote,
and a conformal p-value, calibrated on a held-out part of the training data, says how unusual
the votes are. One **stacked** signal combines both kinds with a logistic regression fitted on
the same calibration part to tell the DNN's right predictions from its wrong ones. Neighbours are
searched per layer, each layer with its own index over its clustering vectors
(:func:`actclust.analysis.retrieval.layer_neighbours`: exact or approximate by ``search``, the calibration
rows left out), in batches:
memory ``O(batch x k)``, never ``O(test x train)``, and no copy of the training vectors.

The calibration (:func:`calibrate`) is built on first use from the fitted state's training
vectors and cached with the state; a run saved afterwards keeps it (:func:`saved_calibration`: numbers
only, the split drawn again from the state's ``random_state``), so a loaded run does not search its
calibration samples again; a run saved before any trust call builds the same one on first use. The training vectors
are split into a reference part (the neighbours) and a calibration part of ``calibration_fraction``
of them, at most :data:`MAX_CALIBRATION` samples, so calibrating costs ``MAX_CALIBRATION``
searches whatever ``n``; class labels are the true labels when ``fit`` had them, else the DNN's
predictions.
"""

from __future__ import annotations

import hashlib
import inspect
import numbers
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
from scipy.special import chdtrc, expit  # chdtrc: scipy.stats' chi2.sf, without its 0.8 s import
from tqdm.auto import tqdm

from . import surrogate
from .saved import CALIBRATION, THRESHOLDS
from ..compute import HOST
from ..exceptions import InvalidSaveError, ParameterError, TrustWarning, user_stacklevel
from ..store.vectors import chunk_rows, distances_fit_float32, iter_rows, take

if TYPE_CHECKING:  # the analyses read a fitted state and a query pass; no import at run time
    from ..state import FittedState, Query

__all__ = ["MIN_CALIBRATION", "MAX_CALIBRATION", "FALSE_ALARM_RATE", "MEANINGS", "calibrate", "calibration_possible",
           "signals", "trust_signals", "TRUST_OPTIONS"]

#: Fewest calibration samples accepted: below it p-values move in steps coarser than 0.05.
MIN_CALIBRATION = 20
#: Most calibration samples drawn: p-values then move in steps of 1e-4, and calibrating costs
#: this many neighbour searches however large the training set.
MAX_CALIBRATION = 10_000
_BATCH = 16384
_MIN_STACK = 10  # fewest calibration errors, and right predictions, to fit ``stacked_trust``
#: Share of held-out inputs a trust chip may flag wrongly: each signal's threshold is the value that
#: this share of the calibration samples falls below (the DNN's right predictions for the signals of
#: correctness, every sample for those of typicality). See :func:`false_alarm_thresholds`.
FALSE_ALARM_RATE = 0.05
#: Signals that judge whether the DNN is right: a false alarm flags a right prediction.
CORRECTNESS_SIGNALS = ("stacked_trust", "credibility", "dnn_confidence", "surrogate_dnn_agreement",
                       "surrogate_confidence", "layer_agreement")
#: Signals that judge whether the input is like the training data: a false alarm flags an ordinary input.
TYPICALITY_SIGNALS = ("ood_typicality", "knn_typicality", "cluster_typicality")
#: Each signal in a sentence, for people who read the outputs without the paper (the report, the explorer and the
#: notebook show it beside the signal; they showed only the names: an outside check). Higher is more trustworthy.
MEANINGS = {
    "stacked_trust": "How likely the DNN is right, learned on held-out samples from the signals below.",
    "dnn_confidence": "The DNN's own probability for its class.",
    "credibility": "How usual the classes of the input's nearest training samples are, layer by layer, for the "
                   "DNN's class (deep k-nearest neighbours); low: its neighbours mostly belong to other classes.",
    "surrogate_dnn_agreement": "The surrogate's probability for the DNN's class: how much the input's clusters back "
                               "the DNN's answer.",
    "surrogate_confidence": "The surrogate's probability for its own class.",
    "layer_agreement": "The share of the layers (by weight) whose cluster mostly holds the DNN's class.",
    "knn_typicality": "How close the input lies to training samples in every layer, against held-out samples; low: "
                      "unlike the training data.",
    "ood_typicality": "How close the input lies to its nearest training sample, every layer counting equally; low: "
                      "likely outside the training data.",
    "cluster_typicality": "How close the input lies to its clusters' centres, against their usual spread; low: at the "
                          "edge of its clusters.",
}


def trust_signals(state: FittedState, query: Query, *, n_neighbors: int = 50, calibration_fraction: float = 0.1,
                  layer_weights: str = "surrogate", search: str = "auto", calibration: Optional[Query] = None,
                  backend=None) -> dict:
    """Per-input trust signals of the DNN's predictions on the queried inputs.

    Parameters
    ----------
    state : FittedState
        What ``fit`` learned (``ac.state_``).
    query : Query
        A pass over the inputs with their vectors, ``ac.query(X, vectors=True)``.
    n_neighbors : int, default=50
        Neighbours per layer for the deep k-nearest-neighbour signals.
    calibration_fraction : float, default=0.1
        Share of the training vectors held out to calibrate the p-values; it must give at least
        :data:`MIN_CALIBRATION` samples, and leave at least ``n_neighbors`` as neighbours.
    layer_weights : {"surrogate", "equal"}, default="surrogate"
        How the neighbour signals weigh layers: by the surrogate's weights or equally.
        ``"equal"`` is deep k-NN as published; with ``layer_weights=None`` at fit both agree.
        On the Fashion-MNIST benchmark the surrogate's weights (learned for fidelity, nearly
        zero on ``conv1``) lift the misclassification AUROC of ``credibility`` by 0.026.
    search : {"auto", "exact", "approximate"}, default="auto"
        How the neighbours are searched (see :func:`actclust.analysis.retrieval.search`).
    calibration : Query, optional
        Held-out data to calibrate on instead of a split of the training vectors: a query with
        vectors and, for ``stacked_trust``, true labels, ``ac.query(X_val, y_val, vectors=True)``.
        Recommended: the DNN's errors on data it never trained on are what the signals must
        predict, its errors on its own training data are fewer and unlike them, and with it
        ``stacked_trust`` also weighs the DNN's confidence. Every training vector is then a
        neighbour; ``calibration_fraction`` is not used.
    backend : actclust.compute.Backend, optional
        Where the searches and distances compute (the host by default; ``ac.trust`` passes the
        estimator's ``device``).

    Returns
    -------
    dict of str to ndarray of shape (n,)
        Higher means more trustworthy for every signal (all in [0, 1]):

        - ``dnn_prediction``: the DNN's class (int), the prediction the signals judge.
        - ``dnn_confidence``: the DNN's softmax probability of its class (max-softmax; always
          present, also without labels, where no signal here is better on the benchmark).
        - ``surrogate_prediction``: the surrogate's class (int).
        - ``surrogate_confidence``: the surrogate's highest class probability.
        - ``surrogate_dnn_agreement``: the surrogate's probability of the DNN's class
          (continuous; ``1`` where every layer's cluster votes only for it).
        - ``layer_agreement``: share of the surrogate's layer weights whose layer's nearest
          cluster has the DNN's class as its majority class.
        - ``credibility``: deep k-NN p-value of the DNN's class: the share of calibration
          samples whose nonconformity (the weighted sum over layers of the neighbours whose
          label is not the sample's own) is at least the input's for the DNN's class.
        - ``dknn_prediction``: the class of highest deep k-NN p-value (int).
        - ``knn_typicality``: weighted mean over layers of the share of calibration samples lying
          at least as far from their ``k``-th nearest neighbour as the input (low far from
          the training data: out-of-distribution inputs).
        - ``ood_typicality``: the out-of-distribution signal. Per layer, the share ``p_l`` of
          calibration samples at least as far from their *nearest* training vector as the input
          (at least ``1 / (n_cal + 1)``); the layers' p-values combined by Fisher's method,
          every layer counting equally: the chi-squared survival function of ``-2 sum_l log p_l``
          with ``2L`` degrees of freedom. Nearest (not ``k``-th) and equal layers (not the
          surrogate's weights, learned for fidelity, which neglect early layers where a shift of
          the inputs shows first) lift the AUROC against noisy test images on the Fashion-MNIST
          benchmark from 0.78 to 0.91 (mean of three networks) and keep far-away digits at 0.998; chosen by
          ``benchmarks/explore_trust.py`` on the noise and digits sets themselves (there is no
          OOD data to choose on), so read those figures as the design's, not a held-out test.
        - ``cluster_typicality``: weighted mean over layers of the share of calibration samples whose
          squared distance to their nearest centre, relative to that cluster's mean over the
          reference samples, is at least the input's.
        - ``stacked_trust`` (only when ``fit`` had true labels and the calibration split holds at
          least 10 DNN errors and 10 right predictions): the probability that the DNN is right,
          from a logistic regression (standardised features, ``C=1``) fitted on the calibration
          samples, DNN right vs wrong, on: per layer, the share of the ``k`` nearest votes for the
          DNN's class, each weighted ``exp(-(d / d_k)^2)`` (``d`` the neighbour's distance,
          ``d_k`` the ``k``-th's), the log ratio of the distance to the nearest reference
          vector of another class over that to the nearest of the DNN's class, among the ``k``
          nearest (a class absent there counts at the ``k``-th distance), and the same log ratio
          of the distances to the classes' mean reference vectors (a class without reference
          vectors is left out; the DNN's class, where it has none, counts at the farthest mean);
          distances below float32's resolution, 1e-6 of the input's squared norm, count at that floor; with
          ``surrogate_dnn_agreement``, ``credibility`` and, when calibrated on held-out data
          (``calibration=``), ``log(1 - dnn_confidence)`` (confidence capped at ``1 - 1e-6``). Its features and ``k`` were chosen by
          cross-validation on the calibration split of the Fashion-MNIST benchmark
          (``benchmarks/explore_trust.py``). The ratio among the ``k`` nearest and the one to the class
          means replaced a ratio among the 200 nearest, a second, deeper search for most inputs of the
          last layers: on three networks the cross-validated AUROC on trust's own split is 0.001-0.003
          lower (0.9254-0.9316 against 0.9282-0.9329), equal within 0.0006 with held-out calibration,
          and ``explain`` takes about a quarter of a forward pass less ([speed](speed.md)).

    Without true labels for the calibration samples, or with too few DNN errors among them, a
    :class:`~actclust.TrustWarning` says which signals are unavailable or measure agreement
    rather than correctness (once per calibration; :func:`calibrate` keeps it as ``notes``).

    Raises
    ------
    ParameterError
        If the calibration split has fewer than :data:`MIN_CALIBRATION` samples, or the
        reference part fewer than ``n_neighbors``.
    """
    cal = calibrate(state, n_neighbors=n_neighbors, calibration_fraction=calibration_fraction,
                    layer_weights=layer_weights, search=search, calibration=calibration, backend=backend)
    return signals(state, cal, query)


def signals(state: FittedState, cal: "_Calibration", q: Query, backend=None) -> dict:
    """:func:`trust_signals` with the calibration already built by :func:`calibrate`; ``backend``
    (:mod:`actclust.compute`) computes the searches (by default the calibration's)."""
    if q.vectors is None:
        raise ParameterError("trust signals need the reduced vectors: make the query with vectors=True.")
    n_neighbors = cal.key[0]
    n, n_classes = q.dnn_proba.shape
    rows, pred = np.arange(n), q.dnn_pred
    comb = state.predict_proba(q.distances)
    paths = q.paths
    votes = np.stack([state.posteriors[l].argmax(1)[paths[:, i]] == pred for i, l in enumerate(state.layers)], 1)

    alpha = np.zeros((n, n_classes))
    knn_typ, clu_typ, log_p_nearest, votes_ratios = np.zeros(n), np.zeros(n), np.zeros(n), []
    for w, l in zip(cal.weights, state.layers):
        counts, kth, vr = _neighbour_stats(cal.finder(state, l, backend), cal.labels, q.vectors[l], n_neighbors,
                                           n_classes, pred)
        votes_ratios.append(vr)
        alpha += w * (n_neighbors - counts)
        knn_typ += w * _pvalue(cal.cal_kth[l], kth)
        n_cal = len(cal.cal_nearest[l])  # a p-value of 0 counts as 1 / (n_cal + 1)
        log_p_nearest += np.log(np.maximum(_pvalue(cal.cal_nearest[l], vr[2]), 1 / (n_cal + 1)))
        clu_typ += w * _pvalue(cal.cal_ratio[l], _spread_ratio(q.distances[l], cal.spread[l]))
    pvalues = _pvalue(cal.cal_alpha, _ties(alpha).ravel()).reshape(n, n_classes)
    ood_typ = chdtrc(2 * len(state.layers), -2 * log_p_nearest)  # Fisher's combination of the layers' p-values
    confidence = q.dnn_proba[rows, pred].astype(np.float64)
    stacked = {}
    if cal.stack is not None:  # after the searches: a BLAS product's spinning threads then slow none of them
        mean_ratios = [_mean_ratio(q.vectors[l], cal.class_means[l], cal.class_present, pred, backend or cal.backend)
                       for l in state.layers]
        features = _stack_features(votes_ratios, mean_ratios, comb[rows, pred], pvalues[rows, pred],
                                   confidence if cal.stack_confidence else None)
        stacked["stacked_trust"] = cal.stack.predict(features)
    return {
        "dnn_prediction": pred,
        "dnn_confidence": confidence,
        "surrogate_prediction": comb.argmax(1),
        "surrogate_confidence": comb.max(1).astype(np.float64),
        "surrogate_dnn_agreement": comb[rows, pred].astype(np.float64),
        "layer_agreement": np.einsum("nl,l->n", votes.astype(np.float64), state.weights / state.weights.sum()),
        "credibility": pvalues[rows, pred],
        "dknn_prediction": pvalues.argmax(1),
        "knn_typicality": knn_typ,
        "ood_typicality": ood_typ,
        "cluster_typicality": clu_typ,
        **stacked,
    }


def calibration_possible(state: FittedState, n_neighbors: int = 50, calibration_fraction: float = 0.1) -> bool:
    """Whether the fitted training set is large enough for :func:`trust_signals` with these parameters."""
    n = state.n_samples
    n_cal = min(round(calibration_fraction * n), MAX_CALIBRATION)
    return n_cal >= MIN_CALIBRATION and n - n_cal >= n_neighbors


@dataclass
class _Calibration:
    """What the neighbour signals need, built once per fitted state and parameters."""

    key: tuple
    weights: np.ndarray  # (n_layers,) summing to 1
    method: str  # "auto", "exact" or "approximate" neighbour search
    is_cal: np.ndarray  # (n_train,) True for the calibration rows, left out of every search
    labels: np.ndarray  # (n_train,) class of each training row (labels, else the DNN's predictions)
    cal_alpha: np.ndarray  # sorted nonconformity of the calibration samples for their own label
    cal_kth: dict  # layer -> sorted k-th neighbour distances of the calibration samples
    cal_nearest: dict  # layer -> sorted nearest neighbour distances of the calibration samples
    spread: dict  # layer -> (n_clusters,) mean squared distance of reference members to the centre
    cal_ratio: dict  # layer -> sorted distance-to-centre / spread of the calibration samples
    stack: object  # the fitted model of stacked_trust, or None
    stack_confidence: bool = False  # whether the stack takes the DNN's confidence (held-out calibration)
    notes: tuple = ()  # what is unavailable or uncalibrated, as said in the warning
    backend: object = None  # where the searches compute (actclust.compute; None: the host)
    thresholds: Optional[dict] = None  # false_alarm_thresholds() of the calibration samples
    #: kept with a saved run: it serves on any device (the one in ``key`` is where it was computed), so that a run
    #: prepared on a GPU answers with the same calibration, and the same thresholds, on a machine without one
    restored: bool = False
    #: per layer each class's mean reference vector, and which classes have reference rows (``stacked_trust``)
    class_means: Optional[dict] = None
    class_present: Optional[np.ndarray] = None

    def finder(self, state: FittedState, layer: str, backend=None):
        """``find(vectors, depth) -> (squared distances, ids)`` among the reference rows of ``layer``."""
        from .retrieval import layer_neighbours

        n_ref = int((~self.is_cal).sum())
        backend = backend or self.backend

        def find(v, depth):
            idx, d = layer_neighbours(state, layer, v, min(depth, n_ref), method=self.method, exclude=self.is_cal,
                                      backend=backend)
            return d, idx
        return find


#: The options of :func:`trust_signals` that ``explain(trust={...})``, ``prepare`` and ``report`` pass on (its
#: keyword arguments but the backend, which they give themselves): read from its signature, so that they cannot drift.
TRUST_OPTIONS = tuple(name for name, p in inspect.signature(trust_signals).parameters.items()
                      if p.kind is p.KEYWORD_ONLY and name != "backend")


def calibrate(state: FittedState, *, n_neighbors: int = 50, calibration_fraction: float = 0.1,
              layer_weights: str = "surrogate", search: str = "auto", calibration: Optional[Query] = None,
              progress: bool = False, backend=None) -> _Calibration:
    """The calibration of :func:`trust_signals` (parameters there), cached with the state; ``backend``
    (:mod:`actclust.compute`) computes its searches and distances (the host by default)."""
    k, fraction = n_neighbors, calibration_fraction
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        raise ParameterError(f"The 'n_neighbors' parameter of trust_signals must be a positive int. Got {k!r} instead.")
    k = n_neighbors = int(k)  # NumPy's ints too: faiss takes Python ints only
    if not isinstance(fraction, numbers.Real) or not 0 < fraction < 1:
        raise ParameterError("The 'calibration_fraction' parameter of trust_signals must be in (0, 1). "
                         f"Got {fraction!r} instead.")
    if layer_weights not in ("surrogate", "equal"):
        raise ParameterError("The 'layer_weights' parameter of trust_signals must be one of ['surrogate', 'equal']. "
                         f"Got {layer_weights!r} instead.")
    from .retrieval import check_search


    method = check_search(search)  # "auto" resolves per layer, by its width
    split = _held_out(state, calibration, k) if calibration is not None else _split(state, fraction, k)
    key = (int(k), float(fraction), layer_weights, method, split.digest, getattr(backend, "device", "cpu"))
    cached = state.cache.get(CALIBRATION)
    if cached is not None and (cached.key == key or cached.restored and cached.key[:5] == key[:5]):
        _warn_notes(state, cached.notes)  # a calibration saved with the run says its notes once after load too
        return cached
    labels = state.row_classes
    is_cal, pred, cal_labels = split.is_cal, split.pred, split.labels
    n_cal, n_classes = len(pred), state.n_classes
    weights = _knn_weights(state, layer_weights)
    alpha, alpha_pred, rows = np.zeros(n_cal), np.zeros(n_cal), np.arange(n_cal)
    calibration = _Calibration(key, weights, method, is_cal, labels, None, {}, {}, {}, {}, None, False, (), backend)
    cal_kth, cal_nearest, spread, cal_ratio, votes_ratios, probas = {}, {}, {}, {}, [], []
    class_means, mean_ratios, present = {}, [], None
    right = pred == cal_labels
    stackable = split.true_labels and min(right.sum(), (~right).sum()) >= _MIN_STACK
    own = {"kth": {}, "ratio": {}, "paths": {}}  # the calibration samples' own values, for the thresholds
    # The searches first, then the products (BLAS: its threads keep spinning for a while, and took a core from the
    # faiss search after them on a machine of few cores)
    for w, l in tqdm(list(zip(weights, state.layers)), desc="calibrating trust", disable=not progress, leave=False):
        counts, kth, vr = _neighbour_stats(calibration.finder(state, l), labels, split.vectors(l), k, n_classes, pred)
        votes_ratios.append(vr)
        alpha += w * (k - counts[rows, cal_labels])
        alpha_pred += w * (k - counts[rows, pred])
        cal_kth[l] = np.sort(kth)
        cal_nearest[l] = np.sort(vr[2])
        own["kth"][l] = kth
    for l in state.layers:
        v_cal = split.vectors(l)
        c = state.clusterings[l]
        d_all = _nearest(c.distances(state.train_vectors[l], backend))  # streamed over the store
        ref = ~is_cal
        sums = np.bincount(d_all[1][ref], weights=d_all[0][ref], minlength=c.n_clusters)
        sizes = np.bincount(d_all[1][ref], minlength=c.n_clusters)
        # A cluster with no reference member takes the layer's overall scale.
        spread[l] = np.where(sizes > 0, sums / np.maximum(sizes, 1), c.scale_).clip(1e-12)
        d_cal = c.distances(v_cal, backend)
        own["ratio"][l], own["paths"][l] = _spread_ratio(d_cal, spread[l]), d_cal.argmin(1)
        cal_ratio[l] = np.sort(own["ratio"][l])
        probas.append(surrogate.layer_proba(c.soft_assign_from_distances(d_cal, state.temperatures[l]),
                                            state.posteriors[l]))
        if stackable:  # stacked_trust's ratio to the class means (a pass over the store per layer)
            class_means[l], present = _class_means(state.train_vectors[l], labels, is_cal, n_classes)
            mean_ratios.append(_mean_ratio(v_cal, class_means[l], present, pred, backend))
    cal_alpha, stack, notes = np.sort(_ties(alpha)), None, []
    if not split.true_labels:
        notes.append("stacked_trust is unavailable: it learns the DNN's right from wrong predictions and needs true "
                     "labels (fit with them; in Python, also calibration=ac.query(X_val, y_val, vectors=True))")
        notes.append("credibility and dknn_prediction count neighbours by the DNN's own "
                     "predictions, not labels: they measure agreement with the training data, not correctness")
    elif min(right.sum(), (~right).sum()) < _MIN_STACK:
        more = (" (held-out data holds more errors: in Python, trust={'calibration': (X_val, y_val)}; the command "
                "line has no option for it)" if split.is_cal.any()
                else "")  # the calibration is already held-out data: only more of it helps
        notes.append(f"stacked_trust is unavailable: the calibration split holds {int((~right).sum())} DNN errors and "
                     f"{int(right.sum())} right predictions; it needs at least {_MIN_STACK} of each{more}")
    else:
        agreement = surrogate.combine(np.stack(probas), state.weights)[rows, pred].astype(np.float64)
        features = _stack_features(votes_ratios, mean_ratios, agreement, _pvalue(cal_alpha, _ties(alpha_pred)),
                                   split.confidence)
        stack = _Stack.fit(features, right)
    _warn_notes(state, notes)
    built = _Calibration(key, weights, method, is_cal, labels, cal_alpha, cal_kth, cal_nearest, spread,
                         cal_ratio, stack, split.confidence is not None, tuple(notes), backend,
                         class_means=class_means if stack is not None else None,
                         class_present=present if stack is not None else None)
    # The signals of the calibration samples themselves, from what was computed above (no search).
    comb = surrogate.combine(np.stack(probas), state.weights)
    own_signals = {
        "credibility": _pvalue(cal_alpha, _ties(alpha_pred)),
        "surrogate_confidence": comb.max(1).astype(np.float64),
        "surrogate_dnn_agreement": comb[rows, pred].astype(np.float64),
        "layer_agreement": np.stack([state.posteriors[l].argmax(1)[own["paths"][l]] == pred for l in state.layers],
                                    1).astype(np.float64) @ (state.weights / state.weights.sum()),
        "knn_typicality": sum(w * _pvalue(cal_kth[l], own["kth"][l]) for w, l in zip(weights, state.layers)),
        "ood_typicality": chdtrc(2 * len(state.layers), -2 * sum(
            np.log(np.maximum(_pvalue(cal_nearest[l], vr[2]), 1 / (n_cal + 1)))
            for l, vr in zip(state.layers, votes_ratios))),
        "cluster_typicality": sum(w * _pvalue(cal_ratio[l], own["ratio"][l]) for w, l in zip(weights, state.layers)),
    }
    if split.confidence is not None:
        own_signals["dnn_confidence"] = split.confidence
    if stack is not None:
        own_signals["stacked_trust"] = stack.predict(features)
    built.thresholds = false_alarm_thresholds(own_signals, right if split.true_labels else None,
                                              "a held-out split of the training data" if split.digest == "internal"
                                              else "held-out data")
    state.cache[CALIBRATION] = built
    state.cache[THRESHOLDS] = built.thresholds
    return built


def _knn_weights(state: FittedState, layer_weights: str) -> np.ndarray:
    """How the neighbour signals weigh the layers (summing to 1): by the surrogate's weights, or equally."""
    weights = np.asarray(state.weights if layer_weights == "surrogate" else np.ones(len(state.layers)), np.float64)
    return weights / weights.sum()


def _warn_notes(state: FittedState, notes) -> None:
    """Say what the calibration could not provide (its notes), once per fitted run however often it is calibrated."""
    message = "Trust signals: " + "; ".join(notes) + "."
    said = state.cache.setdefault("trust_warned", set())
    if notes and message not in said:
        said.add(message)
        warnings.warn(message, TrustWarning, stacklevel=user_stacklevel())


@dataclass
class _Stack:
    """The model of ``stacked_trust``: features standardised, then a logistic regression's probability that
    the DNN is right (fitted by scikit-learn, kept as its numbers so that a saved run holds it without pickle)."""

    mean: np.ndarray  # (f,) the features' means and scales on the calibration samples
    scale: np.ndarray
    coef: np.ndarray  # (f,) and the intercept
    intercept: float

    @classmethod
    def fit(cls, features: np.ndarray, right: np.ndarray) -> "_Stack":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(features)
        model = LogisticRegression(C=1.0, max_iter=3000).fit(scaler.transform(features), right)
        return cls(scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64),
                   model.coef_[0].astype(np.float64), float(model.intercept_[0]))

    def predict(self, features: np.ndarray) -> np.ndarray:
        return expit(np.einsum("nf,f->n", (features - self.mean) / self.scale, self.coef) + self.intercept)


#: What a saved run keeps of trust's calibration (arrays per layer, then for the whole run): everything but what
#: the fitted state gives again (the split, drawn from its ``random_state``; the labels; the layer weights).
_SAVED_PER_LAYER = ("cal_kth", "cal_nearest", "spread", "cal_ratio")


def saved_calibration(state: FittedState) -> Optional[tuple]:
    """``(arrays, info)`` to keep trust's calibration with a saved run: arrays named ``trust/...`` and JSON values;
    ``None`` where there is none, or it was calibrated on a held-out query (the user's data, not the run's)."""
    cal = state.cache.get(CALIBRATION)
    if cal is None or cal.key[4] != "internal":
        return None
    arrays = {"trust/cal_alpha": cal.cal_alpha.astype(np.float64)}
    for field in _SAVED_PER_LAYER:
        for l in state.layers:
            arrays[f"trust/{field}/{l}"] = np.asarray(getattr(cal, field)[l], dtype=np.float64)
    if cal.stack is not None:
        arrays.update({"trust/stack/mean": cal.stack.mean, "trust/stack/scale": cal.stack.scale,
                       "trust/stack/coef": cal.stack.coef,
                       "trust/stack/intercept": np.array([cal.stack.intercept], np.float64),
                       "trust/class_present": cal.class_present.astype(np.float64)})
        for l in state.layers:  # as computed (float32): a layer of 2,048 values and 1,000 classes takes 8 MB
            arrays[f"trust/class_means/{l}"] = cal.class_means[l].astype(np.float32)
    k, fraction, layer_weights, method, _, device = cal.key
    info = {"n_neighbors": int(k), "calibration_fraction": float(fraction), "layer_weights": layer_weights,
            "search": method, "device": str(device), "notes": list(cal.notes), "stacked": cal.stack is not None}
    return arrays, info


def restore_calibration(state: FittedState, arrays: dict, info: dict) -> None:
    """Put the calibration :func:`saved_calibration` kept back into ``state``'s cache (as :func:`calibrate` would
    build it again: the same split, drawn from the state). Raises :class:`InvalidSaveError` (or ``KeyError``,
    ``TypeError`` for missing or mistyped values) where they do not fit the state: the loader names the save.

    A ``stacked_trust`` saved before its model took the class means' ratio (runs prepared before 2026-12-05)
    is not put back, nor the threshold of its chip: trust calibrates again on first use, as for a run saved
    unprepared (the other signals' thresholds are those it will compute again)."""
    if info.get("stacked") is True and "trust/class_present" not in arrays:
        thresholds = state.cache.get(THRESHOLDS)  # put back just before: stacked_trust's was the old model's
        if thresholds is not None and "stacked_trust" in thresholds["signals"]:
            state.cache[THRESHOLDS] = {**thresholds, "signals": {k: v for k, v in thresholds["signals"].items()
                                                                 if k != "stacked_trust"}}
        return
    k, fraction, layer_weights, method = (info["n_neighbors"], info["calibration_fraction"], info["layer_weights"],
                                          info["search"])
    if not isinstance(k, int) or not isinstance(fraction, float) or layer_weights not in ("surrogate", "equal") \
            or method not in ("auto", "exact", "approximate") or not isinstance(info["device"], str):
        raise InvalidSaveError(f"trust calibration settings {info!r}")
    split = _split(state, fraction, k)
    n_cal, n_layers = len(split.pred), len(state.layers)

    def arr(name, shape):
        a = np.asarray(arrays[name], dtype=np.float64)
        if a.shape != shape or not np.isfinite(a).all():
            raise InvalidSaveError(f"{name} has shape {a.shape} (expected {shape}) or values that are not finite")
        return a

    per_layer = {field: {l: arr(f"trust/{field}/{l}", (state.clusterings[l].n_clusters,) if field == "spread"
                                else (n_cal,)) for l in state.layers} for field in _SAVED_PER_LAYER}
    stack, means, present = None, None, None
    if info["stacked"] is True:
        f = 3 * n_layers + 2
        stack = _Stack(arr("trust/stack/mean", (f,)), arr("trust/stack/scale", (f,)), arr("trust/stack/coef", (f,)),
                       float(arr("trust/stack/intercept", (1,))[0]))
        present = _reference_sizes(state.row_classes, split.is_cal, state.n_classes) > 0
        if not np.array_equal(arr("trust/class_present", (state.n_classes,)), present.astype(np.float64)):
            raise InvalidSaveError("trust/class_present does not say which classes the run's reference rows hold")
        means = {}
        for l in state.layers:
            m = arr(f"trust/class_means/{l}", (state.n_classes, state.train_vectors[l].shape[1])).astype(np.float32)
            if not np.isfinite(m).all() or not distances_fit_float32(m):  # as the store's own vectors
                raise InvalidSaveError(f"trust/class_means/{l} holds values past float32's range for distances")
            means[l] = m
    key = (k, fraction, layer_weights, method, split.digest, info["device"])
    state.cache[CALIBRATION] = _Calibration(key, _knn_weights(state, layer_weights), method, split.is_cal,
                                        state.row_classes, arr("trust/cal_alpha", (n_cal,)), per_layer["cal_kth"],
                                        per_layer["cal_nearest"], per_layer["spread"], per_layer["cal_ratio"], stack,
                                        False, tuple(str(n) for n in info["notes"]), None,
                                        state.cache.get(THRESHOLDS), restored=True, class_means=means,
                                        class_present=present)


def false_alarm_thresholds(values: dict, right: Optional[np.ndarray], source: str,
                           rate: float = FALSE_ALARM_RATE) -> dict:
    """Per signal, the value below which a trust chip turns red, from the signals of calibration samples.

    A threshold ``t`` flags at most ``rate`` of the calibration samples (``value < t``): of the DNN's right
    predictions for the signals in :data:`CORRECTNESS_SIGNALS` (of every sample without true labels),
    of every sample for those in :data:`TYPICALITY_SIGNALS`. So on held-out data like the calibration
    samples, about ``rate`` of ordinary inputs get a red chip, whatever the signal's scale. Where the lowest values
    tie (``layer_agreement`` is 0 for several), that cut would flag nothing: the threshold is then the next value
    above them, flagging the tied ones, where they are at most twice ``rate``; else the signal gets no threshold
    (a threshold of 0 left ``layer_agreement``'s chip never red: an outside check).
    """
    out = {}
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        if name in CORRECTNESS_SIGNALS and right is not None and right.any():
            v = v[right]
        v = np.sort(v[np.isfinite(v)])
        if not len(v):
            continue
        t = v[int(np.floor(rate * len(v)))]
        if t == v[0]:  # nothing lies below it
            above = v[v > t]
            if not len(above) or 1 - len(above) / len(v) > 2 * rate:
                continue
            t = above[0]
        out[name] = float(t)
    return {"false_alarm_rate": rate, "calibration": source, "n_calibration": int(len(next(iter(values.values())))),
            "right_predictions_only": right is not None, "signals": out}


@dataclass
class _Split:
    """The calibration samples: held out of the training vectors, or a separate labelled query."""

    is_cal: np.ndarray  # (n_train,) training rows left out of every neighbour search
    pred: np.ndarray  # (n_cal,) the DNN's class of each calibration sample
    labels: np.ndarray  # (n_cal,) their labels (true labels when known, else the DNN's predictions)
    true_labels: bool
    vectors: Callable  # layer -> (n_cal, d) vectors
    digest: str  # identifies the split in the cache key
    confidence: Optional[np.ndarray] = None  # (n_cal,) the DNN's probability of its class, where known


def _split(state: FittedState, fraction: float, k: int) -> _Split:
    """Trust's own split: ``fraction`` of the training vectors, at most MAX_CALIBRATION."""
    n = state.n_samples
    n_cal = min(round(fraction * n), MAX_CALIBRATION)
    if n_cal < MIN_CALIBRATION:
        need = MIN_CALIBRATION / n  # the fraction that would do, where the neighbours left are still enough
        fix = (f"raise calibration_fraction to {np.ceil(need * 100) / 100:g} or more"
               if need < 1 and n - MIN_CALIBRATION >= k else "no split of them can calibrate and keep the neighbours")
        raise ParameterError(
            f"The calibration split has {n_cal} samples (calibration_fraction={fraction} of {n} training "
            f"samples); at least MIN_CALIBRATION={MIN_CALIBRATION} are needed: {fix}. Or fit on more data, or pass "
            "held-out data as calibration" + (f" with n_neighbors at most {n} (the training samples)." if n < k else ".")
        )
    if n - n_cal < k:
        raise ParameterError(
            f"Only {n - n_cal} training samples remain as neighbours after holding out {n_cal} for "
            f"calibration; n_neighbors={k} needs at least {k}. Lower n_neighbors or calibration_fraction."
        )
    cal = np.sort(np.random.default_rng(state.random_state).permutation(n)[:n_cal])
    is_cal = np.zeros(n, dtype=bool)
    is_cal[cal] = True
    # A calibration row's duplicates (the same input twice in the training data: oversampled, augmented copies) are
    # left out of the searches too: found at distance 0, they made every calibration sample look closer to the
    # training data than a new input is, and ood_typicality flagged 46-59% of ordinary inputs where the training set
    # was repeated twice (its "5%" threshold; stacked_trust 51% of right predictions: an outside check).
    hashes = _row_hashes(state)
    is_cal |= np.isin(hashes, hashes[cal])
    if int((~is_cal).sum()) < k:
        twins = int(is_cal.sum()) - n_cal
        # most samples alike in every layer (a decision tree's one-hot outputs): no split keeps neighbours of its own
        how = ("the layers give few distinct vectors, so no split of the training set keeps neighbours: pass held-out "
               "data as calibration (trust={'calibration': (X_val, y_val)}; the command line has no option for it)"
               if twins > n_cal else "Lower n_neighbors or calibration_fraction, or pass held-out data as calibration")
        raise ParameterError(
            f"Only {int((~is_cal).sum())} training samples remain as neighbours after holding out {n_cal} for "
            f"calibration and their {twins} duplicates; n_neighbors={k} needs at least {k}. {how[0].upper() + how[1:]}.")
    labels = state.row_classes
    return _Split(is_cal, state.train_predictions[cal], labels[cal], state.train_labels is not None,
                  lambda l: take(state.train_vectors[l], cal), "internal")


def _row_hashes(state: FittedState) -> np.ndarray:
    """A 64-bit hash of each training row's vectors in every layer (their bytes): equal for the same input given twice,
    different otherwise (a collision between two different rows is as likely as between random 64-bit numbers).
    Computed once per fitted state: every call of :func:`calibrate` draws the split again (a pass over the store per
    explain call otherwise)."""
    if "row_hashes" not in state.cache:
        state.cache["row_hashes"] = _hash_rows(state)
    return state.cache["row_hashes"]


def _hash_rows(state: FittedState) -> np.ndarray:
    h = np.zeros(state.n_samples, np.uint64)
    widest = max(state.train_vectors[l].shape[1] for l in state.layers)  # float32 values: two per 64-bit word
    mult = np.random.default_rng(0x7A5).integers(1, 2 ** 63, (widest + 1) // 2, dtype=np.uint64)
    mult = mult * np.uint64(2) + np.uint64(1)  # odd: no word's bits are lost
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64, on purpose
        for l in state.layers:
            for start, rows in iter_rows(state.train_vectors[l], _BATCH):
                b = np.ascontiguousarray(rows, dtype=np.float32).view(np.uint8).reshape(len(rows), -1)
                pad = -b.shape[1] % 8
                words = np.hstack([b, np.zeros((len(b), pad), np.uint8)]).view(np.uint64) if pad else b.view(np.uint64)
                part = (words * mult[:words.shape[1]]).sum(1, dtype=np.uint64)
                h[start:start + len(rows)] = h[start:start + len(rows)] * np.uint64(0x9E3779B97F4A7C15) + part
    return h


def _held_out(state: FittedState, q: Query, k: int) -> _Split:
    """A query over held-out data (``ac.query(X_val, y_val, vectors=True)``) as the calibration."""
    if q.vectors is None:
        raise ParameterError("The calibration query needs the reduced vectors: make it with "
                             "ac.query(X_val, y_val, vectors=True).")
    if q.n < MIN_CALIBRATION:
        raise ParameterError(f"The calibration query has {q.n} samples; at least MIN_CALIBRATION={MIN_CALIBRATION} "
                             "are needed.")
    if state.n_samples < k:
        raise ParameterError(f"n_neighbors={k} needs at least {k} training samples; the fit had {state.n_samples}.")
    labels = q.labels if q.labels is not None else q.dnn_pred
    digest = hashlib.sha256(np.ascontiguousarray(q.dnn_proba).tobytes() + np.asarray(labels).tobytes()).hexdigest()
    return _Split(np.zeros(state.n_samples, dtype=bool), q.dnn_pred, np.asarray(labels), q.labels is not None,
                  lambda l: np.asarray(q.vectors[l], dtype=np.float32), digest,
                  q.dnn_proba[np.arange(q.n), q.dnn_pred].astype(np.float64))


def _stack_features(votes_ratios, mean_ratios, agreement, credibility, confidence=None):
    """``stacked_trust``'s inputs ``(n, 3L + 2)``: weighted votes per layer, the neighbours' distance ratios
    per layer, the class means' per layer, then the rest; with the DNN's confidence ``p`` (held-out
    calibration), ``log(1 - p)`` last, ``p`` capped at ``1 - 1e-6`` (a float32 softmax cannot tell closer
    to 1 apart)."""
    extra = [] if confidence is None else [np.log1p(-np.minimum(confidence, 1 - 1e-6))]
    return np.column_stack([vr[0] for vr in votes_ratios] + [vr[1] for vr in votes_ratios] + list(mean_ratios)
                           + [agreement, credibility] + extra)


def _neighbour_stats(find, train_labels, V, k, n_classes, judged):
    """Per input: neighbours of each class among its ``k`` nearest ``(n, C)``; k-th distance ``(n,)``;
    and ``(n,)`` each: for the class ``judged``, the weighted vote and distance ratio of
    ``stacked_trust`` (among the ``k`` nearest), then the nearest neighbour's squared distance.
    ``find(vectors, depth) -> (squared distances, ids)`` of the nearest reference rows."""
    n = len(V)
    counts = np.empty((n, n_classes), dtype=np.int64)
    kth, vote, ratio, nearest = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    step = chunk_rows(V.shape[1], _BATCH)  # fewer inputs at a time of a very wide layer
    for s in range(0, n, step):
        vb = np.ascontiguousarray(V[s:s + step], dtype=np.float32)
        d, idx = find(vb, k)
        d = d.astype(np.float32)
        b, labels = len(d), train_labels[idx]
        flat = (np.arange(b)[:, None] * n_classes + labels).ravel()
        counts[s:s + b] = np.bincount(flat, minlength=b * n_classes).reshape(b, n_classes)
        kth[s:s + b], nearest[s:s + b] = d[:, k - 1], d[:, 0]
        # float32 search resolves squared distances to about 1e-6 of the squared norm: below, all equal
        floor = 1e-6 * (vb.astype(np.float64) ** 2).sum(1, keepdims=True)
        r, same = np.sqrt(np.maximum(d, floor)), labels == judged[s:s + b, None]
        kernel = np.exp(-(r / (r[:, k - 1:k] + 1e-12)) ** 2)
        vote[s:s + b] = (kernel * same).sum(1) / kernel.sum(1)
        ratio[s:s + b] = _log_ratio(r, same)
    return counts, kth, (vote, ratio, nearest)


def _class_means(X, labels: np.ndarray, is_cal: np.ndarray, n_classes: int) -> tuple:
    """Each class's mean reference vector ``(C, d)`` (float32; the calibration rows left out) and whether the
    class has reference rows ``(C,)``, streamed over ``X`` (the store) a chunk at a time."""
    sums = np.zeros((n_classes, X.shape[1]))
    for start, rows in iter_rows(X, chunk_rows(n_classes, _BATCH)):  # the one-hot block is C x chunk too
        keep = np.flatnonzero(~is_cal[start:start + len(rows)])
        onehot = np.zeros((n_classes, len(keep)))
        onehot[labels[start + keep], np.arange(len(keep))] = 1
        sums += onehot @ rows[keep].astype(np.float64)  # in float64: the same sums however the rows are chunked
    sizes = _reference_sizes(labels, is_cal, n_classes)
    return (sums / np.maximum(sizes, 1)[:, None]).astype(np.float32), sizes > 0


def _reference_sizes(labels: np.ndarray, is_cal: np.ndarray, n_classes: int) -> np.ndarray:
    """Reference rows (not in the calibration split) of each class ``(C,)``."""
    return np.bincount(labels[~is_cal], minlength=n_classes)[:n_classes]


def _mean_ratio(V, means: np.ndarray, present: np.ndarray, judged: np.ndarray, backend=None) -> np.ndarray:
    """Per input of ``V``, the log of the distance to the nearest class mean of another class than ``judged``
    over that to ``judged``'s mean (:func:`_class_means`): a class without reference rows is left out, and a
    distance where there is none (the judged class's, or every other's) counts at the farthest mean; distances
    below float32's resolution count at 1e-6 of the input's squared norm, as the neighbours' ratio."""
    # both sides centred on the means' own mean: squared distances expanded in float32 (|v|^2 - 2 v.m + |m|^2) lose
    # what the offset they share takes (activations far from 0: a ratio near 0 moved by 8% of its size)
    centre = means[present].mean(0) if present.any() else np.zeros(means.shape[1], np.float32)
    V = np.asarray(V, np.float32)
    d = (backend or HOST).sq_distances(V - centre, means - centre)
    floor = 1e-6 * np.einsum("ij,ij->i", V, V, dtype=np.float64)[:, None]
    r = np.sqrt(np.maximum(d, floor))
    far = np.where(present, r, 0.0).max(1)
    rows = np.arange(len(V))
    own = np.where(present[judged], r[rows, judged], far)
    other = np.where(present, r, np.inf)
    other[rows, judged] = np.inf
    other = other.min(1)
    return np.log(np.where(np.isfinite(other), other, far) + 1e-9) - np.log(own + 1e-9)


def _log_ratio(r, same):
    """Log of the distance to the nearest neighbour of another class over that to the nearest of the
    judged class, among the neighbours ``r`` (sorted); a class absent counts at the last distance."""
    near = [np.minimum(np.where(m, r, np.inf).min(1), r[:, -1]) for m in (same, ~same)]
    return np.log(near[1] + 1e-9) - np.log(near[0] + 1e-9)


def _nearest(d):
    """Squared distance to the nearest centre and its index, from ``(n, n_clusters)`` distances."""
    nearest = d.argmin(1)
    return d[np.arange(len(d)), nearest].astype(np.float64), nearest


def _spread_ratio(distances, spread):
    nearest = distances.argmin(1)
    return distances[np.arange(len(distances)), nearest] / spread[nearest]


def _ties(alpha):
    # Weighted sums of equal counts in another order may differ in the last bit; equal they are.
    return np.round(alpha, 9)


def _pvalue(sorted_calibration, values):
    """Share of calibration values at least as large as each value (higher = more typical)."""
    above = len(sorted_calibration) - np.searchsorted(sorted_calibration, values, side="left")
    return above / len(sorted_calibration)

