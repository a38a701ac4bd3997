"""The Keras 3 adapter: functional and Sequential models on any backend (JAX, TensorFlow, PyTorch).

Capture uses Keras's feature-extraction idiom: one extra ``keras.Model(model.input, [layer.output
for ...] + model.outputs)`` built once per runner over the user's own layers (no copy of the
weights, no layer called again, so nothing in the user's model changes) and called in inference
mode. Each captured output comes to the host as NumPy (``keras.ops.convert_to_numpy``) and is
reduced there by the reducers every framework shares (channels-last maps give the same vectors
as the same maps channels-first in PyTorch).

**Nested models.** A functional or Sequential model used as a layer is entered: its layers are
named ``"outer/inner"`` (Keras forbids ``/`` in layer names, so the path is unambiguous), and a
bare inner name is accepted where no other layer has it. Keras keeps a nested model's layers in
the nested model's own graph, which the outer inputs do not reach, so a captured inner layer is
computed by a second extraction model of the nested model, fed with what the outer graph gives
the nested model: that block runs twice per batch (its outer call gives the logits).

**Not supported.** Subclassed models (a ``call`` written in Python) have no graph to take inner
outputs from: rebuild them with the functional API or export them to ONNX. The sub-layers of a
custom layer are not listed (its own output is). A layer shared by several calls is captured at
its first call, as Keras's own ``layer.output`` is.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from typing import Callable, Mapping, Optional

import numpy as np

from ..capture.arrays import NUMPY, dtype_name, fractional, is_floating
from ..capture.data import batch_len
from ..deps import require
from ..exceptions import ActClustError, ActClustWarning, CaptureError, DataError, MissingDependencyError, \
    ParameterError, UnsupportedModelError
from .base import (ModelAdapter, Runner, are_probabilities, call_output, check_captured, check_empty_masks,
                   check_input_range, check_rows, keep_reduced, model_error)

__all__ = ["KerasAdapter", "MASK_KEYS", "import_keras"]

#: Keys of a dict batch read as the attention mask of token maps (Hugging Face's, then KerasHub's).
MASK_KEYS = ("attention_mask", "padding_mask")
_BACKENDS = ("tensorflow", "jax", "torch")


def import_keras():
    """``keras``, or an error saying what to install: Keras itself, or the backend it is set to use."""
    if "keras" not in sys.modules:
        try:
            import keras  # noqa: F401
        except ImportError as e:
            backend = (getattr(e, "name", None) or "").split(".")[0]
            if backend in _BACKENDS:
                raise MissingDependencyError(
                    f"Keras is set to use the {backend} backend, which is not installed ({e}); install it, or set "
                    "KERAS_BACKEND to an installed backend (jax, torch or tensorflow) before importing keras."
                ) from None
        except ValueError as e:  # KERAS_BACKEND=JAX, "jax ", a typo: Keras's own traceback, 45 lines of it
            if "backend" not in str(e):
                raise
            raise ParameterError(
                f"Keras cannot start: {e} (the environment variable KERAS_BACKEND is "
                f"{os.environ.get('KERAS_BACKEND')!r}); set it to jax, torch or tensorflow, in lower case, before "
                "importing keras.") from None
    return require("keras", "explaining a Keras model")


def _is_model(layer) -> bool:
    """Whether ``layer`` is a model with a layer graph (functional or Sequential) that can be entered."""
    keras = sys.modules["keras"]
    if isinstance(layer, keras.Sequential):
        return True
    return isinstance(layer, keras.Model) and _graph_outputs(layer) is not None


def _graph_outputs(model):
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return None
    return outputs if isinstance(outputs, (list, tuple)) and outputs else None


def _own_layers(model) -> list:
    keras = sys.modules["keras"]
    return [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]


def _first(x):
    """A layer's activation: its output, or the first tensor of a list, tuple or dict of outputs."""
    if isinstance(x, Mapping):
        x = list(x.values())
    while isinstance(x, (list, tuple)):
        if not x:
            return None
        x = x[0]
    return x


def _node_output(layer):
    """The output of ``layer``'s first call (what ``layer.output`` is for a plain layer; a nested model's
    own ``output`` is its inner graph's, so the base property is read)."""
    keras = sys.modules["keras"]
    return keras.Operation.output.fget(layer)


def _node_input(layer):
    keras = sys.modules["keras"]
    return keras.Operation.input.fget(layer)


