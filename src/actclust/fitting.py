"""The fit pipeline: capture -> reduce -> cluster -> surrogate, as one function of a checked config.

:func:`fit` runs what ``ActivationClustering.fit`` asks: an optional pass that fits reducers
(``pca:d``), the capture pass that writes every training vector to the store, a clustering per
layer (and, for methods that refine jointly toward the DNN, their refinement: the registry says
which, :class:`actclust.clustering.Clustering`), the layer weights and the class mixes; it returns
the :class:`~actclust.state.FittedState`. A fit that fails leaves no store behind and changes
nothing. The capture pass runs here, or on Ray (:mod:`actclust.engines.ray`); everything after it
is the same code.
"""

from __future__ import annotations

import inspect
import time
import warnings

import numpy as np
from tqdm.auto import tqdm

from .analysis import surrogate
from .capture import passes
from .capture.data import Batches, check_label_range
from .clustering import CLUSTERINGS, make_clustering
from .compute import HOST, backend_for
from .deps import require
from .exceptions import (ActClustError, ActClustWarning, ConvergenceWarning, DataError, DataWarning, ParameterError,
                         user_stacklevel)
from .state import SUMMARY_SUFFIX, FittedState
from .store import StoreWriter
from .validation import FitConfig

__all__ = ["fit", "batches"]

_SCORE_CHUNK = 65536


def batches(config: FitConfig, X, y=None, name: str = "X") -> Batches:
    """``X`` (and ``y``) as the batches of a local pass."""
    from .engines.ray import is_dataset

    if is_dataset(X):
        raise DataError("X is a ray.data.Dataset: fit it with engine='ray' (the other methods take one "
                        "whatever the engine).")
    return Batches(X, batch_size=config.batch_size, y=y, name=name, label_key=config.label_key)


def fit(adapter, config: FitConfig, X, y=None, backend=None) -> FittedState:
    """Fit ``config`` on the model of ``adapter`` and the data ``X`` (``y``): the fitted state. ``backend``
    (:mod:`actclust.compute`) computes the clusterings; by default that of ``config.device``."""
    method = CLUSTERINGS[config.clustering]
    for module in method.requires:
        require(module, f"clustering={config.clustering!r}")
    backend = backend or backend_for(config.device, getattr(adapter, "device", None))
    if config.engine == "ray":
        return _fit_ray(adapter, config, X, y, method, backend)
    data = batches(config, X, y)
    _check_cluster_counts(config, data.n_samples)
    if data.unlabelled:  # said now, not after the capture pass
        _check_labels(config, None)
    t0 = time.perf_counter()
    fitted = [l for l, r in config.reducers.items() if r.needs_fit]
    if fitted:
        for _ in passes.run(adapter, data, {l: config.reducers[l].partial_fit for l in fitted},
                            desc="fitting reducers", progress=config.progress):
            pass
        for l in fitted:
            config.reducers[l].finish_fit()
    t1 = time.perf_counter()
    # Vectors go to the store while capturing; leaving this block by an error removes them.
    with StoreWriter(config.store, config.store_dtype, data.n_samples) as writer:
        captured = passes.capture(
            adapter, data, passes.hooked(config.reducers, config.normalize, config.spatial_grid,
                                         random_state=config.random_state),
            writer, keep_proba=method.refines, progress=config.progress)
        vectors = writer.finish()
        state = learn(config, method, vectors, captured, times=(t0, t1, time.perf_counter()), backend=backend)
        writer.commit()
    return state


def _fit_ray(adapter, config: FitConfig, X, y, method, backend) -> FittedState:
    """``fit`` with the capture pass on Ray (:mod:`actclust.engines.ray`); the rest is the local code."""
    from .engines import ray

    t0 = time.perf_counter()
    run = ray.Pass(ray.RayConfig.of(config), adapter, X, y, reducers=config.reducers)
    _check_cluster_counts(config, run.n)
    with StoreWriter(config.store, config.store_dtype, run.n) as writer:
        captured = ray.capture(run, adapter, config.reducers, writer, keep_proba=method.refines)
        vectors = writer.finish()
        state = learn(config, method, vectors, captured, times=(t0, t0, time.perf_counter()), backend=backend)
        state.fit_info["engine"] = run.info  # actors, batches, batches that arrived out of order
        writer.commit()
    return state


def _check_labels(config: FitConfig, labels) -> None:
    if config.posterior == "label" and labels is None:
        raise DataError(
            "posterior='label' needs the true labels: pass y to fit, or data that yields "
            "(input, label) pairs. Or use posterior='prediction'."
        )


def _check_cluster_counts(config: FitConfig, n) -> None:
    for name, k in config.n_clusters.items():
        if n is not None and k > n:
            raise ParameterError(
                f"n_clusters for layer {name!r} is {k}, more than the {n} samples to cluster; "
                "use at most as many clusters as samples."
            )


