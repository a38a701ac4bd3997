"""What ``fit`` learns, as one object: :class:`FittedState`, and the spec of the inputs it saw.

``ActivationClustering.fit`` builds a :class:`FittedState` from local variables and assigns it
once, at the end (``ac.state_``), so a fit that fails changes nothing. Persistence writes and
reads this object; the analyses (similar samples, concepts, explanations, trust, report) take
it together with a :class:`Query`, the result of one pass of the model over some inputs. This
module needs NumPy only: a saved run can be read and analysed without torch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np

from .analysis import surrogate
from .exceptions import DataError

__all__ = ["FittedState", "InputSpec", "Query", "SUMMARY_SUFFIX"]

#: Store key of a layer's retrieval-only spatial summary: ``"conv1" + SUMMARY_SUFFIX``.
SUMMARY_SUFFIX = ":grid"


@dataclass(frozen=True)
class InputSpec:
    """How one sample of the training inputs looked: kind, and per part its shape and dtype.

    ``kind`` is ``"tensor"`` (one input), ``"tuple"`` (positional inputs) or ``"dict"`` (inputs by
    keyword); ``parts`` holds ``(key, per-sample shape, dtype name)`` for each. A 1-D integer part
    (token ids, attention masks) may differ in length between batches; every other shape must
    match the training inputs.
    """

    kind: str
    parts: tuple
    feature_names: Optional[tuple] = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "parts": [[k, list(s), d] for k, s, d in self.parts],
                "feature_names": None if self.feature_names is None else list(self.feature_names)}

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        names = d.get("feature_names")
        return cls(str(d["kind"]), tuple((k, tuple(int(v) for v in s), str(t)) for k, s, t in d["parts"]),
                   None if names is None else tuple(str(n) for n in names))

    @property
    def shape(self) -> tuple:
        """Per-sample shape of a single-tensor input (the first part otherwise)."""
        return self.parts[0][1]

    def check(self, got: "InputSpec", name: str) -> None:
        """Raise :class:`DataError`, saying what to change, if ``got`` cannot be what was fitted."""
        keys, got_keys = [k for k, _, _ in self.parts], [k for k, _, _ in got.parts]
        # inputs by keyword are matched by name, in any order; positional ones by position
        if got.kind != self.kind or (sorted(got_keys) != sorted(keys) if self.kind == "dict" else got_keys != keys):
            raise DataError(
                f"{name} gives the model {_describe(got)}, but the explainer was fitted on {_describe(self)}; "
                "pass inputs of the same form."
            )
        if self.feature_names is not None and got.feature_names is not None and got.feature_names != self.feature_names:
            fitted, names = list(self.feature_names), list(got.feature_names)
            if sorted(fitted) == sorted(names):
                raise DataError(
                    f"{name}'s columns are the training inputs' in another order, and the model reads them by position: "
                    f"select them in the fitted order, {name}[{_names(fitted)}] (ac.state_.input_spec.feature_names).")
            missing, extra = [c for c in fitted if c not in names], [c for c in names if c not in fitted]
            raise DataError(
                f"{name}'s columns differ from the training inputs': "
                + "; ".join(part for part in (f"missing {_names(missing)}" if missing else "",
                                              f"not fitted {_names(extra)}" if extra else "") if part)
                + f". Pass the fitted columns, {_names(fitted)}, in that order"
                + (" (one row of a table, df.iloc[i], is a Series, read as one column: pass df.iloc[[i]])."
                   if len(names) == 1 else "."))
        given = {k: (s, d) for k, s, d in got.parts}
        for key, shape, dtype in self.parts:
            got_shape, got_dtype = given[key]
            label = name if self.kind == "tensor" else f"{name}[{key!r}]"
            sequence = _kind(dtype) == "int" and len(shape) == 1
            shape_bad = len(shape) != len(got_shape) or (shape != got_shape and not sequence)
            if _kind(dtype) != _kind(got_dtype) and shape_bad:  # both said at once (converting one met the other)
                raise DataError(
                    f"{label} holds {got_dtype} values of per-sample shape {got_shape}, but the explainer was fitted on "
                    f"{dtype} inputs of shape {shape}: pass inputs of that shape and type, as the training inputs were."
                )
            if _kind(dtype) != _kind(got_dtype):
                raise DataError(
                    f"{label} holds {got_dtype} values but the explainer was fitted on {dtype}: convert it "
                    "as the training inputs were."
                )
            if shape_bad:
                raise DataError(
                    f"{label} has per-sample shape {got_shape} but the explainer was fitted on inputs of shape "
                    f"{shape}: pass inputs of that shape{_shape_hint(tuple(shape), tuple(got_shape))}."
                )


def _shape_hint(want: tuple, got: tuple) -> str:
    """How to turn inputs of per-sample shape ``got`` into ``want``, where that is clear: the channel axis moved
    (a transpose: a reshape would scramble the values), one sample without its batch axis, or values laid out in
    another number of axes (a reshape); nothing otherwise."""
    rank = len(want)
    if rank >= 2 and len(got) == rank and got == want[1:] + want[:1]:  # channels last, fitted channels first
        return f" (channels last? x.transpose(0, {rank}, {', '.join(map(str, range(1, rank)))}))"
    if rank >= 2 and len(got) == rank and got == want[-1:] + want[:-1]:  # channels first, fitted channels last
        return f" (channels first? x.transpose(0, {', '.join(map(str, range(2, rank + 1)))}, 1))"
    if got == () or (len(got) + 1 == rank and got == want[1:]):  # its first axis read as the samples
        return " (one sample? pass it as a batch of one, x[None])"
    if _size(want) == _size(got) and (len(want) != len(got) or sorted(want) != sorted(got)):
        return f" (e.g. x.reshape(-1, {', '.join(map(str, want))}))"
    return ""


def _names(names: list, most: int = 8) -> str:
    """A list of column names for a message, its middle left out past ``most``."""
    shown = [repr(str(n)) for n in names[:most]] + ([f"... ({len(names) - most} more)"] if len(names) > most else [])
    return "[" + ", ".join(shown) + "]"


def _kind(dtype: str) -> str:
    if "float" in dtype or "half" in dtype:
        return "float"
    return "bool" if dtype == "bool" else "int"


def _size(shape) -> int:
    return int(np.prod(shape)) if len(shape) else 1


def _describe(spec: InputSpec) -> str:
    if spec.kind == "tensor":
        return f"one tensor per batch (per-sample shape {spec.shape})"
    keys = [k for k, _, _ in spec.parts]
    return f"a {spec.kind} of {len(keys)} inputs" + (f" {keys}" if spec.kind == "dict" else "")


@dataclass(frozen=True)
class Query:
    """One pass of the model over some inputs: the DNN's outputs and, per layer, squared distances
    to the centres (and the reduced vectors, when asked for)."""

    dnn_pred: np.ndarray  # (n,)
    dnn_proba: np.ndarray  # (n, C) softmax of the logits
    distances: dict  # layer -> (n, n_clusters)
    vectors: Optional[dict]  # layer -> (n, d), and layer + SUMMARY_SUFFIX -> its spatial summary
    labels: Optional[np.ndarray]

    @property
    def n(self) -> int:
        return len(self.dnn_pred)

    @property
    def paths(self) -> np.ndarray:
        """Nearest cluster ``(n, L)`` of each input at each layer."""
        return np.stack([d.argmin(1) for d in self.distances.values()], 1)


@dataclass(frozen=True, eq=False)
class FittedState:
    """Everything a fit learned; built once by ``fit`` (or by :func:`actclust.load`), never changed.

    Attributes
    ----------
    layers : list of str
        Captured layers, canonical names (without ``module.`` / ``_orig_mod.`` prefixes).
    n_classes : int
    input_spec : InputSpec
    normalize : {"l2", None}
    posterior : {"prediction", "label"}
    reducers, clusterings : dict of layer -> Reducer / Clustering
    temperatures : dict of layer -> float
        Soft-assignment temperature of each layer (0 = hard; learned by ``distill``).
    posteriors : dict of layer -> ndarray (n_clusters, n_classes)
    weights : ndarray (n_layers,), non-negative, summing to 1
    train_vectors : VectorStore
        ``layer -> (n_samples, d)`` clustering vectors, and ``layer + SUMMARY_SUFFIX`` -> the
        retrieval-only spatial summary of the conv layers that have one (``spatial_grid``).
    train_predictions : ndarray (n_samples,)
    train_labels : ndarray (n_samples,) or None
    train_score, fit_info : dict
    random_state : int
    spatial_grid : int or None
        Grid of the retrieval-only spatial summaries (``None``: none were stored).
    layouts : dict of layer -> str, or None
        How each layer's output was read (:data:`actclust.capture.reduction.LAYOUTS`); queries read
        it the same way. ``None`` (a state built by hand): the adapter says, as at fit time.
    summary_seeds : dict of layer -> int, or None
        Seeds of the spatial summaries' projections (``None``: drawn from each layer's position).
    input_stats : dict or None
        Per-channel statistics of the training inputs (:mod:`actclust.capture.stats`), which the
        analyses compare new inputs with.
    cache : dict
        Results derived from this state on demand (search indexes, trust calibration); they go
        with the state, so a new fit never sees an old fit's caches.
    """

    layers: list
    n_classes: int
    input_spec: InputSpec
    normalize: Optional[str]
    posterior: str
    reducers: dict
    clusterings: dict
    temperatures: dict
    posteriors: dict
    weights: np.ndarray
    train_vectors: dict
    train_predictions: np.ndarray
    train_labels: Optional[np.ndarray]
    train_score: dict
    fit_info: dict
    random_state: int
    spatial_grid: Optional[int] = None
    layouts: Optional[dict] = None
    input_stats: Optional[dict] = None
    summary_seeds: Optional[dict] = None
    cache: dict = field(default_factory=dict, repr=False)

    def __deepcopy__(self, memo):
        """A copy with an empty cache: its search indexes may be mapped from files (a disk store's, a loaded run's),
        which faiss could not copy (an outside check); the copy builds what it needs again, on demand."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        for f in fields(self):
            object.__setattr__(new, f.name, {} if f.name == "cache" else copy.deepcopy(getattr(self, f.name), memo))
        return new

    def __getstate__(self) -> dict:
        """Pickled without the cache, for the same reason (an open file of a mapped index cannot be pickled)."""
        return {**self.__dict__, "cache": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def n_samples(self) -> int:
        return len(self.train_predictions)

    @property
    def row_classes(self) -> np.ndarray:
        """Each training row's class as the neighbour analyses count it: its label where ``fit`` had labels,
        else the DNN's prediction."""
        return self.train_labels if self.train_labels is not None else self.train_predictions

    def retrieval_key(self, layer: str) -> str:
        """The store key similar-sample search reads for ``layer``: its spatial summary if it has one."""
        key = layer + SUMMARY_SUFFIX
        return key if key in self.train_vectors else layer

    def layer_probas(self, distances: dict) -> np.ndarray:
        """Per-layer class distributions ``(L, n, C)`` from squared distances to the centres."""
        return np.stack([
            surrogate.layer_proba(self.clusterings[l].soft_assign_from_distances(distances[l], self.temperatures[l]),
                                  self.posteriors[l])
            for l in self.layers
        ])

    def predict_proba(self, distances: dict) -> np.ndarray:
        """The surrogate's class distribution ``(n, C)``."""
        return surrogate.combine(self.layer_probas(distances), self.weights)

    def target_prior(self) -> np.ndarray:
        """Class distribution of the surrogate's targets over the training data."""
        use_labels = self.posterior == "label" and self.train_labels is not None
        targets = self.train_labels if use_labels else self.train_predictions
        counts = np.bincount(targets, minlength=self.n_classes).astype(np.float64)
        return (counts / counts.sum()).astype(np.float32)

    def check_layer(self, layer) -> str:
        from .exceptions import ParameterError

        if not isinstance(layer, str):  # a list of one layer got "Did you mean ['fc1']?"
            raise ParameterError(f"A layer is one name of the fitted layers {self.layers}; got {layer!r}.")
        if layer not in self.layers:
            import difflib

            close = difflib.get_close_matches(layer, self.layers, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ParameterError(f"Layer {layer!r} was not fitted; fitted layers are {self.layers}.{hint}")
        return layer