class KerasAdapter(ModelAdapter):
    """A Keras 3 classifier: a functional or Sequential model, on any backend.

    Layer names are the Keras names in the model's order, nested functional and Sequential models
    entered as ``"outer/inner"`` (a bare inner name is accepted where it is unambiguous; an exact
    top-level name wins). Images are channels-last ``(N, H, W, C)`` as Keras has them; layers with
    ``data_format="channels_first"`` are read as such.

    **Logits or probabilities.** actclust reads the model's output as logits. A model that ends in
    a softmax (a last layer with ``activation="softmax"`` or a ``Softmax`` layer, or an output
    whose rows are all probabilities) gives probabilities ``p``; actclust then takes ``log p`` as
    the logits. ``softmax(log p) == p`` and ``argmax`` is unchanged, so predictions, the
    surrogate's class mixes (built from the predicted classes, or from the softmax for
    ``clustering="distill"``) and trust's confidence (the softmax of the logits) are those of the
    model either way; only taking ``p`` itself as logits would be wrong (softmax would flatten it).

    Parameters
    ----------
    model : keras.Model
        A functional or Sequential model, built (called once on a batch, or given an ``Input``).
        Called on NumPy batches, a dict of arrays by input name for a model with several inputs.
    output : callable, optional
        ``output(outputs) -> logits (N, n_classes)``, given the model's outputs as NumPy arrays
        (an array, or a list or dict of arrays as the model returns them). By default the logits
        are the output itself, its ``"logits"`` entry or its first element.

    Examples
    --------
    >>> import os; os.environ.setdefault("KERAS_BACKEND", "jax")  # doctest: +SKIP
    >>> import keras, numpy as np, actclust
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="fc"),
    ...                           keras.layers.Dense(3, name="logits")])
    >>> actclust.list_layers(model)
    ['fc', 'logits']
    """

    mask_keys = MASK_KEYS

    framework = "keras"
    input_channel_axis = -1

    def __init__(self, model, output: Optional[Callable] = None):
        keras = import_keras()
        if not isinstance(model, keras.Model):
            raise UnsupportedModelError(f"The model must be a keras.Model; got {type(model).__name__}.")
        if output is not None and not callable(output):
            raise UnsupportedModelError(f"output must be a callable that returns the logits; got {output!r}.")
        if isinstance(model, keras.Sequential) and _graph_outputs(model) is None:
            raise UnsupportedModelError(
                f"The Sequential model {model.name!r} has not been built, so it has no layer outputs yet: call it once "
                "on a batch (model(x[:1])), or build it with model.build((None, *input_shape)) or a keras.Input "
                "as its first layer."
            )
        if not _is_model(model):
            unbuilt = "" if model.built else " (it has not even been built)"
            raise UnsupportedModelError(
                f"{type(model).__name__} is a subclassed keras.Model: its call() is Python code, so the outputs of "
                f"its inner layers cannot be reached{unbuilt}. Build the same network with the functional API "
                "(keras.Model(inputs, outputs)) or keras.Sequential and load its weights, or export it to ONNX "
                "and explain the .onnx file."
            )
        self.model = model
        self.output = output
        self._layers = {}  # path -> layer, in the model's order, nested models entered
        self._formats: dict = {}  # path -> its data format (asked by every batch of a fit: the graph walked once)
        self._walk(model, "")
        self._probabilities = output is None and _ends_in_softmax(model)

    def _walk(self, model, prefix: str) -> None:
        for layer in _own_layers(model):
            path = prefix + layer.name
            self._layers.setdefault(path, layer)
            if _is_model(layer):
                self._walk(layer, path + "/")

    @property
    def model_class(self) -> str:
        return f"{type(self.model).__module__}.{type(self.model).__qualname__}"

    def layer_names(self) -> list[str]:
        return list(self._layers)

    def canonical(self, name: str) -> str:
        """``name`` itself, or the one nested path ending in ``/name``; several such paths are refused."""
        if name in self._layers or "/" in name:
            return name
        paths = [p for p in self._layers if p.rsplit("/", 1)[-1] == name]
        if len(paths) > 1:
            raise ParameterError(f"The layer name {name!r} is ambiguous: the model has {paths}; give the full path.")
        return paths[0] if paths else name

    # ------------------------------------------------------------------ layouts
    def _data_format(self, path: str, rank: int) -> str:
        """The format of the layer's output of ``rank`` axes: its own ``data_format`` (or a normalisation's channel
        axis), else that of the nearest layer before it along the graph that has one, turned by the ``Permute``
        layers between them; else, where the walk reaches the inputs, or a layer that flattens or reshapes the map
        (its layout starts anew there), Keras's default for maps (``image_data_format``) and channels-last (tokens,
        not a map) for 3 axes.

        Along the graph, not in the order of ``model.layers``: in a model of two branches the nearest layer before in
        that order may be on the other branch (a ReLU after a channels-last Conv2D was read channels-first after a
        channels-first one on another branch; an outside check). A nested model is walked through: its output is
        what its last layer makes, and its inner layers continue, past its inputs, with what feeds it."""
        key = (path, rank)
        if key not in self._formats:
            keras = sys.modules["keras"]
            default = keras.config.image_data_format() if rank >= 4 else "channels_last"
            self._formats[key] = _format_along_graph(self._nodes_to(path), default)
        return self._formats[key]

    def _nodes_to(self, path: str) -> list:
        """The call of ``path``'s layer in its graph, then those of the nested models that hold it, innermost first
        (a layer called more than once is read at its first call, as it is captured)."""
        parts = path.split("/")
        return [_first_node(self._layers["/".join(parts[:i])]) for i in range(len(parts), 0, -1)]

    def layout(self, layer: str, rank: int, masked: bool, shape: tuple = (), strides: Optional[tuple] = None) -> str:
        """Dense for ``(N, F)``; a map of 4 or 5 axes is channels-last unless its layer (or the nearest
        layer before it with a ``data_format``) is channels-first; of 3 axes, a 1-D convolution's or
        pooling's map as its ``data_format`` says, any other layer's a token map ``(N, T, D)``."""
        if rank <= 2:
            return "dense"
        fmt = self._data_format(layer, rank) if layer in self._layers else "channels_last"
        if rank >= 4:
            return fmt
        if layer in self._layers and _own_format(self._layers[layer]) is not None:
            return fmt
        return "channels_first" if fmt == "channels_first" else "tokens"

    # ------------------------------------------------------------------ inputs
    def _inputs(self) -> list:
        return list(self.model.inputs)

    def _input_names(self) -> list[str]:
        struct = _inputs_of(self.model)
        if isinstance(struct, Mapping):
            return [str(k) for k in struct]
        return [t.name for t in self._inputs()]

    def input_names(self) -> Optional[list]:
        names = self._input_names()
        return names if len(names) > 1 else None

    def takes_ids(self) -> bool:
        keras = sys.modules["keras"]
        return any(isinstance(l, keras.layers.Embedding) for l in self._layers.values())

    def zero_masked_input(self) -> Optional[int]:
        """The position of the model input whose padding Keras masks, read straight from that input by an
        ``Embedding(mask_zero=True)`` (its zero ids) or a ``Masking`` layer (its steps whose every value is the
        ``mask_value``), or ``None``. Keras then leaves those tokens out of its own pooling and recurrences: the mask
        is derived from that input, so token maps as long are averaged over the real tokens without a mask in the
        batch (they were averaged over the padding too, without a word, and the command line cannot pass a mask:
        outside checks, first for the Embedding, then for Masking)."""
        return self._mask_source()[0]

    def _mask_source(self) -> tuple:
        """``(input position, masking layer)`` of :meth:`zero_masked_input`, or ``(None, None)``."""
        if not hasattr(self, "_zero_masked"):
            keras, self._zero_masked = sys.modules["keras"], (None, None)
            inputs = self._inputs()
            for layer in self._layers.values():
                masks = (isinstance(layer, keras.layers.Embedding) and getattr(layer, "mask_zero", False)) \
                    or isinstance(layer, keras.layers.Masking)
                if masks:
                    try:
                        fed = layer.input
                    except (AttributeError, ValueError):  # a layer called more than once has no one input
                        continue
                    at = next((i for i, t in enumerate(inputs) if t is fed), None)
                    if at is not None:
                        self._zero_masked = (at, layer)
                        break
        return self._zero_masked

    def derived_mask(self, inputs) -> Optional[np.ndarray]:
        """The token mask :meth:`zero_masked_input` says of a batch without one (``None`` where it says nothing)."""
        at, layer = self._mask_source()
        if at is None:
            return None
        if isinstance(inputs, Mapping):
            ids = inputs.get(self._input_names()[at])
        elif isinstance(inputs, (tuple, list)):
            ids = inputs[at] if at < len(inputs) else None
        else:
            ids = inputs if at == 0 else None
        if ids is None:
            return None
        ids = np.asarray(sys.modules["keras"].ops.convert_to_numpy(ids))
        if isinstance(layer, sys.modules["keras"].layers.Masking):  # (N, T, F) steps: kept where any value differs
            return (ids != np.asarray(layer.mask_value, ids.dtype)).any(-1) if ids.ndim == 3 else None
        return (ids != 0) if ids.ndim == 2 else None

    def has_mask(self, sample) -> bool:
        return super().has_mask(sample) or self.derived_mask(sample) is not None

    def _feed(self, inputs):
        """``inputs`` in the structure of ``model.input`` (a dict by input name, a list, or one array)."""
        struct = _inputs_of(self.model)
        if isinstance(inputs, Mapping):
            inputs = {k: v for k, v in inputs.items()}
            if isinstance(struct, Mapping):
                return {k: inputs[k] for k in struct}
            names = self._input_names()
            values = [inputs[n] for n in names]
            return values[0] if not isinstance(struct, (list, tuple)) else values
        if isinstance(inputs, (tuple, list)):
            return list(inputs) if len(inputs) > 1 else inputs[0]
        return inputs

    def check_inputs(self, inputs, name: str) -> None:
        """Refuse, before any forward pass, inputs the model cannot take: a single array for a model with
        several inputs, missing or unknown dict keys, another rank or size per sample than the model's
        inputs, uint8 images, or integers to a float input of a model with no Embedding layer."""
        model_inputs, names = self._inputs(), self._input_names()
        if isinstance(inputs, Mapping):
            missing = [n for n in names if n not in inputs]
            extra = [k for k in inputs if k not in names and k not in MASK_KEYS]
            if missing or extra:
                raise DataError(
                    f"{name} has the keys {sorted(map(str, inputs))} but the model takes the inputs {names}"
                    + (f"; missing {missing}" if missing else "") + (f"; not inputs of the model: {extra}" if extra else "")
                    + ". Give one array per model input, by name."
                )
            pairs = [(f"{name}[{n!r}]", inputs[n], t) for n, t in zip(names, model_inputs)]
        elif isinstance(inputs, (tuple, list)):
            if len(inputs) != len(model_inputs):
                raise DataError(f"{name} gives {len(inputs)} inputs but the model takes {len(model_inputs)} ({names})"
                                + (": pass the inputs alone, and the labels as y=." if len(inputs) > len(model_inputs)
                                   else "."))
            pairs = [(f"{name}[{i}]", v, t) for i, (v, t) in enumerate(zip(inputs, model_inputs))]
        else:
            if len(model_inputs) != 1:
                raise DataError(
                    f"{name} is a single array but the model takes {len(model_inputs)} inputs {names}: pass a dict "
                    "with one array per input name (on the command line, an .npz with one array per input name)."
                )
            pairs = [(name, inputs, model_inputs[0])]
        for label, value, tensor in pairs:
            self._check_one(label, value, tensor)

    def _check_one(self, label: str, value, tensor) -> None:
        want = tuple(tensor.shape)
        got = tuple(int(s) for s in value.shape)
        shown = "(" + ", ".join("?" if s is None else str(s) for s in want[1:]) + (",)" if len(want) == 2 else ")")
        fits = len(got) == len(want) and all(w is None or w == g for w, g in zip(want[1:], got[1:]))
        if not fits:
            hint = ""
            if len(got) == len(want) == 4 and got[1] == want[3] and got[1] != got[3]:
                hint = " Keras models take channels-last images (N, H, W, C): np.moveaxis(x, 1, -1) converts them."
            elif len(got) + 1 == len(want) and want[-1] == 1:
                hint = " Add the channel axis: x[..., None]."
            raise DataError(
                f"{label} has samples of shape {got[1:]}, but the model's input {tensor.name!r} takes samples of "
                f"shape {shown} ({len(want) - 1} axes after the batch axis; ? is any size).{hint}"
            )
        model_float = "float" in str(tensor.dtype)
        dtype = dtype_name(value)
        if not model_float and "int" in str(tensor.dtype) and is_floating(value) and fractional(value):
            # Keras casts them to the input's integers: 3.7 became 3 without a word (an outside check)
            raise DataError(f"{label} holds fractional values but the model's input {tensor.name!r} is "
                            f"{tensor.dtype} (token ids, indices): pass the integers the model was trained on.")
        if model_float and dtype == "uint8":
            keras = sys.modules["keras"]
            scales = [l.name for l in self._layers.values()
                      if isinstance(l, (keras.layers.Rescaling, keras.layers.Normalization))]
            # a model that scales its own inputs: the advice to divide by 255 scaled them twice (an outside check)
            how = (f"with x.astype('float32') alone: the model's {scales[0]!r} layer scales them itself, so do not "
                   "divide them by 255" if scales else "and normalise as in training, e.g. x.astype('float32') / 255")
            raise DataError(f"{label} holds uint8 values (raw image bytes?): convert to float {how}.")
        if model_float and not is_floating(value) and dtype != "bool" and not self.takes_ids():
            raise DataError(
                f"{label} holds {dtype} values but the model's input {tensor.name!r} is {tensor.dtype} and the model "
                "has no Embedding layer that takes integer ids: convert the inputs to float (as in training)."
            )

    def check_range(self, inputs, where: str) -> None:
        """Refuse a batch holding values past the range of a float16 model input, which Keras casts them to: they
        became infinite, and the layer that met them was blamed (an outside check)."""
        names = self._input_names()
        parts = (inputs if isinstance(inputs, Mapping) else dict(zip(names, inputs)) if isinstance(inputs, (tuple, list))
                 else {names[0]: inputs})
        for tensor, key in zip(self._inputs(), names):
            value = parts.get(key)
            if value is None or str(tensor.dtype) not in ("float16", "bfloat16") or not is_floating(value):
                continue
            top = float(np.finfo(np.float16).max) if str(tensor.dtype) == "float16" else 3.39e38
            check_input_range(sys.modules["keras"].ops.convert_to_numpy(value), top, str(tensor.dtype), where, key)

    # ------------------------------------------------------------------ weights
    def fingerprint(self) -> str:
        """SHA-256 over every weight (trainable or not), named by its layer's path and its position in
        that layer, with its dtype, shape and bytes: the same for the same weights on any backend and
        however the model was built or loaded (Keras's own variable paths depend on name scopes)."""
        keras = sys.modules["keras"]
        h = hashlib.sha256()
        seen: set = set()
        entries = []
        for path, layer in self._layers.items():
            if _is_model(layer):
                continue  # its layers are listed themselves
            for i, v in enumerate(layer.weights):
                if id(v) not in seen:
                    seen.add(id(v))
                    entries.append((f"{path}#{i}:{v.name}", v))
        for i, v in enumerate(self.model.weights):  # weights of the model itself, outside any layer
            if id(v) not in seen:
                seen.add(id(v))
                entries.append((f"#{i}:{v.name}", v))
        for key, v in entries:
            a = np.ascontiguousarray(keras.ops.convert_to_numpy(v.value))
            h.update(f"{key}|{v.dtype}|{tuple(a.shape)}|".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ passes
    def logits(self, outputs, n: int) -> np.ndarray:
        """The ``(n, n_classes)`` float32 logits in the model's outputs (NumPy); probabilities become log-probabilities."""
        custom, picked = self.output is not None, ""
        if custom:
            out = call_output(self.output, outputs)
        else:
            out = outputs
            if isinstance(out, Mapping):
                key = "logits" if "logits" in out else next(iter(out))
                out, picked = out[key], f"its output {key!r} (of {list(outputs)})" if len(outputs) > 1 else ""
            elif isinstance(out, (list, tuple)) and out:
                out, picked = out[0], f"its first output (of {len(outputs)})" if len(outputs) > 1 else ""
        if not isinstance(out, np.ndarray) and hasattr(out, "shape") and hasattr(out, "dtype"):
            out = sys.modules["keras"].ops.convert_to_numpy(out)
        if not isinstance(out, np.ndarray):
            raise CaptureError(
                f"{'output= returned' if custom else 'The model returned'} a {type(out).__name__}; actclust looks for "
                "the logits as an array, a key 'logits' or the first output. Pass output=<function of the model's "
                "outputs (NumPy) that returns the logits>."
            )
        if out.ndim != 2 or out.shape[0] != n or out.shape[1] < 2:
            if picked:  # several outputs: the one taken may not be the classifier's
                hint = (" Pass output=<function of the outputs that returns the classifier's logits>, e.g. "
                        "output=lambda o: o['cls'] for a dict of outputs.")
            elif out.ndim == 2 and out.shape[1:] == (1,):
                hint = (" A single sigmoid output gives one column: pass output=lambda p: np.concatenate([np.log1p(-p), "
                        "np.log(p)], 1) for two classes.")
            else:
                hint = ""
            raise CaptureError(
                "The model must return logits of shape (N, n_classes) with n_classes >= 2; for a batch "
                f"of {n} it returned shape {tuple(out.shape)}{f' ({picked})' if picked else ''}.{hint}"
            )
        if not np.issubdtype(out.dtype, np.floating) and out.dtype.name not in ("bfloat16",):
            raise CaptureError(f"The model must return floating-point logits; got dtype {out.dtype}.")
        self.picked_output = picked  # said again where labels do not fit it (check_label_range)
        if picked and not getattr(self, "_said_output", False):  # several outputs, none named 'logits': said once
            self._said_output = True
            warnings.warn(f"The model has several outputs; actclust reads the logits from {picked}, of shape "
                          f"{tuple(out.shape)}. If that is not the classifier's output, pass output=<function of the "
                          "outputs that returns its logits>.", ActClustWarning, stacklevel=2)
        a = out.astype(np.float32)
        if self._probabilities or are_probabilities(self, len(a), float(a.min()), float(a.max()),
                                                    float(np.abs(a.sum(1) - 1).max()), out.dtype.itemsize < 4,
                                                    "np.log(p)"):
            return np.log(np.maximum(a, np.finfo(np.float32).tiny))
        return a

    def _extractor(self, paths) -> "_Extractor":
        return _Extractor(self.model, [p for p in self._layers if p in set(paths)], self._layers)

    def output_shapes(self, sample) -> dict:
        """Output shapes of every layer on ``sample`` (one pass of an extraction model of every layer)."""
        if not isinstance(sample, (Mapping, tuple, list)):
            sample = np.asarray(sample)
        self.check_inputs(sample, "sample")
        outputs, taps = _call(self._extractor(self._layers), self._feed(sample), "sample")
        return {p: tuple(int(s) for s in taps[p].shape) for p in self._layers if p in taps}

    def runner(self, reducers: Mapping[str, Callable], layouts: Optional[Mapping[str, str]] = None) -> "_KerasRunner":
        return _KerasRunner(self, reducers, layouts)


def _first_node(layer):
    nodes = getattr(layer, "_inbound_nodes", None) or [None]
    return nodes[0]


def _format_along_graph(calls: list, default: str) -> str:
    """The format of the first of ``calls`` (a layer's call node, then those of the nested models holding it): the
    nearest ``data_format`` before it, breadth first, through nested models and out of them, turned by the
    ``Permute`` layers on the way; ``default``, so turned, where a path ends first (at an input, at a Flatten or a
    Reshape, or at a layer of at most 2 axes), or where the layer has no call node (a subclassed model's)."""
    keras = sys.modules["keras"]
    if calls[0] is None:
        return default
    todo, seen, ended = [(calls[0], (), tuple(calls[1:]), True)], set(), None
    while todo:
        nxt = []
        for node, permutes, outers, start in todo:
            if id(node) in seen:
                continue
            seen.add(id(node))
            op = node.operation
            if _is_model(op):  # a nested model's output: what its last layer makes
                history = getattr(_graph_outputs(op)[0], "_keras_history", None)
                if history is not None:
                    nxt.append((history.operation._inbound_nodes[history.node_index], permutes, (node,) + outers,
                                start))
                    continue
            shape = getattr((node.outputs or [None])[0], "shape", None)
            if not start and shape is not None and len(shape) <= 2:  # a Flatten's, a Dense's on rows: no map to
                ended = ended or _turned(default, permutes, default)  # follow; the layout starts anew after it
                continue
            fmt = None if isinstance(op, keras.layers.Flatten) else _own_format(op)
            if fmt is not None:
                return _turned(fmt, permutes, default)
            if isinstance(op, keras.layers.Permute):
                permutes = (("permute", tuple(op.dims)),) + permutes  # applied after whatever lies further back
            elif isinstance(op, keras.layers.Reshape):
                inputs = getattr(node, "input_tensors", None) or [None]
                permutes = (("reshape", tuple(getattr(inputs[0], "shape", ())), tuple(shape or ())),) + permutes
            parents, resume = list(node.parent_nodes), outers
            if not parents and outers:  # a nested model's input: on with what feeds the model
                parents, resume = list(outers[0].parent_nodes), outers[1:]
            if not parents:
                ended = ended or _turned(default, permutes, default)
            nxt.extend((p, permutes, resume, False) for p in parents)
        todo = nxt
    return _format_of_readers(calls[0]) or ended or default


def _format_of_readers(node) -> Optional[str]:
    """Where nothing before a map says its format (it starts at an input, or a Dense's output reshaped): the format
    of the nearest layer after it that has one, through layers that keep its axes (a Reshape to a map that a
    channels-first Conv2D then reads is channels-first)."""
    keras = sys.modules["keras"]
    rank = len(getattr((node.outputs or [None])[0], "shape", ()) or ())
    todo, seen = [node], {id(node)}
    while todo:
        nxt = []
        for n in todo:
            readers = [r for r in getattr(n.operation, "_outbound_nodes", []) if any(p is n for p in r.parent_nodes)]
            for r in readers:
                if id(r) in seen:
                    continue
                seen.add(id(r))
                op = r.operation
                fmt = None if isinstance(op, keras.layers.Flatten) else _own_format(op)
                if fmt is not None:
                    return fmt
                shape = getattr((r.outputs or [None])[0], "shape", None)
                if not (_is_model(op) or isinstance(op, (keras.layers.Permute, keras.layers.Reshape))
                        or shape is None or len(shape) != rank):
                    nxt.append(r)
        todo = nxt
    return None


def _turned(fmt: str, steps: tuple, default: str) -> str:
    """``fmt`` after the ``("permute", dims)`` (1-based, batch axis left out) and ``("reshape", input shape, output
    shape)`` steps, first to last: the channels axis a Permute moves first or last makes the map channels-first or
    -last (moved elsewhere, the format stays); a Reshape that keeps the channels axis whole at its end (a
    channels-first map's spatial axes merged, ``(N, C, H, W)`` to ``(N, C, H W)``) keeps the format, another gives
    ``default``."""
    for kind, *shapes in steps:
        if kind == "reshape":
            before, after = shapes
            at = 1 if fmt == "channels_first" else -1
            if len(before) < 2 or len(after) < 2 or before[at] is None or before[at] != after[at]:
                fmt = default
            continue
        dims = list(shapes[0])
        channels = 1 if fmt == "channels_first" else len(dims)
        at = dims.index(channels) + 1 if channels in dims else None
        fmt = "channels_first" if at == 1 else "channels_last" if at == len(dims) else fmt
    return fmt


def _own_format(layer) -> Optional[str]:
    fmt = getattr(layer, "data_format", None)
    if fmt in ("channels_first", "channels_last"):
        return fmt
    keras = sys.modules["keras"]
    if isinstance(layer, keras.layers.BatchNormalization):
        return "channels_first" if layer.axis == 1 else None
    return None


def _ends_in_softmax(model) -> bool:
    """Whether the model's (first) output comes from a softmax: an activation, a Softmax layer, or a
    nested model ending in one."""
    keras = sys.modules["keras"]
    history = getattr(_graph_outputs(model)[0], "_keras_history", None)
    layer = history[0] if history is not None else (_own_layers(model) or [None])[-1]
    if layer is None:
        return False
    if isinstance(layer, keras.layers.Softmax):
        return True
    if _is_model(layer):
        return _ends_in_softmax(layer)
    return getattr(getattr(layer, "activation", None), "__name__", None) == "softmax"


class _Extractor:
    """One extraction model of ``model`` (its outputs, the captured layers' outputs, and the inputs of
    the nested models whose layers are captured) and, per such nested model, its own extractor."""

    def __init__(self, model, paths: list, layers: Mapping, prefix: str = ""):
        keras = sys.modules["keras"]
        self.model = model
        self.struct = _outputs_of(model) if prefix == "" else None
        own = {l.name: l for l in _own_layers(model)}
        tensors, self.taps, self.children = [], [], []
        if self.struct is not None:
            tensors.extend(keras.tree.flatten(self.struct))
        self.n_out = len(tensors)
        for path in paths:  # in the model's order
            rest = path[len(prefix):]
            if "/" not in rest:
                self.taps.append((path, len(tensors)))
                tensors.append(_node_output(own[rest]))
        nested = dict.fromkeys(p[len(prefix):].split("/", 1)[0] for p in paths if "/" in p[len(prefix):])
        for name in nested:
            sub = prefix + name + "/"
            inner = [p for p in paths if p.startswith(sub)]
            feed = _node_input(own[name])
            self.children.append((len(tensors), len(keras.tree.flatten(feed)), feed,
                                  _Extractor(own[name], inner, layers, sub)))
            tensors.extend(keras.tree.flatten(feed))
        try:
            self.fe = keras.Model(_inputs_of(model), tensors, name=f"actclust_{model.name}")
        except ValueError as e:
            raise UnsupportedModelError(
                f"The outputs of the captured layers of {model.name!r} cannot be reached from its inputs ({e}): a "
                "layer's output in Keras is that of its first call, and a layer or nested model first called in "
                "another model has it there. Capture other layers, or build this model with layers of its own (or "
                "export it to ONNX)."
            ) from e

    def __call__(self, feed) -> tuple:
        """``(model outputs or None, {path: output of the first call})`` for one batch, as backend tensors."""
        keras = sys.modules["keras"]
        values = self.fe(feed, training=False)
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        outputs = keras.tree.pack_sequence_as(self.struct, values[:self.n_out]) if self.struct is not None else None
        taps = {path: _first(values[i]) for path, i in self.taps}
        for start, count, feed_struct, child in self.children:
            sub = values[start:start + count]
            sub_feed = keras.tree.pack_sequence_as(feed_struct, sub) if count > 1 else sub[0]
            taps.update(child(sub_feed)[1])
        return outputs, taps


def _inputs_of(model):
    """The model's input structure (one tensor, a list or a dict), as it was built."""
    struct = model.inputs if isinstance(model, sys.modules["keras"].Sequential) else model.input
    if isinstance(struct, (list, tuple)) and len(struct) == 1:
        return struct[0]
    return struct


def _outputs_of(model):
    """The model's output structure (one tensor, a list or a dict), as it was built."""
    struct = model.outputs if isinstance(model, sys.modules["keras"].Sequential) else model.output
    if isinstance(struct, (list, tuple)) and len(struct) == 1:
        return struct[0]
    return struct


def _call(extractor: _Extractor, feed, where: str):
    """Run ``extractor`` on a batch; outputs and taps as NumPy. The model's errors become CaptureError."""
    keras = sys.modules["keras"]
    try:
        if keras.config.backend() == "torch":
            import torch  # the backend: imported already

            with torch.no_grad():
                outputs, taps = extractor(feed)
        else:
            outputs, taps = extractor(feed)
        to_np = keras.ops.convert_to_numpy
        outputs = keras.tree.map_structure(to_np, outputs) if outputs is not None else None
        return outputs, {p: to_np(t) for p, t in taps.items()}
    except ActClustError:
        raise
    except Exception as e:
        raise model_error(e, where, feed) from e


class _KerasRunner(Runner):
    """An extraction model of the captured layers, built once; outputs reduced on the host with NumPy."""

    def __init__(self, adapter: KerasAdapter, reducers: Mapping[str, Callable], layouts=None):
        self.adapter = adapter
        self.fixed = dict(layouts) if layouts else None
        self.layouts: dict = dict(layouts) if layouts else {}
        order = adapter.layer_names()
        self.reducers = {p: reducers[p] for p in order if p in reducers}  # the model's order: first bad layer named
        self.extractor = adapter._extractor(self.reducers)

    def run(self, inputs, where: str = "a batch"):
        n = batch_len(inputs)
        mask = next((inputs[k] for k in MASK_KEYS if k in inputs), None) if isinstance(inputs, Mapping) else None
        mask = self.adapter.derived_mask(inputs) if mask is None else np.asarray(
            sys.modules["keras"].ops.convert_to_numpy(mask))
        if not getattr(self, "_said_empty", False):
            self._said_empty = check_empty_masks(mask, where)
        self.adapter.check_range(inputs, where)
        outputs, taps = _call(self.extractor, self.adapter._feed(inputs), where)
        logits = self.adapter.logits(outputs, n)
        kept = {}
        for name, reduce in self.reducers.items():
            t = taps[name]
            check_rows(name, tuple(t.shape), n)
            t = np.asarray(t, dtype=np.float32)
            layout = self.fixed[name] if self.fixed else self.adapter.layout(name, t.ndim, mask is not None)
            self.layouts.setdefault(name, layout)
            keep_reduced(kept, name, reduce(t, mask, layout=layout, ops=NUMPY), NUMPY.to_host)
        check_captured(logits, kept, where)
        return logits, kept


