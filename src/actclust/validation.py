"""Validation of :class:`~actclust.ActivationClustering` parameters, run by ``fit``."""

from __future__ import annotations

import numbers
from typing import Mapping

import numpy as np

from .engines.ray import check_options
from .clustering.base import make_clustering
from .exceptions import ParameterError
from .capture.reduction import NORMALIZE_NAMES
from .analysis.retrieval import check_search
from .store.vectors import check_store

POSTERIORS = ("prediction", "label")
ENGINES = ("local", "ray")


def validate_params(ac, adapter) -> list:
    """Check the parameters of an ActivationClustering before fitting (scikit-learn style messages).

    Returns the canonical layer names (wrapper prefixes such as ``module.`` removed).
    """
    layers = adapter.resolve(ac.layers)
    names = dict(zip(layers, ac.layers))
    lk = ac.label_key
    if not (lk is None or lk == "auto" or isinstance(lk, str) or (isinstance(lk, numbers.Integral) and not isinstance(lk, bool))):
        raise ParameterError(
            "The 'label_key' parameter of ActivationClustering must be 'auto', None, a position (int) or a "
            f"key (str). Got {lk!r} instead."
        )
    if ac.normalize not in NORMALIZE_NAMES:
        raise ParameterError(
            f"The 'normalize' parameter of ActivationClustering must be one of {list(NORMALIZE_NAMES)}. "
            f"Got {ac.normalize!r} instead."
        )
    if ac.posterior not in POSTERIORS:
        raise ParameterError(
            f"The 'posterior' parameter of ActivationClustering must be one of {list(POSTERIORS)}. "
            f"Got {ac.posterior!r} instead."
        )
    for name, value in per_layer(ac.n_clusters, "n_clusters", layers, adapter.canonical).items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 2:
            raise ParameterError(
                f"The 'n_clusters' parameter of ActivationClustering must be an int >= 2 "
                f"(or a dict of them); got {value!r} for layer {names[name]!r}."
            )
    lw = ac.layer_weights
    if isinstance(lw, str):
        if lw != "fit":
            raise ParameterError(
                "The 'layer_weights' parameter of ActivationClustering must be None, 'fit', a list "
                f"or a dict of non-negative numbers. Got {lw!r} instead."
            )
        if not 0 < ac.validation_fraction < 1:
            raise ParameterError(
                "The 'validation_fraction' parameter of ActivationClustering must be in (0, 1). "
                f"Got {ac.validation_fraction!r} instead."
            )
    elif lw is not None:
        values = (per_layer(lw, "layer_weights", layers, adapter.canonical).values()
                  if isinstance(lw, Mapping) else list(lw))
        w = np.asarray(list(values), dtype=np.float64)
        if w.shape != (len(ac.layers),) or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            raise ParameterError(
                f"The 'layer_weights' parameter of ActivationClustering must give one non-negative "
                f"number per layer ({len(ac.layers)}), not all zero. Got {lw!r} instead."
            )
    for pname in ("temperature", "smoothing"):
        v = getattr(ac, pname)
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not np.isfinite(v) or v < 0:
            raise ParameterError(f"The '{pname}' parameter of ActivationClustering must be >= 0. "
                             f"Got {getattr(ac, pname)!r} instead.")
    if not isinstance(ac.batch_size, numbers.Integral) or ac.batch_size < 1:
        raise ParameterError(f"The 'batch_size' parameter of ActivationClustering must be a positive int. "
                         f"Got {ac.batch_size!r} instead.")
    make_clustering(ac.clustering, 2)
    check_search(ac.search)
    check_store(ac.store, ac.store_dtype)
    if ac.engine not in ENGINES:
        raise ParameterError(f"The 'engine' parameter of ActivationClustering must be one of {list(ENGINES)}. "
                             f"Got {ac.engine!r} instead.")
    check_options(ac.ray_options)
    g = ac.spatial_grid
    if g is not None and (not isinstance(g, numbers.Integral) or isinstance(g, bool) or g < 1):
        raise ParameterError(f"The 'spatial_grid' parameter of ActivationClustering must be None or an int >= 1. "
                             f"Got {g!r} instead.")
    return layers


def per_layer(value, pname: str, layers: list, canonical=lambda name: name) -> dict:
    """A per-layer parameter as a dict ``layer -> value``; a dict must name each layer once.

    ``layers`` are canonical names; a dict may use them or the names the user gave (wrapper
    prefixes such as ``module.`` are removed by ``canonical``).
    """
    if not isinstance(value, Mapping):
        return {l: value for l in layers}
    keyed = {canonical(str(k)): v for k, v in value.items()}
    missing = [l for l in layers if l not in keyed]
    extra = [k for k in value if canonical(str(k)) not in layers]
    if missing or extra or len(keyed) != len(value):
        raise ParameterError(
            f"The '{pname}' dict must have exactly one entry per layer; missing {missing}, "
            f"unknown {extra}."
        )
    return {l: keyed[l] for l in layers}
