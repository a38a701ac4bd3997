"""``ActivationClustering``: distil a PyTorch classifier into a clustering surrogate."""

from __future__ import annotations

import time
import warnings
from typing import Mapping, Optional

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from . import surrogate
from ._capture import Capture
from ._query import Query, run_query
from ._params import per_layer, validate_params
from ._data import Batches, Collector
from .clustering import make_clustering
from .exceptions import NotFittedError
from .reduction import make_reducer, normalized

__all__ = ["ActivationClustering"]


class ActivationClustering:
    """Explain a classifier by clustering the activations of some of its layers.

    Parameters
    ----------
    model : torch.nn.Module
        A trained classifier whose ``forward`` returns logits of shape ``(N, n_classes)``.
    layers : list of str
        ``named_modules()`` names of the layers to cluster; see :func:`actclust.list_layers`.
    n_clusters : int or dict, default=15
        Clusters per layer (at least 2), or a dict ``layer -> int``.
    reducer : str, Reducer or dict, default="mean"
        How a layer's ``(N, C, ...)`` map becomes one vector per sample: ``"mean"``, ``"max"``,
        ``"grid:g"``, ``"pca:d"``, ``"random:d"`` (see :mod:`actclust.reduction`), or a dict
        ``layer -> reducer``. Dense ``(N, F)`` outputs pass through.
    normalize : {"l2", None}, default="l2"
        Scale each reduced vector to unit length before clustering (cluster by direction).
    posterior : {"prediction", "label"}, default="prediction"
        Class mix of each cluster taken from the DNN's predictions (distillation) or from the
        true labels (the paper's choice; needs ``y``).
    layer_weights : None, list, dict or "fit", default=None
        ``None`` weighs layers equally; ``"fit"`` learns non-negative weights on a held-out
        ``validation_fraction`` of the training data to maximise agreement with the DNN.
    temperature : float, default=0.0
        Soft-assignment temperature, relative to each layer's mean squared distance to the
        nearest centre; ``0`` is hard assignment. Unused by ``clustering="distill"``, which
        learns one temperature per layer.
    smoothing : float, default=1.0
        Pseudo-count pulling each cluster's class mix toward the overall class mix.
    clustering : {"kmeans", "distill", "idec"}, default="kmeans"
        ``"kmeans"``: k-means per layer. ``"distill"``: k-means, then centres, per-layer
        temperatures and (with ``layer_weights="fit"``) layer weights refined jointly by gradient
        descent so the surrogate matches the DNN's predicted distribution, with a k-means term
        that keeps clusters compact (:mod:`actclust._distill`). ``"idec"``: the paper's deep
        embedded clustering (:mod:`actclust._idec`).
    validation_fraction : float, default=0.2
        Share of the training data held out to learn ``layer_weights="fit"``.
    batch_size : int, default=256
    random_state : int, default=0
    progress : bool, default=True
        Show progress bars on passes over the data.

    Attributes
    ----------
    layers_ : list of str
    n_classes_ : int
    n_samples_fit_ : int
    input_shape_ : tuple
        Shape of one training input; inputs of another shape are refused.
    clusterings_ : dict of str to Clustering
    posteriors_ : dict of str to ndarray of shape (n_clusters, n_classes)
    weights_ : ndarray of shape (n_layers,), summing to 1
    train_vectors_ : dict of str to ndarray of shape (n_samples, d)
    train_predictions_ : ndarray of shape (n_samples,)
    train_labels_ : ndarray of shape (n_samples,) or None
    train_score_ : dict
        :meth:`score` on the training data (in-sample), computed during ``fit`` at no extra pass.
    fit_info_ : dict
        Timings of the fit stages and the sizes of empty clusters.

    Examples
    --------
    >>> import torch, actclust
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x = torch.randn(200, 4)
    >>> ac = actclust.ActivationClustering(net, layers=["0", "2"], n_clusters=4, progress=False)
    >>> ac.fit(x).score(x)["fidelity"] > 0.3
    True
    """

    def __init__(
        self, model: nn.Module, layers, *, n_clusters=15, reducer="mean", normalize="l2", posterior="prediction",
        layer_weights=None, temperature=0.0, smoothing=1.0, clustering="kmeans",
        validation_fraction=0.2, batch_size=256, random_state=0, progress=True,
    ):
        self.model = model
        self.layers = layers
        self.n_clusters = n_clusters
        self.reducer = reducer
        self.normalize = normalize
        self.posterior = posterior
        self.layer_weights = layer_weights
        self.temperature = temperature
        self.smoothing = smoothing
        self.clustering = clustering
        self.validation_fraction = validation_fraction
        self.batch_size = batch_size
        self.random_state = random_state
        self.progress = progress

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None) -> "ActivationClustering":
        """Capture the layers on ``X``, cluster them and build the surrogate.

        Parameters
        ----------
        X : ndarray, Tensor, Dataset or DataLoader
            Training inputs, in a fixed order; items may be ``(input, label)`` tuples.
        y : array-like of int, optional
            True labels; required for ``posterior="label"`` unless ``X`` yields them.
        """
        validate_params(self)
        for cache in [key for key in vars(self) if key.endswith("_cache")]:
            del self.__dict__[cache]  # results derived from an earlier fit
        layers = list(self.layers)
        n_clusters = per_layer(self.n_clusters, "n_clusters", layers)
        reducers = {l: make_reducer(s, self.random_state) for l, s in
                    per_layer(self.reducer, "reducer", layers).items()}
        batches = Batches(X, batch_size=self.batch_size, y=y, name="X")
        for name, k in n_clusters.items():
            if batches.n_samples is not None and k > batches.n_samples:
                raise ValueError(
                    f"n_clusters for layer {name!r} is {k}, more than the {batches.n_samples} "
                    "samples to cluster; use at most as many clusters as samples."
                )
        info: dict = {}
        t0 = time.perf_counter()
        fitted = [l for l, r in reducers.items() if r.needs_fit]
        if fitted:
            self._run(batches, {l: reducers[l].partial_fit for l in fitted}, "fitting reducers",
                      lambda *args: None)
            for l in fitted:
                reducers[l].finish_fit()
        t1 = time.perf_counter()
        logits_pred, dnn_proba, vectors, labels, n_classes = self._capture_all(batches, self._hooked(reducers))
        t2 = time.perf_counter()
        n = len(logits_pred)
        too_many = {l: k for l, k in n_clusters.items() if k > n}
        if too_many:
            raise ValueError(f"n_clusters {too_many} exceed the {n} samples to cluster.")
        if labels is not None:
            bad = np.unique(labels[(labels < 0) | (labels >= n_classes)])
            if bad.size:
                raise ValueError(
                    f"y has classes the model does not have: {bad[:10].tolist()}; the model "
                    f"outputs {n_classes} classes, so labels must be in 0..{n_classes - 1}."
                )
        if self.posterior == "label" and labels is None:
            raise ValueError(
                "posterior='label' needs the true labels: pass y to fit, or data that yields "
                "(input, label) pairs. Or use posterior='prediction'."
            )
        targets = labels if self.posterior == "label" else logits_pred

        clusterings = {l: self._cluster(l, n_clusters[l], vectors[l]) for l in layers}
        refined = self._refine(layers, vectors, clusterings, dnn_proba, targets) if self.clustering == "distill" else None
        assign = {l: clusterings[l].soft_assign(vectors[l], self._temperature(clusterings[l])) for l in layers}
        t3 = time.perf_counter()
        weights = refined.weights if refined is not None else self._fit_weights(layers, assign, targets, n_classes)
        posteriors = {l: surrogate.fit_posteriors(assign[l], targets, n_classes, self.smoothing) for l in layers}
        t4 = time.perf_counter()
        # In-sample scores from the assignments already at hand: no second pass over the data.
        self.train_score_ = surrogate.scores(logits_pred, np.stack([assign[l] @ posteriors[l] for l in layers]),
                                    labels, weights, layers)

        self.layers_ = layers
        self.n_classes_ = n_classes
        self.n_samples_fit_ = n
        self.reducers_ = reducers
        self.clusterings_ = clusterings
        self.posteriors_ = posteriors
        self.weights_ = weights
        self.train_vectors_ = vectors
        self.train_predictions_ = logits_pred
        self.train_labels_ = labels
        info.update(
            seconds_reducer_fit=t1 - t0, seconds_capture=t2 - t1, seconds_clustering=t3 - t2,
            seconds_surrogate=t4 - t3, seconds_total=t4 - t0,
            empty_clusters={l: int((c.cluster_sizes_ == 0).sum()) for l, c in clusterings.items()},
        )
        if refined is not None:
            info["distill"] = {"loss_history": refined.loss_history, "spread_ratio": refined.spread_ratio,
                               "converged": refined.converged, "seconds": refined.seconds,
                               "temperatures": {l: clusterings[l].temperature_ for l in layers}}
        self.fit_info_ = info
        return self

    def _cluster(self, layer: str, k: int, vectors: np.ndarray):
        """Fit one layer's clustering; its warnings (e.g. no convergence) name the layer."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clustering = make_clustering(self.clustering, k, self.random_state).fit(vectors)
        for w in caught:
            warnings.warn(f"layer {layer!r}: {w.message}", w.category, stacklevel=3)
        return clustering

    def _refine(self, layers, vectors, clusterings, dnn_proba, targets):
        """``clustering="distill"``: refine centres, temperatures (and weights) toward the DNN."""
        from ._distill import refine

        learn = isinstance(self.layer_weights, str)  # "fit", checked in validate_params
        fixed = None if self.layer_weights is None or learn else self._fit_weights(layers, None, None, None)
        result = refine(vectors, clusterings, dnn_proba, learn_weights=learn, weights=fixed,
                        smoothing=self.smoothing, targets=targets, random_state=self.random_state)
        for l in layers:
            clusterings[l].set_refined(vectors[l], result.centers[l], result.temperatures[l])
        return result

    def _temperature(self, clustering) -> float:
        """A refined clustering carries its own learned temperature; others use the parameter."""
        return getattr(clustering, "temperature_", self.temperature)

    def _fit_weights(self, layers, assign, targets, n_classes) -> np.ndarray:
        lw = self.layer_weights
        if lw is None:
            return np.full(len(layers), 1.0 / len(layers))
        if isinstance(lw, str):  # "fit", checked in validate_params
            rng = np.random.default_rng(self.random_state)
            order = rng.permutation(len(targets))
            n_val = max(1, int(round(self.validation_fraction * len(targets))))
            val, train = order[:n_val], order[n_val:]
            probas = np.stack([
                assign[l][val] @ surrogate.fit_posteriors(assign[l][train], targets[train], n_classes, self.smoothing)
                for l in layers
            ])
            return surrogate.fidelity_weights(probas, targets[val], random_state=self.random_state)
        w = np.asarray([lw[l] for l in layers] if isinstance(lw, Mapping) else lw, dtype=np.float64)
        return w / w.sum()

    def _hooked(self, reducers) -> dict:
        return {l: normalized(r, self.normalize) for l, r in reducers.items()}

    # ------------------------------------------------------------------ passes
    def _run(self, batches: Batches, reducers, desc: str, on_batch) -> None:
        """Call ``on_batch(logits, reduced, y)`` per batch, hooks on only for this pass."""
        total = None if batches.n_samples is None else -(-batches.n_samples // batches.batch_size)
        with Capture(self.model, reducers) as cap:
            for x, y in tqdm(batches, total=total, desc=desc, disable=not self.progress, leave=False):
                logits, out = cap.run(x)
                on_batch(logits, out, None if y is None else y.numpy(), x)

    def _capture_all(self, batches, reducers):
        col, width, has_y = Collector(batches.n_samples), [], []

        def on_batch(logits, out, y, x):
            if not width:
                self.input_shape_ = tuple(x.shape[1:])
            width.append(logits.shape[1])
            col.add("pred", logits.argmax(1).numpy())
            col.add("proba", logits.float().softmax(1).numpy())
            for l, v in out.items():
                col.add(l, v.numpy())
            has_y.append(y is not None)
            if y is not None:
                col.add("y", y.astype(np.int64))

        self._run(batches, reducers, "capturing activations", on_batch)
        labels = col.get("y") if all(has_y) else None
        return col.get("pred"), col.get("proba"), {l: col.get(l) for l in reducers}, labels, width[0]

    def _query(self, X, y=None, *, keep_vectors: bool = False) -> Query:
        """One pass over X: DNN outputs and per-layer distances (and vectors); see :mod:`actclust._query`."""
        self._check_fitted()
        return run_query(self, X, y, keep_vectors)

    def _layer_probas(self, q: Query) -> np.ndarray:
        """Per-layer class distributions ``(L, n, C)`` of the queried inputs."""
        return np.stack([
            self.clusterings_[l].soft_assign_from_distances(q.distances[l], self._temperature(self.clusterings_[l]))
            @ self.posteriors_[l]
            for l in self.layers_
        ])

    # ------------------------------------------------------------------ public results
    def predict_proba(self, X) -> np.ndarray:
        """Surrogate class probabilities ``(n, n_classes)``; rows sum to 1."""
        return surrogate.combine(self._layer_probas(self._query(X)), self.weights_)

    def predict(self, X) -> np.ndarray:
        """Surrogate class predictions ``(n,)``."""
        return self.predict_proba(X).argmax(1)

    def cluster_paths(self, X) -> np.ndarray:
        """Cluster id ``(n, n_layers)`` of each input at each layer (nearest centre)."""
        return self._query(X).paths

    def score(self, X, y=None) -> dict:
        """Fidelity (agreement with the DNN) and, with labels, accuracy; combined and per layer.

        Returns
        -------
        dict
            ``{"n": int, "fidelity": float, "accuracy": float or None, "dnn_accuracy": float or None,
            "per_layer": {layer: {"fidelity": float, "accuracy": float or None}}}``
        """
        q = self._query(X, y)
        return surrogate.scores(q.dnn_pred, self._layer_probas(q), q.labels, self.weights_, self.layers_)

    def _check_fitted(self) -> None:
        if not hasattr(self, "posteriors_"):
            raise NotFittedError(
                "This ActivationClustering is not fitted yet. Call 'fit' with training data "
                "(or actclust.load a saved run) before using this method."
            )

    def similar(self, X, k: int = 10, weights="equal"):
        """The ``k`` training samples most similar to each input, by exact search over all layers.

        Parameters
        ----------
        X : ndarray, Tensor, Dataset or DataLoader
        k : int, default=10
        weights : {"equal", "low", "high"}, list or dict, default="equal"
            Per-layer weights of the distance; ``"low"`` favours early layers (looks alike),
            ``"high"`` late ones (means alike). Each layer's distances are first divided by the
            mean squared distance between two training samples in that layer, so layers are
            comparable; see :mod:`actclust.retrieval` for the exact definitions.

        Returns
        -------
        Neighbours
            ``indices`` (n, k) into the training data, ``distances`` (n, k), ``layer_shares``
            (n, k, n_layers): each layer's share of each distance.
        """
        from .retrieval import similar

        return similar(self, X, k, weights)

    def concepts(self, layer: str, k: int = 10, n_edge: int = 3) -> list:
        """One :class:`~actclust.concepts.Concept` per cluster of ``layer``: its size, class mix,
        purity, the ``k`` training samples nearest its centre and the ``n_edge`` furthest ones."""
        from .concepts import concepts

        return concepts(self, layer, k, n_edge)

    def explain(self, X, y=None, *, k: int = 5, class_names=None, trust=None) -> list:
        """One :class:`~actclust.explanation.Explanation` per input of ``X``.

        ``k`` similar training samples are given under "low" and "high" weights, and ``k``
        exemplars of each cluster on the input's path. ``trust=True`` adds the trust signals
        (:meth:`trust`); the default ``None`` adds them when the training set is large enough
        to calibrate them, ``False`` never.
        """
        from .explanation import explain

        return explain(self, X, y, k=k, class_names=class_names, trust=trust)

    def _trust_from_query(self, q) -> dict:
        from .trust import trust_signals

        return trust_signals(self, None, query=q)

    def trust(self, X) -> dict:
        """Per-input trust signals; see :func:`actclust.trust.trust_signals`."""
        from .trust import trust_signals

        return trust_signals(self, X)

    def save(self, path, *, overwrite: bool = False, metadata: Optional[dict] = None) -> None:
        """Save the fitted explainer to directory ``path`` atomically; see :func:`actclust.load`.

        An existing run at ``path`` is replaced only with ``overwrite=True``; a directory that
        holds anything else is never written into. ``metadata`` is kept in the manifest.
        """
        from .persistence import save

        save(self, path, overwrite=overwrite, metadata=metadata)

    def __repr__(self) -> str:
        return (f"ActivationClustering(layers={self.layers!r}, n_clusters={self.n_clusters!r}, "
                f"reducer={self.reducer!r}, posterior={self.posterior!r}, layer_weights={self.layer_weights!r})")
