"""Validation of :class:`~actclust.ActivationClustering` parameters, run by ``fit``."""

from __future__ import annotations

import numbers
from typing import Mapping

import numpy as np

from ._capture import resolve_layers
from .clustering import make_clustering
from .reduction import NORMALIZE_NAMES

POSTERIORS = ("prediction", "label")


def validate_params(ac) -> None:
    """Check the parameters of an ActivationClustering before fitting (scikit-learn style messages)."""
    resolve_layers(ac.model, ac.layers)
    if ac.normalize not in NORMALIZE_NAMES:
        raise ValueError(
            f"The 'normalize' parameter of ActivationClustering must be one of {list(NORMALIZE_NAMES)}. "
            f"Got {ac.normalize!r} instead."
        )
    if ac.posterior not in POSTERIORS:
        raise ValueError(
            f"The 'posterior' parameter of ActivationClustering must be one of {list(POSTERIORS)}. "
            f"Got {ac.posterior!r} instead."
        )
    for name, value in per_layer(ac.n_clusters, "n_clusters", list(ac.layers)).items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 2:
            raise ValueError(
                f"The 'n_clusters' parameter of ActivationClustering must be an int >= 2 "
                f"(or a dict of them); got {value!r} for layer {name!r}."
            )
    lw = ac.layer_weights
    if isinstance(lw, str):
        if lw != "fit":
            raise ValueError(
                "The 'layer_weights' parameter of ActivationClustering must be None, 'fit', a list "
                f"or a dict of non-negative numbers. Got {lw!r} instead."
            )
        if not 0 < ac.validation_fraction < 1:
            raise ValueError(
                "The 'validation_fraction' parameter of ActivationClustering must be in (0, 1). "
                f"Got {ac.validation_fraction!r} instead."
            )
    elif lw is not None:
        values = (per_layer(lw, "layer_weights", list(ac.layers)).values()
                  if isinstance(lw, Mapping) else list(lw))
        w = np.asarray(list(values), dtype=np.float64)
        if w.shape != (len(ac.layers),) or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"The 'layer_weights' parameter of ActivationClustering must give one non-negative "
                f"number per layer ({len(ac.layers)}), not all zero. Got {lw!r} instead."
            )
    for pname, ok in (("temperature", ac.temperature >= 0), ("smoothing", ac.smoothing >= 0)):
        if not ok:
            raise ValueError(f"The '{pname}' parameter of ActivationClustering must be >= 0. "
                             f"Got {getattr(ac, pname)!r} instead.")
    if not isinstance(ac.batch_size, numbers.Integral) or ac.batch_size < 1:
        raise ValueError(f"The 'batch_size' parameter of ActivationClustering must be a positive int. "
                         f"Got {ac.batch_size!r} instead.")
    make_clustering(ac.clustering, 2)

def per_layer(value, pname: str, layers: list) -> dict:
    """A per-layer parameter as a dict ``layer -> value``; a dict must name each layer once."""
    if not isinstance(value, Mapping):
        return {l: value for l in layers}
    missing = [l for l in layers if l not in value]
    extra = [k for k in value if k not in layers]
    if missing or extra:
        raise ValueError(
            f"The '{pname}' dict must have exactly one entry per layer; missing {missing}, "
            f"unknown {extra}."
        )
    return dict(value)
