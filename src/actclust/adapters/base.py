"""The seam between actclust and a model framework.

Everything actclust needs from a model goes through a :class:`ModelAdapter`: which layers it
has, how to call it on a batch, where its logits are, and a fingerprint of its weights. The
PyTorch adapter is :class:`actclust.adapters.TorchAdapter`; Keras 3 or ONNX adapters plug in
here later without an ``if framework ==`` anywhere else. This module imports no framework.
"""

from __future__ import annotations

import abc
import difflib
import numbers
import warnings
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ..capture.arrays import dtype_name
from ..exceptions import (ActClustError, ActClustWarning, CaptureError, DataError, DataWarning, ParameterError,
                          user_stacklevel)
from ..state import SUMMARY_SUFFIX

__all__ = ["ModelAdapter", "Runner", "LayerInfo", "unknown_layer_error", "check_finite", "check_input_range",
           "check_captured", "check_rows",
           "keep_reduced",
           "describe_inputs", "model_error", "are_probabilities", "call_output"]


class LayerInfo(tuple):
    """A layer's output shape (it compares equal to the shape tuple), with how actclust reads it:
    ``layout`` (see :data:`actclust.capture.reduction.LAYOUTS`) and ``reduction`` in words."""

    def __new__(cls, shape, layout: str, reduction: str):
        self = super().__new__(cls, tuple(int(s) if s is not None else None for s in shape))
        self.layout, self.reduction = layout, reduction
        return self

    @property
    def shape(self) -> tuple:
        return tuple(self)

    def __repr__(self) -> str:
        return f"{tuple(self)} {self.layout.replace('_', '-')}: {self.reduction}"


