"""Concepts: each cluster of a layer, shown through its training samples and its class mix."""

from __future__ import annotations

import difflib
import numbers
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

__all__ = ["Concept", "concepts"]


@dataclass
class Concept:
    """One cluster of one layer.

    Attributes
    ----------
    layer : str
    cluster : int
    size : int
        Training samples assigned to it (nearest centre).
    prediction_mix : list of float
        Share of each class among the DNN's predictions for those samples (zeros if empty).
    label_mix : list of float or None
        The same for the true labels, when ``fit`` had them.
    purity : float
        Largest share in ``prediction_mix``; ``majority`` is its class.
    majority : int
    exemplars, exemplar_distances : list
        The ``k`` assigned training samples nearest the centre (indices into the training data),
        and their squared distances relative to the layer's ``scale_`` (1 = typical).
    edge, edge_distances : list
        The assigned samples furthest from the centre: the range the cluster covers.
    """

    layer: str
    cluster: int
    size: int
    prediction_mix: list
    label_mix: Optional[list]
    purity: float
    majority: int
    exemplars: list
    exemplar_distances: list
    edge: list
    edge_distances: list

    def to_dict(self) -> dict:
        return asdict(self)


def check_layer(ac, layer) -> str:
    if layer not in ac.layers_:
        close = difflib.get_close_matches(str(layer), ac.layers_, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"Layer {layer!r} was not fitted; fitted layers are {ac.layers_}.{hint}")
    return layer


def concepts(ac, layer: str, k: int = 10, n_edge: int = 3) -> list:
    """One :class:`Concept` per cluster of ``layer``; see :meth:`ActivationClustering.concepts`."""
    ac._check_fitted()
    check_layer(ac, layer)
    n = ac.n_samples_fit_
    for name, value, low in (("k", k, 1), ("n_edge", n_edge, 0)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not low <= value <= n:
            raise ValueError(f"{name} must be an int between {low} and the {n} training samples. "
                             f"Got {value!r} instead.")
    assign, dist = train_assignments(ac, layer)
    scale = ac.clusterings_[layer].scale_
    out = []
    for c in range(ac.clusterings_[layer].n_clusters):
        members = np.flatnonzero(assign == c)
        order = members[np.argsort(dist[members], kind="stable")]
        pred_mix = _mix(ac.train_predictions_[members], ac.n_classes_)
        label_mix = None if ac.train_labels_ is None else _mix(ac.train_labels_[members], ac.n_classes_).tolist()
        edge = order[::-1][:n_edge] if n_edge else order[:0]
        out.append(Concept(
            layer=layer, cluster=c, size=int(len(members)), prediction_mix=pred_mix.tolist(),
            label_mix=label_mix, purity=float(pred_mix.max()), majority=int(pred_mix.argmax()),
            exemplars=order[:k].tolist(), exemplar_distances=(dist[order[:k]] / scale).tolist(),
            edge=edge.tolist(), edge_distances=(dist[edge] / scale).tolist(),
        ))
    return out


def train_assignments(ac, layer: str):
    """Nearest cluster and squared distance to it of every training sample (cached)."""
    cache = ac.__dict__.setdefault("_concepts_cache", {})
    if layer not in cache:
        d = ac.clusterings_[layer].distances(ac.train_vectors_[layer])
        assign = d.argmin(1)
        cache[layer] = (assign, d[np.arange(len(d)), assign])
    return cache[layer]


def _mix(classes: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(classes, minlength=n_classes).astype(np.float64)
    return counts / counts.sum() if counts.sum() else counts
