"""Reducers: turn one layer's activation map into one vector per sample.

A reducer runs where the activations are (inside a PyTorch forward hook, on the model's device;
on the host for Keras and ONNX outputs), through the :class:`~actclust.capture.arrays.Ops` of
their framework, so only the reduced ``(N, d)`` array leaves: memory does not grow with the
size of the maps. It is written once for every framework.

**Layouts.** The adapter says what each layer outputs (:data:`LAYOUTS`): ``"dense"`` ``(N, F)``;
``"channels_first"`` maps ``(N, C, *spatial)`` (PyTorch and ONNX convolutions);
``"channels_last"`` maps ``(N, *spatial, C)`` (Keras); ``"tokens"`` ``(N, T, D)`` (transformers,
with the batch's attention mask). A map is first read channels-first (a channels-last map is
transposed), so **the same map gives the same vector in every framework**, flattened maps
included; token maps are read as ``(N, D, T)`` and pooled over the tokens the mask keeps.

Reducers are named by strings: ``"auto"`` (the default) pools what has a layout and passes
dense outputs through: the mean over the spatial axes of a map, the mean over the real tokens of
a token map. ``"mean"`` and ``"max"`` pool the same axes; ``"grid:g"`` average-pools a 2-D map to
``g x g`` (a 1-D map or token map to ``g``) and flattens it; ``"pca:d"`` projects the flattened
map on its first ``d`` principal components, fitted in a streaming way (one extra pass);
``"random:d"`` projects it with a fixed Gaussian random matrix; ``"token_mean"`` and
``"token_first"`` read any ``(N, T, D)`` output as tokens (the mean over the real tokens, or the
first the attention mask keeps: ``[CLS]`` under right padding, the first real token under left padding).
Dense ``(N, F)`` outputs pass through the pooling reducers unchanged. A size larger than the map (``grid:1000`` on an 8x8 map, ``random:512`` of 288 values) is refused.

Runs saved before layouts existed read every map channels-first, as they were fitted.
"""

from __future__ import annotations

import copy
import numbers
import re
from typing import Optional

import numpy as np

from ..exceptions import DataError, ParameterError
from .arrays import Ops, ops_for

__all__ = ["Reducer", "make_reducer", "REDUCER_NAMES", "NORMALIZE_NAMES", "LAYOUTS", "normalized",
           "spatial_summary", "sign_projection", "SUMMARY_DIMS", "describe"]

REDUCER_NAMES = ("auto", "mean", "max", "grid:g", "pca:d", "random:d", "token_mean", "token_first")
LAYOUTS = ("dense", "channels_first", "channels_last", "tokens")
#: Layout of every map of a run saved before layouts were recorded.
LEGACY_LAYOUT = "channels_first"


def canonical(t, layout: Optional[str], ops: Ops):
    """``t`` channels-first: a channels-last map transposed, a token map read as ``(N, D, T)``."""
    if t.ndim <= 2 or layout in (None, "channels_first", "dense"):
        return t
    if layout in ("channels_last", "tokens"):
        return ops.moveaxis(t, -1, 1)
    raise ParameterError(f"Unknown layout {layout!r}; the layouts are {list(LAYOUTS)}.")


class Reducer:
    """Base reducer: maps an ``(N, ...)`` activation array to ``(N, d)``.

    Called as ``reducer(t, mask=None, layout=None, ops=None)``: ``mask`` is the batch's attention
    mask ``(N, T)`` when it has one, ``layout`` one of :data:`LAYOUTS` (``None``: channels-first),
    ``ops`` the framework's operations (found from ``t`` when not given). Subclasses that learn
    from the data set ``needs_fit = True`` and implement :meth:`partial_fit` and
    :meth:`finish_fit`; their learned arrays go through :meth:`state_dict` /
    :meth:`load_state_dict` for saving.
    """

    needs_fit = False
    over_tokens = False  # whether any (N, T, D) output is read as tokens, whatever its layout

    def __init__(self, spec: str):
        self.spec = spec

    def __call__(self, t, mask=None, *, layout: Optional[str] = None, ops: Optional[Ops] = None):
        if t.ndim == 2:
            return t
        ops = ops or ops_for(t)
        # a mask says which of the batch's tokens are padding: of a token map as long, not of one a strided
        # convolution shortened (runners warn that its vectors then count every token)
        fits = layout == "tokens" and mask is not None and tuple(mask.shape) == tuple(t.shape[:2])
        return self._reduce(canonical(t, layout, ops), mask if fits else None, ops)

    def _reduce(self, t, mask, ops: Ops):
        raise NotImplementedError

    def partial_fit(self, t, mask=None, *, layout=None, ops=None) -> None:  # pragma: no cover - fitted reducers
        pass

    def finish_fit(self) -> None:  # pragma: no cover - only fitted reducers
        pass

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class _Mean(Reducer):
    """``mean`` and ``auto``: the mean over every axis after the channels (the real tokens of a token map)."""

    def _reduce(self, t, mask, ops):
        return ops.mean_last(ops.flatten(t, 2), mask)


