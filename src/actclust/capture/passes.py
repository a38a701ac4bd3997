"""Passes of the model over data: the capture pass of ``fit`` and the query pass of every analysis.

Each pass checks the first batch before the model runs (dtype, and at query time the form and
shape the explainer was fitted on) and every batch's inputs for NaN, naming the row. The
capture pass also records each layer's layout (as the adapter reads it) and per-channel
statistics of the inputs; a query pass compares its inputs with those and warns when they depart.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import numpy as np
from tqdm.auto import tqdm

from ..exceptions import ActClustWarning, CaptureError, DataError, DataWarning, user_stacklevel
from ..state import SUMMARY_SUFFIX, FittedState, InputSpec, Query
from ..store import Collector, StoreWriter, estimate
from .arrays import dtype_name, nonfinite_rows
from .data import Batch, Batches, check_label_range
from .reduction import normalized, spatial_summary
from .stats import InputStats

__all__ = ["Captured", "spec_of", "run", "hooked", "summary_seeds", "capture", "query", "announce"]

_log = logging.getLogger("actclust")


def spec_of(inputs, feature_names=None) -> InputSpec:
    def part(key, t):
        return (key, tuple(int(s) for s in t.shape[1:]), dtype_name(t))

    if isinstance(inputs, Mapping):
        return InputSpec("dict", tuple(part(k, v) for k, v in inputs.items()))
    if isinstance(inputs, (tuple, list)):
        return InputSpec("tuple", tuple(part(i, v) for i, v in enumerate(inputs)))
    return InputSpec("tensor", (part(None, inputs),), None if feature_names is None else tuple(feature_names))


def _check_finite(batch: Batch, name: str) -> None:
    parts = batch.inputs.items() if isinstance(batch.inputs, Mapping) else (
        enumerate(batch.inputs) if isinstance(batch.inputs, (tuple, list)) else [(None, batch.inputs)])
    for key, t in parts:
        rows = nonfinite_rows(t)
        if len(rows):
            label = name if key is None else f"{name}[{key!r}]"
            raise DataError(
                f"{label} has NaN or infinite values at row {batch.start + int(rows[0])}"
                + (f" (and {len(rows) - 1} more in {batch.where})" if len(rows) > 1 else "")
                + "; remove or impute them."
            )


def run(adapter, batches: Batches, reducers: dict, *, desc: str, progress: bool,
        spec: Optional[InputSpec] = None, layouts: Optional[dict] = None,
        stats: Optional[InputStats] = None, check_order: bool = False) -> Iterator[tuple[Batch, np.ndarray, dict, InputSpec, dict]]:
    """Yield ``(batch, logits, {layer: vectors}, spec of the first batch, {layer: layout})`` with the
    layers captured; ``layouts`` fixes how each layer's output is read (else the adapter says). ``check_order``:
    warn where the layers are listed in another order than the model runs them (where the runner can tell)."""
    total = None if batches.n_samples is None else -(-batches.n_samples // batches.batch_size)
    first = None
    with adapter.runner(reducers, layouts=layouts) as runner:
        for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
            if first is None:
                first = spec_of(batch.inputs, batches.feature_names)
                if spec is not None:
                    spec.check(first, batches.name)
                adapter.check_inputs(batch.inputs, batches.name)
            _check_finite(batch, batches.name)
            if stats is not None:
                stats.add(batch.inputs)
            try:
                logits, out = runner.run(batch.inputs, f"{batch.where} of {batches.name}")
            except CaptureError as e:
                if spec is None and batches.feature_names and str(e).startswith("The model raised"):
                    # a table at fit: its columns are what the model met; a label or id column left in gave the model's
                    # shape error alone (an outside check; after fit, the column check names it)
                    names = list(batches.feature_names)
                    shown = ", ".join(repr(c) for c in names[-3:])
                    raise CaptureError(f"{e} ({batches.name} is a table of {len(names)} columns, the last {shown}: is a "
                                       "label or id column left in? Drop it before fit.)") from e.__cause__
                if not (batch.label_guessed and str(e).startswith("The model raised")):
                    raise
                raise CaptureError(
                    f"{e} (Each batch of {batches.name} is a pair whose second element, one integer per sample, was "
                    "taken as the labels (label_key='auto'). If it is an input of the model, pass label_key=None.)"
                ) from e.__cause__
            if check_order and runner.in_run_order:
                check_order = False
                _check_order(list(reducers), [l for l in out if l in reducers])
            yield batch, logits, out, first, runner.layouts


def _check_order(given: list, ran: list) -> None:
    """Warn where ``layers`` are listed in another order than the model ran them: the similar-sample presets weigh
    the layers by their place in the list ("low": the first, "high": the last), so out of order they swapped
    meaning without a word (found by an outside check)."""
    def inside(a: str, b: str) -> bool:  # a module within another: the container's hook fires after its children's
        return a.startswith(b + ".") or b.startswith(a + ".")

    if any(inside(a, b) for a in given for b in given if a != b):
        return  # a container and its parts: their order of completion is no order of depth
    if given != ran:
        warnings.warn(
            f"The layers are listed in another order than the model runs them ({given}; they run as {ran}). "
            "Similar samples weigh the layers by their place in the list ('low': the first ones, 'high': the last), "
            f"so list them in the order they run: layers={ran}.", ActClustWarning, stacklevel=user_stacklevel())


def summary_seeds(layers, random_state: int, *, by_name: bool = False) -> dict:
    """The seed of each layer's spatial-summary projection: drawn from ``random_state`` and the layer's
    position, so the same network gives the same summaries whatever its framework calls the layer
    (runs saved before format 3 drew it from the layer's name: ``by_name``)."""
    return {l: zlib.crc32(f"{random_state}/{l if by_name else i}".encode()) for i, l in enumerate(layers)}


def hooked(reducers: dict, normalize, spatial_grid=None, spatial_layers=None, random_state: int = 0,
           seeds: Optional[dict] = None) -> dict:
    """Each layer's reducer, normalised, as the runners call it: ``f(t, mask, layout=, ops=)``; with
    ``spatial_grid``, the layers (all, or ``spatial_layers``) also return a retrieval-only spatial
    summary (``None`` for maps without a 2-D layout), projected with the layer's seed (``seeds``, by
    default :func:`summary_seeds` of ``reducers``' layers in order). A reducer's data error names its layer."""
    seeds = seeds or summary_seeds(list(reducers), random_state)
    out = {}
    for layer, reducer in reducers.items():
        reduce = normalized(reducer, normalize)
        summary = spatial_grid is not None and (spatial_layers is None or layer in spatial_layers)
        if summary:
            reduce = _with_summary(reduce, spatial_summary(spatial_grid, seeds[layer]))
        out[layer] = _naming(reduce, layer)
        # What it computes, for runners that can compute it themselves (an ONNX graph reduces in place):
        out[layer].plan = {"reducer": getattr(reducer, "spec", None), "normalize": normalize,
                           "summary": (spatial_grid, seeds[layer]) if summary else None}
    return out


def _with_summary(reduce, summary):
    def reduce_and_summarize(t, mask=None, *, layout=None, ops=None):
        return reduce(t, mask, layout=layout, ops=ops), summary(t, mask, layout=layout, ops=ops)
    reduce_and_summarize.over_tokens = getattr(reduce, "over_tokens", True)
    return reduce_and_summarize


def _naming(reduce, layer: str):
    def reduce_layer(t, mask=None, *, layout=None, ops=None):
        try:
            return reduce(t, mask, layout=layout, ops=ops)
        except DataError as e:
            raise DataError(f"Layer {layer!r}: {e}") from None
    reduce_layer.over_tokens = getattr(reduce, "over_tokens", True)
    return reduce_layer


@dataclass
class Captured:
    """What the capture pass of ``fit`` returns besides the vectors it wrote."""

    predictions: np.ndarray
    proba: Optional[np.ndarray]  # the softmax, only when asked for
    labels: Optional[np.ndarray]
    n_classes: int
    spec: InputSpec
    layouts: dict
    input_stats: dict


def capture(adapter, batches: Batches, reducers: dict, writer: StoreWriter, *, keep_proba: bool, progress: bool,
            spec: Optional[InputSpec] = None, layouts: Optional[dict] = None) -> Captured:
    """The capture pass of ``fit``: vectors into ``writer``; predictions, softmax (when ``keep_proba``),
    labels, class count, input spec, layouts and input statistics returned. With ``spec`` (a part of
    the data whose first rows the caller has seen), the inputs must match it."""
    col, has_y, width = Collector(batches.n_samples), [], []
    stats = InputStats(adapter.input_channel_axis, n_samples=batches.n_samples)
    seen_layouts: dict = {}
    for batch, logits, out, spec, seen_layouts in run(adapter, batches, reducers, desc="capturing activations",
                                                      progress=progress, spec=spec, layouts=layouts, stats=stats,
                                                      check_order=True):
        if width and logits.shape[1] != width[0]:
            raise DataError(f"The model output {logits.shape[1]} classes on {batch.where}, {width[0]} before.")
        if not width:
            announce(batches.n_samples, {l: v.shape[1] for l, v in out.items()}, writer, progress)
        width.append(logits.shape[1])
        col.add("pred", logits.argmax(1))
        if keep_proba:
            col.add("proba", _softmax(logits))
        writer.add(out)
        has_y.append(batch.labels is not None)
        if batch.labels is not None:
            col.add("y", batch.labels)
    labels = col.get("y") if all(has_y) else None
    return Captured(col.get("pred"), col.get("proba") if keep_proba else None, labels, width[0], spec,
                    dict(seen_layouts), stats.to_dict())


def announce(n, widths: dict, writer: StoreWriter, progress: bool) -> None:
    """Log, before the long part of a fit, the memory or disk its vectors will take."""
    where = f"on disk in {writer.directory}" if writer.directory is not None else "in memory"
    size = "unknown (the data has no length)" if n is None else _bytes(estimate(n, widths, writer.dtype.name))
    summaries = sum(1 for k in widths if k.endswith(SUMMARY_SUFFIX))  # maps' spatial summaries, kept for retrieval
    layers = len(widths) - summaries
    parts = f"{layers} layer{'s' * (layers != 1)}" + (
        f" and {summaries} spatial summar{'y' if summaries == 1 else 'ies'}" if summaries else "")
    message = (f"storing {sum(widths.values())} {writer.dtype.name} values per sample ({parts}) "
               f"for {'?' if n is None else n} samples {where}: {size}")
    _log.info(message)
    if progress:
        tqdm.write(f"actclust: {message}")


def _bytes(b: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def query(state: FittedState, adapter, batches: Batches, *, keep_vectors: bool, progress: bool) -> Query:
    """One pass over the inputs: the DNN's outputs and, per layer, distances to the centres (and vectors)."""
    col, has_y = Collector(batches.n_samples), []
    summaries = [l for l in state.layers if state.retrieval_key(l) != l]
    reducers = hooked(state.reducers, state.normalize, state.spatial_grid if keep_vectors else None, summaries,
                      state.random_state, seeds=state.summary_seeds)
    stats = InputStats(adapter.input_channel_axis, reference=state.input_stats or None, n_samples=batches.n_samples)
    for batch, logits, out, _, _ in run(adapter, batches, reducers, desc="running the model on the inputs", progress=progress,
                                        spec=state.input_spec, layouts=state.layouts, stats=stats):
        if logits.shape[1] != state.n_classes:
            raise DataError(f"The model outputs {logits.shape[1]} classes; it was fitted with {state.n_classes}.")
        col.add("dnn_pred", logits.argmax(1))
        col.add("dnn_proba", _softmax(logits))
        for l in state.layers:
            v, width = out[l], state.train_vectors[l].shape[1]
            if v.shape[1] != width:
                raise DataError(  # the inputs have the fitted shape (checked above): the layer itself changed
                    f"Layer {l!r} gives {v.shape[1]} values per sample on {batches.name} but gave {width} on the "
                    "training data, for inputs of the same shape: the model is not the one the explainer was fitted "
                    "with (another architecture or width?); use that model."
                )
            col.add(("distances", l), state.clusterings[l].distances(v))
            if keep_vectors:
                col.add(("vectors", l), v)
                if l in summaries:
                    col.add(("vectors", state.retrieval_key(l)), out[state.retrieval_key(l)])
        has_y.append(batch.labels is not None)
        if batch.labels is not None:
            check_label_range(batch.labels, state.n_classes, adapter)
            col.add("y", batch.labels)
    departure = stats.departure(batches.name)
    if departure:
        warnings.warn(departure, DataWarning, stacklevel=4)
    return Query(
        dnn_pred=col.get("dnn_pred"), dnn_proba=col.get("dnn_proba"),
        distances={l: col.get(("distances", l)) for l in state.layers},
        vectors={k: col.get(("vectors", k)) for k in state.layers + [state.retrieval_key(l) for l in summaries]}
        if keep_vectors else None,
        labels=col.get("y") if all(has_y) else None,
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    np.exp(z, out=z)
    return z / z.sum(1, keepdims=True)
