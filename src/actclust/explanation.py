"""Per-input explanations as plain data: what the DNN and the surrogate said, and why.

An :class:`Explanation` serialises to JSON with this schema (``"schema": "actclust.explanation/1"``);
``C`` is the number of classes and class ids index ``class_names`` when given::

    {
      "schema": "actclust.explanation/1",
      "index": int,                       # position of the input among those explained
      "label": int | null,                # true label, when given
      "class_names": [str] | null,
      "dnn": {"prediction": int, "probability": float, "probabilities": [C floats]},
      "surrogate": {"prediction": int, "probabilities": [C floats], "prior": [C floats]},
      "layers": [                         # one per fitted layer, input to output
        {"layer": str, "cluster": int,    # the cluster the input falls in (its path)
         "weight": float,                 # the layer's weight in the surrogate (weights sum to 1)
         "class_mix": [C floats],         # the layer's class distribution for this input
         "vote": [C floats],              # how far this layer moved the surrogate from the prior, per class
         "distance": float,               # squared distance to the centre / the layer's typical one
         "exemplars": [int]}              # training samples nearest that cluster's centre
      ],
      "similar": {"low": [{"index": int, "distance": float, "prediction": int, "label": int | null}],
                  "high": [...]},         # see actclust.retrieval for the weights
      "trust": {str: float} | null        # trust signals, when computed
    }

``vote`` is an exact additive split: ``prior + sum of the layers' votes`` equals the surrogate's
probabilities, where ``vote_l = weight_l * (class_mix_l - prior)`` and ``prior`` is the class
distribution of the surrogate's targets over the training data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from . import surrogate
from .concepts import concepts
from .retrieval import similar

__all__ = ["Explanation", "explain", "SCHEMA"]

SCHEMA = "actclust.explanation/1"


@dataclass
class Explanation:
    """Why the DNN decided as it did on one input, in terms of clusters and training samples.

    Build with :meth:`ActivationClustering.explain`; read the fields, or serialise with
    :meth:`to_dict` / :meth:`to_json` (schema in :mod:`actclust.explanation`).
    """

    index: int
    label: Optional[int]
    dnn: dict
    surrogate: dict
    layers: list
    similar: dict
    class_names: Optional[list] = None
    trust: Optional[dict] = None
    schema: str = field(default=SCHEMA)

    def class_name(self, c: int) -> str:
        return self.class_names[c] if self.class_names else str(c)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> "Explanation":
        if data.get("schema") != SCHEMA:
            raise ValueError(f"Not an actclust explanation of schema {SCHEMA!r}: schema is {data.get('schema')!r}.")
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown fields in explanation: {unknown}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "Explanation":
        return cls.from_dict(json.loads(text))


def explain(ac, X, y=None, *, k: int = 5, class_names=None, trust=None) -> list:
    """One :class:`Explanation` per input; see :meth:`ActivationClustering.explain`."""
    ac._check_fitted()
    if class_names is not None and len(class_names) != ac.n_classes_:
        raise ValueError(f"class_names must name the {ac.n_classes_} classes; got {len(class_names)} names.")
    q = ac._query(X, y, keep_vectors=True)
    probas = ac._layer_probas(q)  # (L, n, C)
    combined = surrogate.combine(probas, ac.weights_)
    w = ac.weights_ / ac.weights_.sum()
    prior = _target_prior(ac)
    paths = q.paths
    exemplars = {l: [c.exemplars for c in concepts(ac, l, k=min(k, ac.n_samples_fit_), n_edge=0)]
                 for l in ac.layers_}
    near = {p: similar(ac, None, k=min(k, ac.n_samples_fit_), weights=p, query=q) for p in ("low", "high")}
    if trust is None:  # by default, whenever the training set is large enough to calibrate them
        from .trust import calibration_possible

        trust = calibration_possible(ac)
    signals = ac._trust_from_query(q) if trust else None
    n, layer_names = len(q.dnn_pred), ac.layers_
    # Everything is converted to Python lists in bulk: per-element conversion would dominate.
    mix = probas.transpose(1, 0, 2).tolist()  # (n, L, C)
    votes = (w[:, None, None] * (probas - prior)).transpose(1, 0, 2).tolist()
    dist = np.stack([q.distances[l][np.arange(n), paths[:, j]] / ac.clusterings_[l].scale_
                     for j, l in enumerate(layer_names)], 1).tolist()
    sims = {p: _samples(ac, nb) for p, nb in near.items()}
    labels = None if q.labels is None else q.labels.tolist()
    dnn_pred, dnn_proba, comb, path_list = q.dnn_pred.tolist(), q.dnn_proba.tolist(), combined.tolist(), paths.tolist()
    names = None if class_names is None else [str(c) for c in class_names]
    trust_rows = None if signals is None else _rows({k: v for k, v in signals.items() if not k.endswith("_prediction")})
    weights, prior_list = w.tolist(), prior.tolist()
    out = []
    for i in range(n):
        layers = [{"layer": l, "cluster": c, "weight": weights[j], "class_mix": mix[i][j], "vote": votes[i][j],
                   "distance": dist[i][j], "exemplars": list(exemplars[l][c])}
                  for j, (l, c) in enumerate(zip(layer_names, path_list[i]))]
        pred = dnn_pred[i]
        out.append(Explanation(
            index=i, label=None if labels is None else labels[i],
            dnn={"prediction": pred, "probability": dnn_proba[i][pred], "probabilities": dnn_proba[i]},
            surrogate={"prediction": max(range(len(comb[i])), key=comb[i].__getitem__), "probabilities": comb[i],
                       "prior": prior_list},
            layers=layers, similar={p: rows[i] for p, rows in sims.items()}, class_names=names,
            trust=None if trust_rows is None else trust_rows[i],
        ))
    return out


def _samples(ac, nb) -> list:
    """Per input, its similar training samples as dicts."""
    labels = None if ac.train_labels_ is None else ac.train_labels_[nb.indices].tolist()
    idx, dist, pred = nb.indices.tolist(), nb.distances.tolist(), ac.train_predictions_[nb.indices].tolist()
    return [[{"index": t, "distance": d, "prediction": p, "label": None if labels is None else labels[i][j]}
             for j, (t, d, p) in enumerate(zip(idx[i], dist[i], pred[i]))] for i in range(len(idx))]


def _rows(columns: dict) -> list:
    """Dict of per-input arrays to a list of per-input dicts of floats."""
    keys, values = list(columns), [np.asarray(v, dtype=np.float64).tolist() for v in columns.values()]
    return [dict(zip(keys, row)) for row in zip(*values)]


def _target_prior(ac) -> np.ndarray:
    """Class distribution of the surrogate's targets over the training data."""
    use_labels = ac.posterior == "label" and ac.train_labels_ is not None
    targets = ac.train_labels_ if use_labels else ac.train_predictions_
    counts = np.bincount(targets, minlength=ac.n_classes_).astype(np.float64)
    return (counts / counts.sum()).astype(np.float32)