class _Max(Reducer):
    def _reduce(self, t, mask, ops):
        return ops.amax_last(ops.flatten(t, 2), mask)


class _Tokens(Reducer):
    """``token_mean`` / ``token_first``: any ``(N, T, D)`` output read as tokens."""

    over_tokens = True

    def __call__(self, t, mask=None, *, layout=None, ops=None):
        if t.ndim == 2:
            return t
        if t.ndim != 3:
            raise DataError(
                f"The reducer {self.spec!r} needs token maps of shape (N, T, D); got shape {tuple(t.shape)}. "
                "Use 'auto', 'mean', 'max' or 'grid:g' for convolutional maps."
            )
        ops = ops or ops_for(t)
        if self.spec == "token_first":
            # the first token the mask keeps: under left padding (GPT-2's), position 0 is padding, and every padded
            # input got that one vector, all in one cluster (an outside check)
            return t[:, 0] if mask is None or tuple(mask.shape) != tuple(t.shape[:2]) else ops.first_kept(t, mask)
        if mask is not None and tuple(mask.shape) != tuple(t.shape[:2]):
            raise DataError(
                f"The attention mask has shape {tuple(mask.shape)} but the token map has shape "
                f"{tuple(t.shape)}: the reducer {self.spec!r} needs (N, T) to match."
            )
        return ops.mean_last(ops.moveaxis(t, 1, 2), mask)


class _Grid(Reducer):
    def __init__(self, spec, g: int):
        super().__init__(spec)
        self.g = g

    def _reduce(self, t, mask, ops):
        if t.ndim not in (3, 4):
            raise DataError(
                f"The reducer {self.spec!r} needs maps of shape (N, C, H, W) or (N, C, L); "
                f"got shape {tuple(t.shape)}. Use 'mean', 'max', 'pca:d' or 'random:d' instead."
            )
        spatial = tuple(int(s) for s in t.shape[2:])
        if self.g > min(spatial):
            raise DataError(
                f"The reducer {self.spec!r} pools to a {self.g}-cell grid, more than the map's "
                f"{'x'.join(map(str, spatial))} positions; use grid:g with g <= {min(spatial)}, or 'mean'."
            )
        return ops.flatten(ops.adaptive_avg_pool(t, self.g), 1)


class _Projection(Reducer):
    """Shared part of the PCA and random projections: ``(flatten(t) - mean) @ matrix``."""

    def __init__(self, spec, d: int, random_state: int):
        super().__init__(spec)
        self.d = d
        self.random_state = random_state
        self.mean_: Optional[np.ndarray] = None
        self.matrix_: Optional[np.ndarray] = None  # (D, d), on the host; copies per device in _on
        self._on: dict = {}

    def __call__(self, t, mask=None, *, layout=None, ops=None):
        ops = ops or ops_for(t)
        flat = ops.flatten(canonical(t, layout, ops), 1)
        width = int(flat.shape[1])
        if width <= self.d:
            if t.ndim == 2:
                return flat
            raise DataError(
                f"The reducer {self.spec!r} projects to {self.d} values, but the map has only {width}; use "
                f"{self.spec.split(':')[0]}:d with d < {width}, or 'auto'."
            )
        if self.matrix_ is None:
            self._init_matrix(width)
        if self.matrix_.shape[0] != width:
            raise DataError(
                f"The reducer {self.spec!r} was fitted on maps of {self.matrix_.shape[0]} values "
                f"per sample but got {width}."
            )
        key = (ops.name, str(getattr(flat, "device", "cpu")), str(flat.dtype))
        if key not in self._on:
            self._on[key] = (ops.asarray_like(self.mean_, flat), ops.asarray_like(self.matrix_, flat))
        mean, matrix = self._on[key]
        return (flat - mean) @ matrix

    def _init_matrix(self, n_features: int) -> None:
        raise ParameterError(f"The reducer {self.spec!r} must be fitted before use.")

    def state_dict(self):
        if self.matrix_ is None:
            return {}
        return {"mean": np.asarray(self.mean_, np.float32), "matrix": np.asarray(self.matrix_, np.float32)}

    def load_state_dict(self, state):
        if state:
            self.mean_ = np.array(state["mean"], dtype=np.float32)
            self.matrix_ = np.array(state["matrix"], dtype=np.float32)
            self._on = {}

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        new._on = {}
        new.mean_ = None if self.mean_ is None else self.mean_.copy()
        new.matrix_ = None if self.matrix_ is None else self.matrix_.copy()
        return new


