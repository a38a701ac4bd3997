"""One pass of a fitted explainer over some inputs: what predict, score, explain and trust read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ._data import Batches, Collector, DataError

__all__ = ["Query", "run_query"]


@dataclass
class Query:
    """The DNN's outputs and, per layer, squared distances to the centres (and the vectors)."""

    dnn_pred: np.ndarray  # (n,)
    dnn_proba: np.ndarray  # (n, C) softmax of the logits
    distances: dict  # layer -> (n, n_clusters) squared distances to the centres
    vectors: Optional[dict]  # layer -> (n, d) reduced vectors, when asked for
    labels: Optional[np.ndarray]

    @property
    def paths(self) -> np.ndarray:
        """Nearest cluster ``(n, L)`` of each input at each layer."""
        return np.stack([d.argmin(1) for d in self.distances.values()], 1)


def run_query(ac, X, y=None, keep_vectors: bool = False) -> Query:
    """One pass over X: the DNN's outputs and, per layer, distances to the centres.

    ``keep_vectors`` also keeps each layer's reduced vectors ``(n, d)`` (for similar-sample
    search and trust signals); the per-sample cost is then ``sum(d)`` floats.
    """
    batches = Batches(X, batch_size=ac.batch_size, y=y, name="X")
    col, has_y = Collector(batches.n_samples), []

    def on_batch(logits, out, yb, x):
        if tuple(x.shape[1:]) != tuple(ac.input_shape_):
            raise DataError(
                f"Inputs of shape {tuple(x.shape[1:])} differ from the shape {tuple(ac.input_shape_)} "
                "of the training data the explainer was fitted on."
            )
        if logits.shape[1] != ac.n_classes_:
            raise DataError(
                f"The model outputs {logits.shape[1]} classes; it was fitted with {ac.n_classes_}."
            )
        col.add("dnn_pred", logits.argmax(1).numpy())
        col.add("dnn_proba", logits.float().softmax(1).numpy())
        for l in ac.layers_:
            v, c = out[l].numpy(), ac.clusterings_[l]
            if v.shape[1] != ac.train_vectors_[l].shape[1]:
                raise DataError(
                    f"Layer {l!r} gives {v.shape[1]} values per sample on this data but "
                    f"{ac.train_vectors_[l].shape[1]} on the training data: the inputs differ in shape "
                    "from those the explainer was fitted on."
                )
            col.add(("distances", l), c.distances(v))
            if keep_vectors:
                col.add(("vectors", l), v)
        has_y.append(yb is not None)
        if yb is not None:
            col.add("y", yb)

    ac._run(batches, ac._hooked(ac.reducers_), "explaining", on_batch)
    return Query(
        dnn_pred=col.get("dnn_pred"), dnn_proba=col.get("dnn_proba"),
        distances={l: col.get(("distances", l)) for l in ac.layers_},
        vectors={l: col.get(("vectors", l)) for l in ac.layers_} if keep_vectors else None,
        labels=col.get("y") if all(has_y) else None,
    )
