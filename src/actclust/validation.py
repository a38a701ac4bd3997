"""The parameters of :class:`~actclust.ActivationClustering`, declared once, checked by ``fit``.

One table, :data:`CONSTRAINTS`, says what each parameter may be; :func:`check` turns it into every
"The 'x' parameter of ActivationClustering must be ... Got ... instead." message (the idea of
scikit-learn's ``_param_validation``). Checks that need more than the value itself (the model's
layer names, the other parameters) follow in :func:`validate`, which returns a :class:`FitConfig`:
the parameters resolved per layer, what the fit pipeline (:mod:`actclust.fitting`) runs on.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np

from .exceptions import ParameterError

__all__ = ["CONSTRAINTS", "check", "validate", "FitConfig", "per_layer", "Interval", "Options", "Kind",
           "Constraint"]

POSTERIORS = ("prediction", "label")
ENGINES = ("local", "ray")
MAX_SEED = 2**32 - 1  # NumPy's and faiss' seeds


class Constraint:
    """One allowed form of a value: ``ok(value)`` and how it reads in a message (``str``)."""

    def ok(self, value) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class Interval(Constraint):
    """A number of ``kind`` (``"int"``, ``"float"``) in ``[low, high]`` (``open_low``: ``(low, ...``)."""

    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    open_high: bool = False

    def ok(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind == "int" else numbers.Real):
            return False
        if not np.isfinite(float(value)):
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.open_high and value == self.high))

    def __str__(self) -> str:
        what = "an int" if self.kind == "int" else "a number"
        if self.low is not None and self.high is not None:
            return (f"{what} in {'(' if self.open_low else '['}{self.low}, {self.high}"
                    f"{')' if self.open_high else ']'}")
        if self.low is not None:
            return f"{what} {'>' if self.open_low else '>='} {self.low}"
        return what


@dataclass(frozen=True)
class Options(Constraint):
    """One of ``values`` (compared by type and value: ``True`` is not ``1``); ``text`` reads in messages."""

    values: tuple
    text: Optional[str] = None

    def ok(self, value) -> bool:
        return any(value is v or (type(value) is type(v) and value == v) for v in self.values)

    def __str__(self) -> str:
        if self.text:
            return self.text
        return repr(self.values[0]) if len(self.values) == 1 else f"one of {list(self.values)}"


@dataclass(frozen=True)
class Kind(Constraint):
    """Any value ``test`` accepts, described by ``text``."""

    test: Callable[[Any], bool]
    text: str

    def ok(self, value) -> bool:
        return bool(self.test(value))

    def __str__(self) -> str:
        return self.text


def _layer_dict(inner: Constraint) -> Kind:
    return Kind(lambda v: isinstance(v, Mapping) and all(inner.ok(x) for x in v.values()),
                "a dict of them (one per layer)")


def _reducer_like(v) -> bool:
    from .capture.reduction import Reducer, make_reducer

    if isinstance(v, Reducer):
        return True
    try:
        make_reducer(v)
    except ParameterError:
        return False
    return True


def _weights_list(v) -> bool:
    if isinstance(v, (str, Mapping)) or not hasattr(v, "__len__"):
        return False
    try:
        w = np.asarray(list(v), dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return w.ndim == 1 and bool(np.all(np.isfinite(w))) and bool((w >= 0).all()) and w.sum() > 0


_N_CLUSTERS = Interval("int", 2)
_REDUCER = Kind(_reducer_like, "a reducer name ('auto', 'mean', 'max', 'grid:g', 'pca:d', 'random:d', 'token_mean', "
                               "'token_first'; g and d positive integers) or a Reducer")
_WEIGHTS = Kind(_weights_list, "a list of non-negative numbers, not all zero")

#: parameter -> the forms it may take (any one of them)
CONSTRAINTS: dict[str, list] = {
    "n_clusters": [_N_CLUSTERS, _layer_dict(_N_CLUSTERS)],
    "reducer": [_REDUCER, _layer_dict(_REDUCER)],
    "normalize": [Options(("l2", None))],
    "posterior": [Options(POSTERIORS)],
    "layer_weights": [Options((None, "fit")), _WEIGHTS, _layer_dict(Interval("float", 0))],
    "temperature": [Interval("float", 0)],
    "smoothing": [Interval("float", 0)],
    "clustering": [Kind(lambda v: _clustering_known(v), "")],  # message from the registry, see _clustering_known
    "validation_fraction": [Interval("float", 0, 1, open_low=True, open_high=True)],
    "batch_size": [Interval("int", 1)],
    "random_state": [Interval("int", 0, MAX_SEED)],
    "progress": [Options((True, False))],
    "label_key": [Options(("auto", None)), Kind(lambda v: isinstance(v, str), "a key (str)"),
                  Kind(lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "a position (int)")],
    "output": [Options((None,)), Kind(callable, "a function of the model's output that returns the logits")],
    "search": [Options(("auto", "exact", "approximate"))],
    "spatial_grid": [Options((None,)), Interval("int", 1)],
    "store": [Options((None,), "None (in memory)"), Kind(lambda v: isinstance(v, (str, os.PathLike)), "a directory path")],
    "store_dtype": [Options(("float32", "float16"))],
    "engine": [Options(ENGINES)],
    "ray_options": [Options((None,)), Kind(lambda v: isinstance(v, dict), "a dict")],
    "device": [Kind(lambda v: _device_form(v), "")],  # the message from actclust.compute, see check
}


def _device_form(value) -> bool:
    from .compute import check_device

    return check_device(value)


def _clustering_known(name) -> bool:
    from .clustering import CLUSTERINGS

    return isinstance(name, str) and name in CLUSTERINGS


def check(owner: str, params: Mapping[str, Any], constraints: Mapping[str, list] = CONSTRAINTS) -> None:
    """Raise :class:`ParameterError` for the first parameter whose value takes none of its forms."""
    for name, forms in constraints.items():
        if name not in params:
            continue
        value = params[name]
        if any(c.ok(value) for c in forms):
            continue
        if name == "clustering":
            from .clustering import CLUSTERINGS

            allowed = f"one of {list(CLUSTERINGS)}"
        elif name == "device":
            from .compute import DEVICE_TEXT

            allowed = DEVICE_TEXT
        else:
            texts = [str(c) for c in forms]
            allowed = ", ".join(texts[:-1]) + f" or {texts[-1]}" if len(texts) > 1 else texts[0]
        raise ParameterError(f"The {name!r} parameter of {owner} must be {allowed}. Got {value!r} instead.")


_NO_DEFAULT = object()


def per_layer(value, pname: str, layers: list, canonical=lambda name: name, default=_NO_DEFAULT) -> dict:
    """A per-layer parameter as a dict ``layer -> value``; a dict names each layer once, or, where the parameter
    has a ``default``, the layers it changes (the others take the default).

    ``layers`` are canonical names; a dict may use them or the names the user gave (wrapper
    prefixes such as ``module.`` are removed by ``canonical``).
    """
    if not isinstance(value, Mapping):
        return {l: value for l in layers}
    keyed = {canonical(str(k)): v for k, v in value.items()}
    missing = [l for l in layers if l not in keyed] if default is _NO_DEFAULT else []
    extra = [k for k in value if canonical(str(k)) not in layers]
    if missing or extra or len(keyed) != len(value):
        raise ParameterError(
            (f"The '{pname}' dict must have exactly one entry per layer; missing {missing}, unknown {extra}."
             if default is _NO_DEFAULT else
             f"The '{pname}' dict names layers the model's explainer does not have: {extra} (its layers: {layers}); "
             f"the layers it leaves out take {default!r}.")
        )
    return {l: keyed.get(l, default) for l in layers}


@dataclass(frozen=True)
class FitConfig:
    """The estimator's parameters, checked and resolved per layer: what :mod:`actclust.fitting` runs."""

    layers: list
    n_clusters: dict
    reducers: dict
    normalize: Optional[str]
    posterior: str
    layer_weights: Any  # None, "fit", or an array of one weight per layer
    temperature: float
    smoothing: float
    clustering: str
    validation_fraction: float
    batch_size: int
    random_state: int
    progress: bool
    label_key: Any
    spatial_grid: Optional[int]
    store: Any
    store_dtype: str
    engine: str
    ray_options: Optional[dict]
    device: Any = None  # None (the model's device), a device name or torch.device, or a compute Backend


def validate(estimator, adapter) -> FitConfig:
    """Check every parameter of ``estimator`` (its table, then the model's layer names) before a fit."""
    from .capture.reduction import make_reducer
    from .engines.ray import check_options

    names = [n for n in CONSTRAINTS if hasattr(estimator, n)]
    owner = type(estimator).__name__
    check(owner, {n: getattr(estimator, n) for n in names})
    layers = adapter.resolve(estimator.layers)
    n_clusters = per_layer(estimator.n_clusters, "n_clusters", layers, adapter.canonical)
    reducers = {l: make_reducer(s, estimator.random_state)
                for l, s in per_layer(estimator.reducer, "reducer", layers, adapter.canonical, default="auto").items()}
    lw = estimator.layer_weights
    if lw is not None and not isinstance(lw, str):
        values = per_layer(lw, "layer_weights", layers, adapter.canonical).values() if isinstance(lw, Mapping) else lw
        w = np.asarray(list(values), dtype=np.float64)
        if w.shape != (len(layers),) or w.sum() <= 0:
            raise ParameterError(
                f"The 'layer_weights' parameter of {owner} must give one non-negative number per layer "
                f"({len(layers)}), not all zero. Got {lw!r} instead."
            )
        lw = w / w.sum()
    check_options(estimator.ray_options)
    return FitConfig(
        layers=layers, n_clusters=n_clusters, reducers=reducers, normalize=estimator.normalize,
        posterior=estimator.posterior, layer_weights=lw, temperature=float(estimator.temperature),
        smoothing=float(estimator.smoothing), clustering=estimator.clustering,
        validation_fraction=float(estimator.validation_fraction), batch_size=int(estimator.batch_size),
        random_state=int(estimator.random_state), progress=bool(estimator.progress), label_key=estimator.label_key,
        spatial_grid=estimator.spatial_grid, store=estimator.store, store_dtype=estimator.store_dtype,
        engine=estimator.engine, ray_options=estimator.ray_options, device=getattr(estimator, "device", None),
    )