def release_replaced(store) -> None:
    """After a refit replaced a state whose vectors were in the store folder ``store``: remove its generation where
    nothing holds it any more (the clean-up at the refit's commit ran while that state still held it, so a refitted
    explainer kept two generations, twice the disk, until some later fit). A generation another explainer, another
    process or the user's own reference to the old state still holds is kept. Best effort: a failure is no error."""
    from .store.vectors import clean_store

    try:
        clean_store(store)
    except (OSError, ActClustError):
        pass


def _warn_unseen_classes(config: FitConfig, targets: np.ndarray, n_classes: int) -> None:
    """Warn where the surrogate learns from targets that hold only some of the model's classes: it never predicts
    the others, so on inputs of those classes its fidelity is 0 without a word (an outside check fitted digits
    0-4 and scored 5-9)."""
    seen = np.bincount(targets, minlength=n_classes) > 0
    if not seen.all():
        unseen = np.flatnonzero(~seen).tolist()
        what = "labels" if config.posterior == "label" else "predictions on the training data"
        warnings.warn(
            f"The model has {n_classes} classes but its {what} hold {int(seen.sum())} of them: the surrogate never "
            f"predicts the classes {unseen[:10]}{' ...' if len(unseen) > 10 else ''}, so on inputs of those classes "
            "it disagrees with the model. Fit on data of every class the model predicts.", ActClustWarning,
            stacklevel=user_stacklevel())


def _warn_few_clusters(config: FitConfig, n_targets: int) -> None:
    """Warn where a layer has fewer clusters than the classes its clusters' mixes learn (a 100-class model with the
    default clusters had a fidelity of 0.05 and no word about why)."""
    few = [l for l in config.layers if config.n_clusters[l] < n_targets]
    if few:
        warnings.warn(
            f"The layers {few} have fewer clusters ({sorted({int(config.n_clusters[l]) for l in few})}) than the "
            f"{n_targets} classes the surrogate learns: each cluster stands mostly for one class, so some classes "
            f"get no cluster of their own there and the surrogate rarely predicts them. Give at least {n_targets} "
            f"clusters per layer (n_clusters={2 * n_targets}, say).", ActClustWarning, stacklevel=5)


def learn(config: FitConfig, method, vectors, captured: "passes.Captured", times, backend=None) -> FittedState:
    """Cluster the captured vectors and build the surrogate: the :class:`FittedState` of a fit. The
    clusterings and assignments are computed by ``backend`` (:mod:`actclust.compute`; the host by default)."""
    backend = backend or HOST
    t0, t1, t2 = times
    layers, labels, n_classes = config.layers, captured.labels, captured.n_classes
    predictions = captured.predictions
    n = len(predictions)
    _check_cluster_counts(config, n)
    if labels is not None:
        check_label_range(labels, n_classes)
    _check_labels(config, labels)
    targets = labels if config.posterior == "label" else predictions
    _warn_few_clusters(config, int(np.unique(targets).size))
    _warn_unseen_classes(config, targets, n_classes)

    clusterings = {l: _cluster(config, l, vectors[l], backend)
                   for l in tqdm(layers, desc="clustering layers", disable=not config.progress, leave=False)}
    _warn_empty_clusters(clusterings)
    refined = None
    if method.refines:
        learn_weights = isinstance(config.layer_weights, str)
        fixed = None if config.layer_weights is None or learn_weights else config.layer_weights
        refined = method.refine({l: vectors[l] for l in layers}, clusterings, captured.proba,
                                learn_weights=learn_weights, weights=fixed, smoothing=config.smoothing, targets=targets,
                                random_state=config.random_state, progress=config.progress)
    # A refined clustering holds its learned temperature (rescaled to its final centres).
    temperatures = {l: float(clusterings[l].temperature_ if refined is not None else config.temperature) for l in layers}
    # Hard assignment keeps cluster ids (O(n)), not one-hot rows (O(n x n_clusters)).
    assign = {l: clusterings[l].predict(vectors[l], backend) if temperatures[l] <= 0
              else clusterings[l].soft_assign(vectors[l], temperatures[l], backend) for l in layers}
    t3 = time.perf_counter()
    weights = refined.weights if refined is not None else _weights(config, assign, targets, n_classes)
    posteriors = {l: surrogate.fit_posteriors(assign[l], targets, n_classes, config.smoothing, config.n_clusters[l])
                  for l in layers}
    t4 = time.perf_counter()
    info = dict(
        seconds_reducer_fit=t1 - t0, seconds_capture=t2 - t1, seconds_clustering=t3 - t2,
        seconds_surrogate=t4 - t3, seconds_total=t4 - t0,
        empty_clusters={l: int((c.cluster_sizes_ == 0).sum()) for l, c in clusterings.items()},
        store={"dtype": vectors.dtype, "on_disk": vectors.on_disk, "bytes": vectors.nbytes},
        device=backend.device,
    )
    if refined is not None:
        info["distill"] = {"loss_history": refined.loss_history, "spread_ratio": refined.spread_ratio,
                           "converged": refined.converged, "seconds": refined.seconds, "temperatures": temperatures}
    weights = np.asarray(weights, dtype=np.float64)
    return FittedState(
        layers=layers, n_classes=n_classes, input_spec=captured.spec, normalize=config.normalize,
        posterior=config.posterior, reducers=config.reducers, clusterings=clusterings, temperatures=temperatures,
        posteriors=posteriors, weights=weights / weights.sum(), train_vectors=vectors,
        train_predictions=predictions, train_labels=labels,
        # In-sample scores from the assignments already at hand: no second pass over the data.
        train_score=_train_score(predictions, assign, posteriors, labels, weights, layers),
        fit_info=info, random_state=config.random_state,
        spatial_grid=config.spatial_grid if any(k.endswith(SUMMARY_SUFFIX) for k in vectors) else None,
        layouts={l: captured.layouts.get(l, "dense") for l in layers}, input_stats=captured.input_stats,
        summary_seeds=passes.summary_seeds(layers, config.random_state),
    )