class _RandomProjection(_Projection):
    def _init_matrix(self, n_features):
        rng = np.random.default_rng(self.random_state)
        self.matrix_ = (rng.standard_normal((n_features, self.d)) / self.d ** 0.5).astype(np.float32)
        self.mean_ = np.zeros(n_features, np.float32)


class _PCA(_Projection):
    """Streaming PCA through scikit-learn's ``IncrementalPCA`` (memory O(d x D), not O(N x D))."""

    needs_fit = True

    def __init__(self, spec, d, random_state):
        super().__init__(spec, d, random_state)
        self._ipca = None
        self._pending: list[np.ndarray] = []
        self._n_pending = 0

    def partial_fit(self, t, mask=None, *, layout=None, ops=None):
        from sklearn.decomposition import IncrementalPCA

        ops = ops or ops_for(t)
        flat = ops.to_host(ops.flatten(canonical(t, layout, ops), 1))
        if self._ipca is None:
            if flat.shape[1] <= self.d and t.ndim > 2:
                raise DataError(
                    f"The reducer {self.spec!r} projects to {self.d} values, but the map has only {flat.shape[1]}; "
                    f"use pca:d with d < {flat.shape[1]}, or 'auto'."
                )
            self._ipca = IncrementalPCA(n_components=min(self.d, flat.shape[1]))
        self._pending.append(flat)
        self._n_pending += flat.shape[0]
        # IncrementalPCA needs at least n_components rows per call.
        if self._n_pending >= max(self._ipca.n_components, 256):
            self._flush()

    def _flush(self):
        self._ipca.partial_fit(np.concatenate(self._pending))
        self._pending, self._n_pending = [], 0

    def finish_fit(self):
        if self._ipca is None:
            raise DataError(f"The reducer {self.spec!r} saw no data to fit on.")
        if self._n_pending >= self._ipca.n_components:
            self._flush()
        if not hasattr(self._ipca, "components_"):
            raise DataError(
                f"The reducer {self.spec!r} needs at least {self._ipca.n_components} samples to fit; "
                f"got {self._n_pending}."
            )
        self.mean_ = self._ipca.mean_.astype(np.float32)
        self.matrix_ = np.ascontiguousarray(self._ipca.components_.T.astype(np.float32))
        self._ipca, self._pending, self._on = None, [], {}

    def __deepcopy__(self, memo):
        new = super().__deepcopy__(memo)
        new._ipca, new._pending, new._n_pending = None, [], 0
        return new


_PATTERN = re.compile(r"^(auto|mean|max|grid|pca|random|token_mean|token_first)(?::(\d+))?$")
_DEFAULT_ARG = {"grid": 2}


def make_reducer(spec, random_state: int = 0) -> Reducer:
    """Build a fresh reducer from its name (see the module docstring) or copy a given one.

    >>> make_reducer("grid:2")
    _Grid('grid:2')
    """
    if isinstance(spec, Reducer):
        return copy.deepcopy(spec)  # one instance per layer: fitted state is per layer
    m = _PATTERN.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise ParameterError(
            f"The 'reducer' parameter of ActivationClustering must be one of {list(REDUCER_NAMES)} "
            f"(g and d positive integers), or a Reducer. Got {spec!r} instead."
        )
    name, arg = m.group(1), m.group(2)
    if name in ("auto", "mean", "max", "token_mean", "token_first"):
        if arg is not None:
            raise ParameterError(f"The reducer {name!r} takes no argument. Got {spec!r} instead.")
        return {"auto": _Mean, "mean": _Mean, "max": _Max}.get(name, _Tokens)(name)
    if arg is None and name not in _DEFAULT_ARG:
        raise ParameterError(f"The reducer {name!r} needs a dimension, e.g. '{name}:32'. Got {spec!r}.")
    n = int(arg) if arg is not None else _DEFAULT_ARG[name]
    if n < 1:
        raise ParameterError(f"The reducer {spec!r} needs a positive integer after ':'.")
    canonical_name = f"{name}:{n}"
    if name == "grid":
        return _Grid(canonical_name, n)
    if name == "pca":
        return _PCA(canonical_name, n, random_state)
    return _RandomProjection(canonical_name, n, random_state)


