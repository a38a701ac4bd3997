"""Concepts: each cluster of a layer, shown through its training samples and its class mix."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..exceptions import ParameterError

if TYPE_CHECKING:  # the analyses read a fitted state and a query pass; no import at run time
    from ..state import FittedState

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
        Largest share in ``prediction_mix``; ``majority`` is its class. An empty cluster (``size`` 0: a layer with
        fewer distinct vectors than clusters, which fit warns of) has purity 0 and majority 0, which says nothing.
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

    def _repr_html_(self) -> str:
        """A concept card for notebooks: :mod:`actclust.views.notebook`."""
        from ..views.notebook import concept_html

        return concept_html(self)


def concepts(state: FittedState, layer: str, k: int = 10, n_edge: int = 3, progress: bool = False,
             backend=None) -> list:
    """One :class:`Concept` per cluster of ``layer`` of a fitted state; see :meth:`ActivationClustering.concepts`.
    ``backend`` (:mod:`actclust.compute`) computes the training vectors' distances (the host by default)."""
    state.check_layer(layer)
    n = state.n_samples
    for name, value, low in (("k", k, 1), ("n_edge", n_edge, 0)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not low <= value <= n:
            raise ParameterError(f"{name} must be an int between {low} and the {n} training samples. "
                                 f"Got {value!r} instead.")
    assign, dist = train_assignments(state, layer, progress, backend)
    clustering = state.clusterings[layer]
    out = []
    for c in range(clustering.n_clusters):
        members = np.flatnonzero(assign == c)
        order = members[np.argsort(dist[members], kind="stable")]
        pred_mix = _mix(state.train_predictions[members], state.n_classes)
        label_mix = None if state.train_labels is None else _mix(state.train_labels[members], state.n_classes).tolist()
        edge = order[::-1][:n_edge] if n_edge else order[:0]
        out.append(Concept(
            layer=layer, cluster=c, size=int(len(members)), prediction_mix=pred_mix.tolist(),
            label_mix=label_mix, purity=float(pred_mix.max()), majority=int(pred_mix.argmax()),
            exemplars=order[:k].tolist(), exemplar_distances=(dist[order[:k]] / clustering.scale_).tolist(),
            edge=edge.tolist(), edge_distances=(dist[edge] / clustering.scale_).tolist(),
        ))
    return out


def train_assignments(state: FittedState, layer: str, progress: bool = False, backend=None):
    """Nearest cluster and squared distance to it of every training sample (cached with the state),
    streamed over the stored vectors in chunks (a progress bar with ``progress`` on large sets), the
    distances computed by ``backend`` (:mod:`actclust.compute`; the host by default)."""
    cache = state.cache.setdefault("concepts", {})
    if layer not in cache:
        from tqdm.auto import tqdm

        from ..store.vectors import CHUNK

        vectors, clustering = state.train_vectors[layer], state.clusterings[layer]
        n = len(vectors)
        assign, dist = np.empty(n, np.int64), np.empty(n, np.float32)
        for start in tqdm(range(0, n, 16 * CHUNK), desc=f"assigning the training vectors of {layer}",
                          disable=not progress or n <= 16 * CHUNK, leave=False):
            d = clustering.distances(vectors[start:start + 16 * CHUNK], backend)
            assign[start:start + len(d)] = d.argmin(1)
            dist[start:start + len(d)] = d[np.arange(len(d)), assign[start:start + len(d)]]
        cache[layer] = (assign, dist)
    return cache[layer]


def _mix(classes: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(classes, minlength=n_classes).astype(np.float64)
    return counts / counts.sum() if counts.sum() else counts