class Runner(abc.ABC):
    """Runs the model on batches with layer capture switched on (a context manager).

    ``layouts`` maps each captured layer to the layout its output was read with (see
    :data:`actclust.capture.reduction.LAYOUTS`), filled in as layers are first seen; a runner
    made with fixed ``layouts`` (a fitted run's) reads every output that way.
    """

    layouts: dict
    #: Whether :meth:`run` returns the layers in the order the model ran them (PyTorch's hooks fire so).
    in_run_order: bool = False

    @abc.abstractmethod
    def run(self, inputs, where: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward pass: ``(logits (N, C) float32, {layer: (N, d) float32})`` on the host.

        ``where`` names the batch in error messages (e.g. ``"rows 0-255 of X"``).
        """

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class ModelAdapter(abc.ABC):
    """What actclust needs from a trained classifier, whatever its framework."""

    #: Name of the framework (``"torch"``, ``"keras"``, ``"onnx"``), saved with a run.
    framework = "abstract"
    #: What a layer name names in this framework, for messages.
    layer_kind = "layer"
    #: Axis of the channels in the model's image inputs (1 for ``(N, C, H, W)``, -1 for ``(N, H, W, C)``),
    #: for the per-channel statistics of the inputs.
    input_channel_axis = 1

    @property
    @abc.abstractmethod
    def model_class(self) -> str:
        """Dotted name of the user's model class (the unwrapped one), for messages and saved runs."""

    @abc.abstractmethod
    def layer_names(self) -> list[str]:
        """Every layer name a user may pick, in the model's order, without wrapper prefixes."""

    def resolve(self, layers: Sequence[str], *, what: str = "'layers'",
                how_to_list: str = "actclust.list_layers(model) lists the valid names.") -> list[str]:
        """Canonical names of the requested layers; wrapper prefixes (``module.``) are accepted.

        ``what`` names the argument and ``how_to_list`` tells how to see valid names, in the
        caller's terms (the CLI says ``--layers`` and ``actclust layers SPEC``).
        """
        if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
            raise ParameterError(
                "The 'layers' parameter of ActivationClustering must be a non-empty list of layer "
                f"names; got {layers!r}. actclust.list_layers(model) lists them."
            )
        valid = self.layer_names()
        known = set(valid)
        out: list[str] = []
        for name in layers:
            canonical = self.canonical(name) if isinstance(name, str) else None
            if canonical not in known:
                raise unknown_layer_error(name, valid, how_to_list, self.layer_kind)
            if canonical in out:
                raise ParameterError(f"The layer {name!r} is listed twice in {what}.")
            out.append(canonical)
        clash = next((l for l in out if l.endswith(SUMMARY_SUFFIX) and l[:-len(SUMMARY_SUFFIX)] in out), None)
        if clash is not None:  # the vectors of one would overwrite the other's spatial summary
            raise ParameterError(
                f"The layers {clash[:-len(SUMMARY_SUFFIX)]!r} and {clash!r} cannot both be in {what}: actclust keeps "
                f"the spatial summary of a layer under its name followed by {SUMMARY_SUFFIX!r}. Choose one of them, "
                "or another tensor next to it.")
        return out

    #: The keys of a dict batch whose array says which tokens are real (a token map's vectors leave the others out).
    mask_keys: tuple = ("attention_mask",)

    def input_names(self) -> Optional[list]:
        """The names of the model's inputs where it takes several by name (a command line's ``.npz`` then holds one
        array per name), else ``None``."""
        return None

    def has_mask(self, sample) -> bool:
        """Whether a batch like ``sample`` says which of its tokens are real (its mask key, by default)."""
        return isinstance(sample, Mapping) and any(k in sample for k in self.mask_keys)

    def mask_tokens(self, sample) -> Optional[int]:
        """How many tokens the attention mask of a batch like ``sample`` covers (``None`` where it has none)."""
        mask = next((sample[k] for k in self.mask_keys if k in sample), None) if isinstance(sample, Mapping) else None
        if mask is None and hasattr(self, "derived_mask"):
            mask = self.derived_mask(sample)
        shape = getattr(mask, "shape", None)
        return int(shape[1]) if shape is not None and len(shape) == 2 else None

    def canonical(self, name: str) -> str:
        """``name`` without the prefixes that wrappers add (identity by default)."""
        return name

    @abc.abstractmethod
    def runner(self, reducers: Mapping[str, Callable], layouts: Optional[Mapping[str, str]] = None) -> Runner:
        """A context manager that captures ``reducers``' layers (canonical names) while running.

        Each reducer is called as ``reducer(t, mask, layout=..., ops=...)`` on the layer's output
        ``t`` (in the framework's arrays, where it is computed), with the batch's attention mask
        (or None), the layer's layout (``layouts[layer]``, else :meth:`layout`) and the
        framework's :class:`~actclust.capture.arrays.Ops`; it returns an ``(N, d)`` array, or a
        pair ``(vectors, summary or None)``.
        """

    def layout(self, layer: str, rank: int, masked: bool, shape: tuple = (), strides: Optional[tuple] = None) -> str:
        """How ``layer``'s output of ``rank`` axes (``shape`` and ``strides``, where known) is read: ``"dense"`` for ``(N, F)``,
        else (by default) a channels-first map. Adapters that know better say so (channels-last Keras maps,
        transformer token maps)."""
        return "dense" if rank <= 2 else "channels_first"

    def list_layers(self, sample=None, reducer="auto"):
        """Every layer name; with a batch ``sample``, ``{name: LayerInfo}`` for the layers that ran on it:
        their output shape (batch axis first), layout, and what ``reducer`` does to them."""
        if sample is None:
            return self.layer_names()
        from ..capture.reduction import describe, make_reducer

        r = make_reducer(reducer)
        from ..capture.data import batch_len

        masked = self.has_mask(sample)
        tokens = self.mask_tokens(sample) if masked else None
        n = batch_len(sample)
        out = {}
        for name, (shape, strides, calls) in self.sample_outputs(sample).items():
            layout = self.layout(name, len(shape), masked, tuple(shape), strides)
            if calls != 1:
                how = (f"runs {calls} times in one forward pass, so it cannot be captured (its activations would be "
                       "mixed): choose a module that runs once")
            elif len(shape) and isinstance(shape[0], numbers.Integral) and shape[0] != n:  # as fit refuses it
                how = (f"not one row per sample (first axis {shape[0]} for a sample of {n}: sequence-first?), so it "
                       "cannot be captured: choose a layer whose output has the batch axis first")
            else:
                how = describe(r, layout, shape, masked, tokens)
            out[name] = LayerInfo(shape, layout, how)
        return out

    def output_shapes(self, sample) -> dict:
        """``{layer: output shape}`` of one forward pass on ``sample``, for the layers that ran."""
        raise NotImplementedError

    def sample_outputs(self, sample) -> dict:
        """``{layer: (output shape, its strides or None, times it ran)}`` of one forward pass on ``sample``, for the
        layers that ran: what :meth:`layout` reads them by (strides only where the framework's layout may need
        them), and whether they can be captured (a layer that runs more than once cannot)."""
        return {name: (shape, None, 1) for name, shape in self.output_shapes(sample).items()}

    def check_inputs(self, inputs, name: str) -> None:
        """Refuse, before the first forward pass, inputs the model cannot take (nothing by default)."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """SHA-256 over the model's weights and buffers, the same for wrapped and unwrapped models."""

    def weights_version(self):
        """A cheap value that changes when the model's weights are changed in place (``None``: the framework has
        none; :meth:`fingerprint` then only compares another model bound)."""
        return None


def unknown_layer_error(name, valid: Sequence[str], how_to_list: str, kind: str = "layer") -> ParameterError:
    """The error for a layer name the model lacks, with the closest valid names: those holding it whole first (ONNX's
    ``/fc1/Gemm_output_0`` for ``fc1``), then those spelled alike."""
    text = str(name)
    holding = sorted((v for v in valid if text and text in v and v != text), key=len)
    close = (holding + [c for c in difflib.get_close_matches(text, list(valid), n=3, cutoff=0.4) if c not in holding])[:3]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ParameterError(f"Unknown layer {name!r}: the model has no {kind} of that name.{hint} {how_to_list}")


def check_finite(a: np.ndarray, what: str, where: str) -> None:
    """Raise :class:`CaptureError` naming the first row of ``a (N, d)`` with NaN or infinite values."""
    bad = ~np.isfinite(a).all(1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise CaptureError(
            f"{what} contain NaN or infinite values at row {rows[0]} of {where}"
            + (f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else "")
            + "; check the model and those inputs (values beyond float32's range, 3.4e38, are infinite once stored)."
        )


def check_input_range(a, top: float, dtype: str, where: str, key: str) -> None:
    """Refuse finite values of the model input ``a`` past ``top``, the largest of the ``dtype`` it is cast to (a float16
    input): they become infinite, and the layer that met them was blamed (an outside check)."""
    a = np.asarray(a, dtype=np.float64)
    past = np.isfinite(a) & (np.abs(a) > top)
    if past.any():
        row = int(np.flatnonzero(past.reshape(len(a), -1).any(1))[0])
        raise DataError(f"Row {row} of {where}, input {key!r}, holds values beyond the range of the model's {dtype} "
                        f"input (largest {top:.6g}): they become infinite. Scale the inputs as in training.")


def check_rows(name: str, shape: tuple, n: int, hint: str = "") -> None:
    """:class:`CaptureError` unless layer ``name``'s output of ``shape`` holds one row per input of a batch of ``n``."""
    if len(shape) == 0 or shape[0] != n:
        raise CaptureError(
            f"The layer {name!r} output shape {tuple(shape)} for a batch of {n}: not one row per sample{hint}. "
            "Choose a layer whose output has the batch axis first."
        )


def keep_reduced(out: dict, name: str, result, to_host: Callable) -> None:
    """Put what a reducer gave for layer ``name`` into ``out`` on the host, through ``to_host``: its vectors, or a
    ``(vectors, spatial summary)`` pair whose parts may be ``None`` (a fitting reducer keeps nothing; only 2-D maps
    have a summary), the summary under ``name + SUMMARY_SUFFIX``."""
    main, extra = result if isinstance(result, tuple) else (result, None)
    if main is not None:
        out[name] = to_host(main)
    if extra is not None:
        out[name + SUMMARY_SUFFIX] = to_host(extra)


def check_captured(logits: np.ndarray, vectors: Mapping[str, np.ndarray], where: str) -> None:
    """:func:`check_finite` of a batch's captured vectors, in their order (the order the layers ran: the first
    layer that went bad is named), then of the model's output."""
    for name, v in vectors.items():
        check_finite(v, f"The activations of layer {name!r}", where)
    check_finite(logits, "The model's output", where)


def call_output(output, value):
    """The user's ``output=`` function on the model's output, its error said as its own: it was reported as the
    model's ("The model raised ZeroDivisionError ... check the inputs"), which sent users to their data."""
    try:
        return output(value)
    except ActClustError:
        raise
    except Exception as e:
        raise CaptureError(f"The output= function raised {type(e).__name__}: {e} -- it is given the model's output "
                           "as the model returns it and must return the (N, n_classes) logits.") from e


def are_probabilities(adapter, rows: int, lo: float, hi: float, row_error: float, half: bool, log: str) -> bool:
    """How every adapter reads a batch of ``rows`` model outputs spanning ``[lo, hi]``, whose rows' sums are at most
    ``row_error`` from 1 (``half``: 16-bit floats, summed less exactly): True for probabilities, which the adapter
    reads as their logarithm (a softmax head: read as logits, they were softmaxed again, 0.998 shown as 0.23).
    Outputs in [0, 1] from near 0 to near 1 that do not sum to 1 (a trained sigmoid head's; an untrained network's
    small logits may lie in [0, 1] too, but bunched) are read as logits and said once, with the ``output=`` that
    reads them (``log``: their logarithm in the adapter's framework), unless the user gave an ``output=``."""
    if 0 <= lo and hi <= 1 and row_error <= (1e-2 if half else 1e-4):
        return True
    if adapter.output is None and rows > 1 and lo <= 0.05 and hi >= 0.95 and 0 <= lo and hi <= 1:
        _say_unit_outputs(adapter, log)
    return False


def _say_unit_outputs(adapter, log: str) -> None:
    """Warn, once per adapter, that the model's outputs look like a sigmoid head's probabilities."""
    if getattr(adapter, "_said_unit_outputs", False):
        return
    adapter._said_unit_outputs = True
    warnings.warn(
        "The model's outputs all lie in [0, 1] without summing to 1 per row: probabilities of a sigmoid head? "
        "actclust reads outputs as logits (their softmax gives the confidences), so probabilities would show "
        f"flattened confidences. If they are probabilities, pass output=lambda p: {log} (their logarithm); if they "
        "are logits, ignore this.", ActClustWarning, stacklevel=user_stacklevel())


def model_error(e: Exception, where: str, inputs, limit: Optional[int] = None, layout: str = ""):
    """The :class:`CaptureError` for a model that raised ``e`` on ``inputs`` (a batch): what it was fed, and a hint.
    A tuple whose last element is one integer per sample is likely ``(inputs, labels)``, which is read as the model's
    inputs in order (a Hugging Face model took the labels as its attention mask): say to pass them as ``y=``.
    ``layout``: the adapter's reading of the error, where it names a fix (a sentence, said first)."""
    text = str(e) if limit is None else str(e)[:limit]
    hint = "check that the inputs have the shape, dtype and scaling the model was trained on."
    if layout:
        hint = layout + "Otherwise " + hint
    ids = _integer_inputs(inputs)
    if isinstance(e, IndexError) and ids:  # "index out of range in self": an embedding met an id it has no row for
        name, low, high = max(ids, key=lambda t: t[2])
        hint = (f"{name} holds token ids from {low} to {high}: an id below 0 or at least as large as the model's "
                "embedding (its vocabulary size) has no row. Check that the ids come from the model's tokenizer. "
                "Otherwise " + hint)
    if isinstance(inputs, (tuple, list)) and len(inputs) > 1:
        last = inputs[-1]
        if len(getattr(last, "shape", ())) == 1 and dtype_name(last).startswith(("int", "uint")):
            hint = ("X is a tuple, read as the model's inputs in order, and its last element holds one integer per "
                    "sample: if those are the labels, pass them as y= (fit(X, y)) instead. Otherwise " + hint)
    return CaptureError(f"The model raised {type(e).__name__} on {where} ({describe_inputs(inputs)}): {text} -- {hint}")


def check_empty_masks(mask, where: str) -> bool:
    """Warn where a batch's attention mask keeps no token of some inputs: their token maps average nothing, so their
    vectors are zero and they are clustered and explained as such (an outside check found them silently so). Returns
    whether it warned (runners say it once)."""
    if mask is None or len(getattr(mask, "shape", ())) != 2:
        return False
    keep = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask).astype(bool).any(1)
    if keep.all():
        return False
    empty = np.flatnonzero(~keep)
    warnings.warn(f"{where}: {len(empty)} input(s) have an attention mask that keeps no token (the first is input "
                  f"{int(empty[0])} of the batch): their token maps average nothing, so their vectors are zero. Give "
                  "each input at least one real token.", DataWarning, stacklevel=user_stacklevel())
    return True


def named_parts(inputs) -> list:
    """``(name, array)`` of each part of a batch: a dict's keys, ``input i`` of a tuple, ``None`` for one array."""
    if isinstance(inputs, Mapping):
        return list(inputs.items())
    if isinstance(inputs, (tuple, list)):
        return [(f"input {i}", v) for i, v in enumerate(inputs)]
    return [(None, inputs)]


def token_ids(inputs) -> list:
    """``(name, array)`` of the parts of a batch that are integer arrays of at least 2 axes: token ids."""
    return [(n, v) for n, v in named_parts(inputs)
            if len(getattr(v, "shape", ())) >= 2 and dtype_name(v).startswith(("int", "uint"))]


def _integer_inputs(inputs) -> list:
    """``(name, smallest, largest)`` of each part of a batch holding token ids."""
    out = []
    for name, v in token_ids(inputs):
        if int(np.prod(v.shape)):
            a = np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)
            out.append(("X" if name is None else str(name), int(a.min()), int(a.max())))
    return out


def describe_inputs(inputs) -> str:
    """``shape (256, 784), float32`` / ``input_ids: shape (8, 12), int64, ...`` for messages."""
    return ", ".join(f"shape {tuple(v.shape)}, {dtype_name(v)}" if n is None else
                     f"{n}: shape {tuple(v.shape)}, {dtype_name(v)}" for n, v in named_parts(inputs))