def describe(reducer: Reducer, layout: Optional[str], shape: tuple, masked: bool = True,
             mask_tokens: Optional[int] = None) -> str:
    """What ``reducer`` does to an output of ``shape`` and ``layout``, in words (``list_layers`` shows it); ``masked``:
    whether the batch has an attention mask (else a token map's padding, if any, is averaged in), ``mask_tokens``: how
    many tokens it covers, where known (a token map of another length is averaged whole, as fit says)."""
    spec = reducer.spec if isinstance(reducer, Reducer) else str(reducer)
    if len(shape) <= 2:
        # a projection reduces a dense output wider than its d, and keeps a narrower one whole (its __call__):
        # said of each, as pca:100 on a 32-wide layer kept 32 values without a word
        d = getattr(reducer, "d", None)
        width = int(shape[-1]) if len(shape) == 2 and isinstance(shape[-1], numbers.Integral) else None
        if isinstance(reducer, _Projection) and width is not None:
            return f"{spec} (from {width} values)" if width > d else f"as is (dense; {width} values, no more than {spec})"
        return "as is (dense)"
    if spec in ("auto", "mean", "max"):
        how = "mean" if spec != "max" else "max"
        if layout == "tokens":
            length = shape[1] if len(shape) == 3 and isinstance(shape[1], numbers.Integral) else None
            if masked and mask_tokens is not None and length is not None and length != mask_tokens:
                # a strided convolution before it (wav2vec 2.0's feature encoder): fit averages it whole, and said so
                # while list_layers said the mask was used (an outside check)
                return (f"{how} over all {length} tokens, padding included (the attention mask covers {mask_tokens}: "
                        "it cannot say which of these are padding)")
            return (f"{how} over the tokens the attention mask keeps" if masked else
                    f"{how} over all tokens (the sample has no attention mask: padding, if any, included)")
        axes = {4: "height and width", 3: "length", 5: "depth, height and width"}.get(len(shape), "the spatial axes")
        return f"{how} over {axes}"
    return spec


NORMALIZE_NAMES = ("l2", None)


#: Width of a spatial summary: wider pooled maps are projected to this many values.
SUMMARY_DIMS = 64


def spatial_summary(grid: int, seed: int):
    """Retrieval only: a 2-D map average-pooled to ``grid x grid`` (channels-first), flattened, and, when
    wider than :data:`SUMMARY_DIMS`, projected to that many values by the fixed random sign matrix
    of :func:`sign_projection` (which keeps distances up to small relative errors); ``None`` for
    outputs of another rank or a token layout (no 2-D layout to keep). Not normalised: on
    Fashion-MNIST raw summaries found "low" neighbours closer in pixels than unit-length ones
    (4.500 vs 4.621, ``benchmarks/explore_low.py``). A map smaller than the grid is pooled to its own size.
    """

    def summarize(t, mask=None, *, layout=None, ops=None):
        if t.ndim != 4 or layout in ("tokens", "dense"):
            return None
        ops = ops or ops_for(t)
        c = canonical(ops.float32(t), layout, ops)
        g = min(grid, int(c.shape[2]), int(c.shape[3]))
        v = ops.flatten(ops.adaptive_avg_pool(c, g), 1)
        width = int(v.shape[1])
        return v if width <= SUMMARY_DIMS else v @ ops.sign_projection(width, seed, v)
    return summarize


def sign_projection(width: int, seed: int, like=None):
    """A ``(width, SUMMARY_DIMS)`` matrix of ``+-1 / sqrt(SUMMARY_DIMS)``, signs from an integer hash of
    ``(row, column, seed)``: the same on every framework and device, and (in PyTorch) made of tensor
    operations only, so a compiled model traces it into its graph. In ``like``'s framework
    (NumPy by default)."""
    return (ops_for(like) if like is not None else ops_for(np.empty(0))).sign_projection(width, seed, like)


def normalized(reducer, how):
    """Wrap ``reducer`` so that its vectors are scaled to unit length (``how="l2"``) or left as is.

    Unit length makes k-means cluster by direction (cosine): which channels fire together,
    not how strongly the whole layer fires. On Fashion-MNIST it raised combined fidelity from
    0.880 to 0.907 (mean reducer, 15 clusters), and each layer's own fidelity with it.
    """
    if how is None:
        return reducer

    def reduce_and_normalize(t, mask=None, *, layout=None, ops=None):
        ops = ops or ops_for(t)
        v = ops.flatten(reducer(t, mask, layout=layout, ops=ops), 1)
        return ops.l2_normalize(v)

    reduce_and_normalize.over_tokens = getattr(reducer, "over_tokens", True)
    return reduce_and_normalize