def _warn_empty_clusters(clusterings: dict) -> None:
    """Say which layers' clusterings left clusters empty: k-means splits an empty cluster while it can, so an empty one
    means the layer gives fewer distinct vectors than clusters (a dead or constant layer, one sample many times), and
    the layer's clusters tell little apart (an outside check found a dead layer's 15 clusters, 14 of them empty,
    kept without a word)."""
    for layer, c in clusterings.items():
        sizes = np.asarray(getattr(c, "cluster_sizes_", []))
        empty = int((sizes == 0).sum())
        if empty:
            warnings.warn(f"Layer {layer!r}: only {len(sizes) - empty} of its {len(sizes)} clusters hold training "
                          "samples; the others are empty. The layer gives fewer distinct vectors than clusters (a "
                          "constant or dead layer, samples repeated many times, or with normalize=None values too small "
                          "for float32 distances: keep normalize='l2'), so its clusters tell little apart: choose "
                          "another layer, or fewer clusters.", DataWarning, stacklevel=user_stacklevel())


def _cluster(config: FitConfig, layer: str, vectors: np.ndarray, backend):
    """Fit one layer's clustering; its warnings (e.g. no convergence) name the layer."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clustering = make_clustering(config.clustering, config.n_clusters[layer], config.random_state)
        # A registered clustering written before backends existed takes fit(X) alone.
        takes_backend = "backend" in inspect.signature(clustering.fit).parameters
        clustering = clustering.fit(vectors, backend) if takes_backend else clustering.fit(vectors)
    for w in caught:
        category = w.category if issubclass(w.category, ActClustWarning) else ConvergenceWarning
        warnings.warn(f"layer {layer!r}: {w.message}", category, stacklevel=4)
    return clustering


#: Held-out samples below which ``layer_weights="fit"`` warns that its weights are close to a guess.
_MIN_VALIDATION = 20


def _weights(config: FitConfig, assign, targets, n_classes) -> np.ndarray:
    """The layer weights: equal, given, or (``"fit"``) searched for fidelity on a held-out part."""
    layers, lw = config.layers, config.layer_weights
    if lw is None:
        return np.full(len(layers), 1.0 / len(layers))
    if isinstance(lw, str):  # "fit"
        rng = np.random.default_rng(config.random_state)
        order = rng.permutation(len(targets))
        n_val = max(1, int(round(config.validation_fraction * len(targets))))
        if n_val < _MIN_VALIDATION:  # weights chosen on 1 or 2 samples came back as if chosen (an outside check)
            warnings.warn(f"layer_weights='fit' chooses the weights on {n_val} held-out sample(s) (validation_fraction="
                          f"{config.validation_fraction} of {len(targets)}): too few to tell the layers apart, so the "
                          f"weights are close to a guess. Fit on more data, raise validation_fraction (at least "
                          f"{_MIN_VALIDATION} held out), or leave layer_weights=None (equal).", ActClustWarning,
                          stacklevel=user_stacklevel())
        val, train = order[:n_val], order[n_val:]
        probas = np.stack([
            surrogate.layer_proba(assign[l][val], surrogate.fit_posteriors(
                assign[l][train], targets[train], n_classes, config.smoothing, config.n_clusters[l]))
            for l in layers
        ])
        return surrogate.fidelity_weights(probas, targets[val], random_state=config.random_state)
    return np.asarray(lw, dtype=np.float64)


def _train_score(dnn, assign, posteriors, labels, weights, layers) -> dict:
    """:func:`surrogate.scores` on the training data from the fit's assignments, in chunks of rows
    (memory ``O(chunk x layers x classes)``, not ``O(n x layers x classes)``)."""
    combined, per_layer = np.empty(len(dnn), np.int64), np.empty((len(layers), len(dnn)), np.int64)
    for s in range(0, len(dnn), _SCORE_CHUNK):
        probas = np.stack([surrogate.layer_proba(assign[l][s:s + _SCORE_CHUNK], posteriors[l]) for l in layers])
        combined[s:s + _SCORE_CHUNK] = surrogate.combine(probas, weights).argmax(1)
        per_layer[:, s:s + _SCORE_CHUNK] = probas.argmax(2)
    return surrogate.scores_from_predictions(dnn, combined, per_layer, labels, layers)
