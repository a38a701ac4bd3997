"""The ONNX adapter: any model exported to ONNX (PyTorch, TensorFlow via tf2onnx, scikit-learn via
skl2onnx...) run with onnxruntime, no framework needed.

ONNX has no hooks and no autograd; a forward-only method needs neither. Layers are the graph's
**tensors** (node outputs), named as in the graph; a node's name also resolves to its first
output. The chosen tensors are added as extra outputs of one copy of the graph, run by one
onnxruntime session per set of layers (the model is not kept once per layer); the user's model
is not changed. Each tensor's layout is read from the operators that produce it: the outputs of
convolutions, pools and normalisations (through element-wise operators after them) are
channels-first ``(N, C, H, W)``, as ONNX defines them; a ``Transpose`` to ``(0, 2, 3, 1)``
(tf2onnx's way back to TensorFlow's layout) makes a map channels-last; other 3-axis tensors are
token maps ``(N, T, D)``.

Inputs: one array for a model of one input; a dict by input name (or a tuple in the graph's order)
for several. Floating inputs are cast to the input's element type; integer inputs to a float
input are refused. A model whose batch axis is fixed (exported without a dynamic axis) is run in
slices of that size. The execution providers are onnxruntime's: CUDA first when available, or
``providers=``. The fingerprint is a SHA-256 over the initializers (names, types, shapes, bytes).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ..capture.arrays import NUMPY, dtype_name, fractional, is_floating, to_numpy
from ..capture.data import batch_len
from ..deps import require
from ..exceptions import (ActClustError, ActClustWarning, CaptureError, DataError, DataWarning, UnsupportedModelError,
                          user_stacklevel)
from ..state import SUMMARY_SUFFIX
from .base import (ModelAdapter, Runner, are_probabilities, call_output, check_captured, check_input_range,
                   keep_reduced, model_error)

__all__ = ["OnnxAdapter", "load_onnx"]

MASK_KEYS = ("attention_mask",)
#: Operators whose output maps are channels-first (ONNX's convention for them).
_CHANNELS_FIRST_OPS = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool",
                       "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "BatchNormalization",
                       "InstanceNormalization", "LRN", "MaxRoiPool", "DepthToSpace", "SpaceToDepth"}
#: Operators that keep their input's layout (followed back to find it).
_KEEP_LAYOUT_OPS = {"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish",
                    "Tanh", "Softplus", "Softsign", "Clip", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp",
                    "Log", "Abs", "Neg", "Identity", "Dropout", "Cast", "Mish", "Gelu", "Erf", "Max", "Min", "Sum",
                    "Mean", "Where", "QuantizeLinear", "DequantizeLinear", "Pad", "Resize", "Upsample"}
_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16 (onnx.TensorProto)


def external_tensors(proto) -> list:
    """The names of the tensors an ONNX graph, read without its external data, keeps in other files."""
    tensors = list(proto.graph.initializer) + [a.t for n in proto.graph.node for a in n.attribute if a.HasField("t")]
    return [t.name for t in tensors if t.data_location == 1 or len(t.external_data)]  # 1: TensorProto.EXTERNAL


def load_onnx(model):
    """An ``onnx.ModelProto`` from a path, bytes or a ModelProto; a clear error for anything else."""
    onnx = require("onnx", "explaining an ONNX model")
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        try:
            return onnx.load_model_from_string(bytes(model))
        except Exception as e:  # the protobuf decoder's errors vary by version
            raise UnsupportedModelError(f"The bytes given as the model are not an ONNX model ({type(e).__name__}: {e}).") from None
    path = Path(os.fspath(model))
    if not path.is_file():
        raise UnsupportedModelError(f"No ONNX model at {path}: the file does not exist.")
    try:
        proto = onnx.load(str(path))
    except Exception as e:
        import zipfile

        if zipfile.is_zipfile(path):  # a .keras file under another name: its decoder error said nothing of that
            raise UnsupportedModelError(f"{path} is not an ONNX model but a zip archive, as a Keras model file is: if it "
                                        "is one, name it .keras.") from None
        raise UnsupportedModelError(
            f"{path} is not an ONNX model ({type(e).__name__}: {str(e)[:200]}); export your model with "
            "torch.onnx.export, tf2onnx or skl2onnx.") from None
    if not proto.graph.node:
        raise UnsupportedModelError(f"{path} is not an ONNX model: it holds no graph.")
    return proto


class OnnxAdapter(ModelAdapter):
    """An ONNX classifier run with onnxruntime.

    Parameters
    ----------
    model : path, bytes or onnx.ModelProto
    output : callable, optional
        ``output(outputs) -> logits (N, n_classes)`` where ``outputs`` is the dict of the graph's
        outputs by name; by default the first floating ``(N, C)`` output (``C >= 2``). Probabilities
        (rows in [0, 1] summing to 1, as skl2onnx's ``probabilities``) are taken as their logarithm,
        which the softmax turns back into them: the DNN's predictions and confidence are unchanged.
    providers : list of str, optional
        onnxruntime execution providers; default CUDA then CPU where CUDA is available, else CPU.
    """

    framework = "onnx"
    layer_kind = "tensor (node output)"

    def __init__(self, model, output: Optional[Callable] = None, providers: Optional[Sequence[str]] = None):
        self.ort = require("onnxruntime", "explaining an ONNX model")
        self.onnx = require("onnx", "explaining an ONNX model")
        self.proto = load_onnx(model)
        self.source = None if isinstance(model, (bytes, bytearray, self.onnx.ModelProto)) else os.fspath(model)
        if output is not None and not callable(output):
            raise UnsupportedModelError(f"output must be a callable that returns the logits; got {output!r}.")
        self.output = output
        available = self.ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        missing = [p for p in providers if p not in available]
        if missing:
            raise UnsupportedModelError(f"onnxruntime has no execution provider {missing}; available: {available}.")
        self.providers = list(providers)
        self._layouts: Optional[dict] = None  # every tensor's layout, found at the first question
        self._graph()
        self._sessions: dict = {}

    # ---------------------------------------------------------------- the graph
    def _graph(self) -> None:
        g = self.proto.graph
        inferred = g
        for data_prop in (True, False):  # with the values of shape arithmetic followed (a Reshape's target built by
            try:                         # Shape, Gather and Concat), where inference manages it
                inferred = self.onnx.shape_inference.infer_shapes(self.proto, strict_mode=False,
                                                                  data_prop=data_prop).graph
                break
            except Exception:  # shape inference is a help, not a requirement
                continue
        self.types = {}  # tensor -> (elem_type, shape with None for unknown dims)
        not_tensors = set()  # values of other types: sequences, maps (skl2onnx's ZipMap probabilities)
        for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
            if vi.type.HasField("sequence_type") or vi.type.HasField("map_type") or vi.type.HasField("optional_type"):
                not_tensors.add(vi.name)
                continue
            t = vi.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim) if t.HasField("shape") else None
            self.types[vi.name] = (t.elem_type, dims)
        initializers = {i.name for i in g.initializer}
        self.inputs = [i.name for i in g.input if i.name not in initializers]
        self.outputs = [o.name for o in g.output]
        self.producer = {}
        constant = set(initializers)
        names, node_names = [], {}
        for node in g.node:
            if node.op_type == "Constant" or (node.input and all(i in constant or not i for i in node.input)):
                constant.update(o for o in node.output if o)
                continue
            for o in node.output:
                if o:
                    self.producer[o] = node
                    elem = self.types.get(o, (None, None))[0]
                    if o not in not_tensors and (elem in (None, 0) or elem in _FLOAT_TYPES):
                        names.append(o)
            if node.name and node.output and node.output[0]:
                node_names[node.name] = node.output[0]
        self.names = names
        self.node_names = {k: v for k, v in node_names.items() if k not in set(names)}
        self.weight_ranks = {i.name: len(i.dims) for i in g.initializer}  # and of Constant nodes' tensors:
        self.weight_ranks.update((n.output[0], len(a.t.dims)) for n in g.node if n.op_type == "Constant" and n.output
                                 for a in n.attribute if a.HasField("t"))

    @property
    def model_class(self) -> str:
        g = self.proto.graph
        producer = self.proto.producer_name or "unknown producer"
        return f"onnx:{g.name or (Path(self.source).stem if self.source else 'model')} ({producer})"

    def layer_names(self) -> list[str]:
        return list(self.names)

    def canonical(self, name: str) -> str:
        return self.node_names.get(name, name)

    def layout(self, layer: str, rank: int, masked: bool, shape: tuple = (), strides: Optional[tuple] = None) -> str:
        """From the operators that make the tensor, followed back: convolutions, pools and normalisations give
        channels-first maps; a Transpose moves the channels axis of whatever it transposes (a map to channels-last, a
        token map ``(N, T, D)`` to a channels-first ``(N, D, T)``); element-wise operators, slices, concatenations,
        splits, a LayerNormalization, a MatMul by a weight matrix and a Reshape that keeps the channels axis whole keep
        the layout of their input (the first of their inputs whose layout is known). Where nothing says: tokens for 3
        axes, channels-first for more."""
        if rank <= 2:
            return "dense"
        if self._layouts is None:
            self._layouts = self._all_layouts()
        return self._layouts.get(layer) or _unsaid(rank)

    def _all_layouts(self) -> dict:
        """Every tensor's layout as its operators say, None where none does (a MatMul of two activations, attention, a
        Gather...): one pass over the nodes in the graph's order, each made from its inputs' (no recursion: graphs
        of thousands of nodes)."""
        found: dict = {n: self._input_layout(n, len(self.types.get(n, (None, None))[1] or ())) for n in self.inputs}
        for node in self.proto.graph.node:
            op, out = node.op_type, [o for o in node.output if o]
            layout = None
            if op in _CHANNELS_FIRST_OPS:
                layout = "channels_first"
            elif op == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                rank = len(perm) if perm else len(self.types.get(node.input[0], (None, None))[1] or ())
                perm = perm or list(range(rank))[::-1]
                source = found.get(node.input[0]) or _unsaid(rank)
                channels = perm.index(1 if source == "channels_first" else rank - 1) if rank >= 3 else None
                layout = ("channels_first" if channels == 1 else None if channels != rank - 1 else
                          "tokens" if rank == 3 else "channels_last")  # 3 axes, features last: tokens, masked
            elif op in _KEEP_LAYOUT_OPS or op in ("Slice", "Concat", "Split", "LayerNormalization") or (
                    op == "MatMul" and self._over_last_axis(node)):
                data = node.input[:1] if op in ("LayerNormalization", "MatMul", "Slice", "Split") else node.input
                layout = next((found[i] for i in data if found.get(i)), None)
            elif op == "Reshape":
                layout = self._reshaped(node, found.get(node.input[0]))
            for o in out:
                found[o] = layout
        return found

    def _reshaped(self, node, source: Optional[str]) -> Optional[str]:
        """A Reshape's layout: its input's (``source``), where the channels axis comes out whole at the same end (a
        map's spatial axes merged, ``(N, C, H, W)`` to ``(N, C, H W)``; a Swin block's ``(N, H W, C)`` to
        ``(N, H, W, C)``)."""
        before = self.types.get(node.input[0], (None, None))[1] or ()
        after = self.types.get(node.output[0], (None, None))[1] or ()
        grouped = self._grouped(node, after)
        if grouped is not None:
            return grouped
        if len(before) < 3 or len(after) < 3:
            return None
        source = source or _unsaid(len(before))
        at = 1 if source == "channels_first" else -1
        if before[at] is None or before[at] != after[at]:
            return None
        return "channels_first" if at == 1 else "channels_last" if len(after) >= 4 else "tokens"

    def _grouped(self, node, after: tuple) -> Optional[str]:
        """A GroupNorm as exported (Reshape to groups, InstanceNormalization, Reshape back to the map's own shape):
        the layout of the map it normalises, channels-first (its channels are what the groups split)."""
        norm = self.producer.get(node.input[0])
        inner = self.producer.get(norm.input[0]) if norm is not None and norm.op_type == "InstanceNormalization" else None
        if inner is None or inner.op_type != "Reshape":
            return None
        dims = self.types.get(inner.input[0], (None, None))[1] or ()
        known = len(dims) == len(after) >= 3 and all(d is not None for d in dims[1:])
        return "channels_first" if known and tuple(dims[1:]) == tuple(after[1:]) else None

    def _over_last_axis(self, node) -> bool:
        """Whether a MatMul works along its first input's last axis alone, keeping the others in place: by a constant
        weight matrix (a Linear)."""
        return len(node.input) == 2 and self.weight_ranks.get(node.input[1]) == 2

    def _input_layout(self, name: str, rank: int) -> str:
        dims = self.types.get(name, (None, None))[1] or ()
        if rank == 4 and len(dims) == 4 and dims[3] in (1, 3, 4) and dims[1] not in (1, 3, 4):
            return "channels_last"
        return "channels_first" if rank >= 4 else "tokens"

    @property
    def input_channel_axis(self) -> int:
        first = self.inputs[0] if self.inputs else None
        dims = self.types.get(first, (None, None))[1] or ()
        return -1 if len(dims) == 4 and self._input_layout(first, 4) == "channels_last" else 1

    # ---------------------------------------------------------------- inputs
    def _named(self, inputs) -> dict:
        """The batch's inputs by the graph's input names, refused where they are not the graph's inputs."""
        if isinstance(inputs, Mapping):
            # an "attention_mask" the graph does not take is the token mask alone (its token maps pooled by it)
            unknown = [k for k in inputs if k not in self.inputs and k not in MASK_KEYS]
            missing = [k for k in self.inputs if k not in inputs]
            if unknown or missing:
                raise DataError(f"The ONNX model's inputs are {self.inputs}; the batch has {sorted(inputs)} "
                                f"(missing {missing}, unknown {unknown}).")
            return {k: v for k, v in inputs.items() if k in self.inputs}
        if isinstance(inputs, (tuple, list)):
            if len(inputs) != len(self.inputs):
                raise DataError(f"The ONNX model takes {len(self.inputs)} inputs {self.inputs}; the batch has {len(inputs)}"
                                + (": pass the inputs alone, and the labels as y=." if len(inputs) > len(self.inputs)
                                   else "."))
            return dict(zip(self.inputs, inputs))
        if len(self.inputs) != 1:
            raise DataError(f"The ONNX model takes {len(self.inputs)} inputs {self.inputs}, and X is a single array: pass a "
                            "dict of arrays by input name, or a tuple in that order (on the command line, an .npz with "
                            "one array per input name).")
        return {self.inputs[0]: inputs}

    def input_names(self) -> Optional[list]:
        return list(self.inputs) if len(self.inputs) > 1 else None

    def feeds(self, inputs, where: str = "the batch") -> dict:
        """The session's inputs by name, cast to the graph's element types (``where``: the batch, for errors)."""
        named = self._named(inputs)
        out = {}
        for name, value in named.items():
            a = np.ascontiguousarray(to_numpy(value))
            elem = self.types.get(name, (None, None))[0]
            if elem:
                with np.errstate(over="ignore"):  # said below, naming the row, not as NumPy's RuntimeWarning
                    cast = a.astype(self.onnx.helper.tensor_dtype_to_np_dtype(elem), copy=False)
                if elem in _FLOAT_TYPES and cast.dtype.kind == "f" and a.dtype.kind == "f" \
                        and not np.isfinite(cast).all():  # a float16 graph: values past 65504 became infinite
                    check_input_range(a, float(np.finfo(cast.dtype).max), str(cast.dtype), where, name)
                a = cast
            out[name] = a
        return out

    def check_inputs(self, inputs, name: str) -> None:
        """Refuse, before any work, inputs the graph cannot take: integers or bytes for a float input,
        another rank, or another size on a fixed axis."""
        for key, value in self._named(inputs).items():
            if key not in self.types:
                continue
            elem, dims = self.types[key]
            label = name if len(self.inputs) == 1 else f"{name}[{key!r}]"
            if elem not in _FLOAT_TYPES and is_floating(value) and fractional(value):
                # cast to the graph's integers, 3.7 became 3 without a word (an outside check)
                raise DataError(f"{label} holds fractional values but the model's input {key!r} takes integers "
                                "(token ids, indices): pass the integers the model was trained on.")
            if elem in _FLOAT_TYPES and not is_floating(value):
                if dtype_name(value) == "uint8":
                    raise DataError(f"{label} holds uint8 values (raw image bytes?) but the model's input {key!r} is "
                                    "floating: convert to float and normalise as in training, e.g. x.astype('float32') / 255.")
                raise DataError(f"{label} holds {dtype_name(value)} values but the model's input {key!r} is floating: "
                                "convert the inputs to float (as in training).")
            if dims is None:
                continue
            shape = tuple(value.shape)
            if len(shape) != len(dims):
                raise DataError(f"{label} has {len(shape)} axes {shape} but the model's input {key!r} has {len(dims)} "
                                f"({_dims(dims)}): pass inputs of that shape.")
            bad = [i for i, (d, s) in enumerate(zip(dims, shape)) if i > 0 and d and d != s]
            if bad:
                raise DataError(f"{label} has shape {shape} but the model's input {key!r} is {_dims(dims)}: axis "
                                f"{bad[0]} must be {dims[bad[0]]}.")

    def fingerprint(self) -> str:
        from onnx import numpy_helper

        h = hashlib.sha256()
        for init in sorted(self.proto.graph.initializer, key=lambda i: i.name):
            a = numpy_helper.to_array(init, base_dir=str(Path(self.source).parent) if self.source else "")
            h.update(f"{init.name}|{a.dtype}|{tuple(a.shape)}|".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    # ---------------------------------------------------------------- running
    def session(self, layers: Sequence[str], reduced: Optional[dict] = None):
        """One onnxruntime session whose outputs are the graph's, ``layers`` (as they are) and, for the layers
        in ``reduced`` (``{layer: (layout, summary grid and seed or None)}``), their mean over space and their
        spatial summary computed in the graph (cached per set of outputs; one session at a time)."""
        reduced = reduced or {}
        key = (tuple(sorted(layers)), tuple(sorted((k, v[0], v[1]) for k, v in reduced.items())))
        if key not in self._sessions:
            proto = self.onnx.ModelProto()
            proto.CopyFrom(self.proto)  # the user's model is not changed
            have = {o.name for o in proto.graph.output}
            for name in layers:
                if name not in have and name not in reduced:
                    elem = self.types.get(name, (None, None))[0] or self.onnx.TensorProto.FLOAT
                    proto.graph.output.append(self.onnx.helper.make_tensor_value_info(name, elem, None))
            for name, (layout, summary) in reduced.items():
                self._add_reduction(proto.graph, name, layout, summary)
            options = self.ort.SessionOptions()
            options.log_severity_level = 3
            try:
                session = self.ort.InferenceSession(proto.SerializeToString(), options, providers=self.providers)
            except Exception as e:
                raise UnsupportedModelError(f"onnxruntime cannot run the model with outputs {list(layers)}: {e}") from None
            self._sessions = {key: session}  # one session at a time: the model is held once
        return self._sessions[key]

    def reducible(self, name: str, layout: str, plan: Optional[dict]) -> bool:
        """Whether ``name``'s reduction (``plan``, see :func:`actclust.capture.passes.hooked`) can run inside the
        graph: the mean of a float32 map over its spatial axes (``auto``/``mean``), and its spatial summary when
        the map's height and width are known. Anything else is reduced on the host by the shared reducers."""
        elem, dims = self.types.get(name, (None, None))
        if not plan or plan.get("reducer") not in ("auto", "mean") or elem != 1 or not dims:
            return False
        if layout not in ("channels_first", "channels_last") or len(dims) not in (3, 4):
            return False
        return plan.get("summary") is None or (len(dims) == 4 and all(isinstance(d, int) and d > 0 for d in dims[1:]))

    def _add_reduction(self, graph, name: str, layout: str, summary) -> None:
        """Nodes computing ``name + "::mean"`` (N, C) and, with ``summary``, ``name + "::grid"`` (the spatial
        summary of :func:`actclust.capture.reduction.spatial_summary`) from the tensor ``name``."""
        from ..capture.arrays import NUMPY, pool_matrix
        from ..capture.reduction import SUMMARY_DIMS

        helper, numpy_helper = self.onnx.helper, self.onnx.numpy_helper
        dims = self.types[name][1]
        rank = len(dims)
        nodes, inits = [], []

        def const(suffix, array):
            inits.append(numpy_helper.from_array(np.ascontiguousarray(array), f"{name}::{suffix}"))
            return f"{name}::{suffix}"

        x = name
        if layout == "channels_last":  # read channels-first, as every reducer does
            perm = [0, 3, 1, 2] if rank == 4 else [0, 2, 1]
            nodes.append(helper.make_node("Transpose", [x], [f"{name}::cf"], perm=perm))
            x = f"{name}::cf"
            c_dims = (dims[0], dims[3], dims[1], dims[2]) if rank == 4 else (dims[0], dims[2], dims[1])
        else:
            c_dims = dims
        axes = list(range(2, rank))
        if self.opset >= 18:
            nodes.append(helper.make_node("ReduceMean", [x, const("axes", np.array(axes, np.int64))], [f"{name}::mean"],
                                          keepdims=0))
        else:
            nodes.append(helper.make_node("ReduceMean", [x], [f"{name}::mean"], axes=axes, keepdims=0))
        outputs = [f"{name}::mean"]
        if summary is not None:
            grid, seed = summary
            h, w = c_dims[2], c_dims[3]
            g = min(grid, h, w)
            nodes += [helper.make_node("MatMul", [x, const("pool_w", pool_matrix(w, g))], [f"{name}::pw"]),
                      helper.make_node("Transpose", [f"{name}::pw"], [f"{name}::pwt"], perm=[0, 1, 3, 2]),
                      helper.make_node("MatMul", [f"{name}::pwt", const("pool_h", pool_matrix(h, g))], [f"{name}::ph"]),
                      helper.make_node("Transpose", [f"{name}::ph"], [f"{name}::pooled"], perm=[0, 1, 3, 2]),
                      helper.make_node("Flatten", [f"{name}::pooled"], [f"{name}::flat"], axis=1)]
            width = int(c_dims[1]) * g * g if c_dims[1] else None
            if width is None:
                raise UnsupportedModelError(f"The channels of {name!r} are not known to the graph.")
            if width > SUMMARY_DIMS:
                nodes.append(helper.make_node("MatMul", [f"{name}::flat", const("sign", NUMPY.sign_projection(width, seed))],
                                              [f"{name}::grid"]))
            else:
                nodes.append(helper.make_node("Identity", [f"{name}::flat"], [f"{name}::grid"]))
            outputs.append(f"{name}::grid")
        graph.node.extend(nodes)
        graph.initializer.extend(inits)
        for o in outputs:
            graph.output.append(helper.make_tensor_value_info(o, 1, None))

    @property
    def opset(self) -> int:
        return max((o.version for o in self.proto.opset_import if o.domain in ("", "ai.onnx")), default=13)

    def batch_limit(self) -> Optional[int]:
        """The fixed batch size of a model exported without a dynamic batch axis, else None."""
        dims = [self.types.get(i, (None, None))[1] for i in self.inputs]
        fixed = {d[0] for d in dims if d and d[0]}
        return min(fixed) if fixed else None

    def forward(self, inputs, layers: Sequence[str], where: str, reduced: Optional[dict] = None):
        """``(outputs by name, {output: array})`` of one batch, in slices for a fixed batch size: the layers as
        they are, and for those in ``reduced``, ``layer + "::mean"`` (and ``"::grid"``) instead."""
        reduced = reduced or {}
        session = self.session(layers, reduced)
        wanted = [l for l in layers if l not in reduced]
        wanted += [f"{l}::{s}" for l, (_, summary) in reduced.items() for s in (("mean", "grid") if summary else ("mean",))]
        names = self.outputs + [l for l in wanted if l not in self.outputs]
        feeds = self.feeds(inputs, where)
        n = batch_len(inputs)
        step = self.batch_limit() or n
        parts = []
        try:
            for s in range(0, n, step):
                part = {k: v[s:s + step] for k, v in feeds.items()}
                if len(next(iter(part.values()))) < step and self.batch_limit():
                    pad = step - len(next(iter(part.values())))
                    part = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in part.items()}
                parts.append(session.run(names, part))
        except ActClustError:
            raise
        except Exception as e:
            raise model_error(e, where, feeds, limit=500) from e
        # the slices' outputs joined, and the rows of a padded last slice cut off (also where it was the only one):
        # of outputs of one row per input fed only (a sequence-first (T, N, D) tensor cut to N rows passed as one row
        # per input, its vectors averaged over the batch: an outside check)
        values = [np.concatenate([p[i] for p in parts]) if len(parts) > 1 else parts[0][i] for i in range(len(names))]
        fed = step * len(parts) if self.batch_limit() else n
        values = [v[:n] if isinstance(v, np.ndarray) and v.ndim and fed != n and v.shape[0] == fed else v
                  for v in values]
        out = dict(zip(names, values))
        return {k: out[k] for k in self.outputs}, {l: out[l] for l in wanted}

    def logits(self, outputs: dict, n: int) -> np.ndarray:
        if self.output is not None:
            value = call_output(self.output, outputs)
        else:
            value = next((v for v in outputs.values() if isinstance(v, np.ndarray) and v.ndim == 2
                          and v.shape[0] == n and v.shape[1] >= 2 and v.dtype.kind == "f"), None)
            if value is None:
                raise CaptureError(
                    f"The model's outputs {[(k, getattr(v, 'shape', type(v).__name__)) for k, v in outputs.items()]} hold no "
                    f"floating (N, n_classes) logits for a batch of {n}; pass output=<function of the outputs by name "
                    "that returns the logits> (skl2onnx classifiers: convert with options={'zipmap': False})."
                    + _binary_hint(outputs, n))
        value = np.asarray(value)
        if value.ndim != 2 or value.shape[0] != n or value.shape[1] < 2 or value.dtype.kind != "f":
            raise CaptureError("The model must return logits of shape (N, n_classes) with n_classes >= 2; for a batch "
                               f"of {n} it returned shape {value.shape}, dtype {value.dtype}.")
        value = value.astype(np.float32)
        if are_probabilities(self, len(value), float(value.min()), float(value.max()),
                             float(np.abs(value.sum(1) - 1).max()), False, "np.log(o[name]) (o: the outputs by name)"):
            value = np.log(np.maximum(value, 1e-30))  # probabilities: the softmax of their log is themselves
        return value

    def output_shapes(self, sample) -> dict:
        _, values = self.forward(sample, self.names, "the sample")
        return {k: tuple(v.shape) for k, v in values.items()}

    def list_layers(self, sample=None, reducer="auto"):
        """Tensor names; with ``sample``, as :meth:`ModelAdapter.list_layers`, each LayerInfo also naming
        the operator that produces it (``info.op``)."""
        out = super().list_layers(sample, reducer)
        if sample is None:
            return out
        for name, info in out.items():
            info.op = self.producer[name].op_type if name in self.producer else "input"
        return out

    def describe(self) -> list:
        """``(tensor, op type, inferred shape)`` of every layer, without running the model."""
        return [(n, self.producer[n].op_type, self.types.get(n, (None, None))[1]) for n in self.names]

    def runner(self, reducers, layouts=None) -> "_OnnxRunner":
        return _OnnxRunner(self, reducers, layouts)


class _OnnxRunner(Runner):
    """Runs the graph with the layers as extra outputs; layers whose reduction the graph can compute
    (see :meth:`OnnxAdapter.reducible`) are reduced inside it, so only ``(N, C)`` vectors leave onnxruntime."""

    def __init__(self, adapter: OnnxAdapter, reducers, layouts=None):
        self.adapter, self.reducers = adapter, dict(reducers)
        self.fixed = dict(layouts) if layouts else None
        self.layouts: dict = dict(layouts) if layouts else {}
        self.reduced = {}
        for name, reduce in self.reducers.items():
            dims = adapter.types.get(name, (None, None))[1]
            if not dims:
                continue
            layout = self.fixed[name] if self.fixed else adapter.layout(name, len(dims), False)
            plan = getattr(reduce, "plan", None)
            if adapter.reducible(name, layout, plan):
                self.reduced[name] = (layout, plan["summary"])
                self.layouts.setdefault(name, layout)
        self.normalize = {name: getattr(self.reducers[name], "plan", {}).get("normalize") for name in self.reduced}

    def __enter__(self):
        self.adapter.session(list(self.reducers), self.reduced)  # fails here, before any batch, if the graph cannot run
        return self

    def run(self, inputs, where: str = "a batch"):
        n = batch_len(inputs)
        if self.adapter.batch_limit() and self.adapter.batch_limit() != n and not getattr(self.adapter, "_said_fixed", 0):
            self.adapter._said_fixed = True  # once per model, not once per pass (it came with every call)
            warnings.warn(f"The ONNX model has a fixed batch size of {self.adapter.batch_limit()}: batches are run in "
                          "slices of that size. Export it with a dynamic batch axis to run whole batches.",
                          ActClustWarning, stacklevel=user_stacklevel())
        outputs, values = self.adapter.forward(inputs, list(self.reducers), where, self.reduced)
        logits = self.adapter.logits(outputs, n)
        mask = next((np.asarray(to_numpy(inputs[k])) for k in MASK_KEYS if isinstance(inputs, Mapping) and k in inputs), None)
        out, unmasked = {}, []
        for name, reduce in self.reducers.items():
            if name in self.reduced:  # reduced in the graph: only the normalisation is left
                v = np.asarray(values[f"{name}::mean"], dtype=np.float32)
                if v.ndim != 2 or v.shape[0] != n:
                    raise CaptureError(f"Layer {name!r} gives an output that is not one row per input (the batch has {n}).")
                out[name] = NUMPY.l2_normalize(v) if self.normalize[name] == "l2" else np.ascontiguousarray(v)
                if self.reduced[name][1] is not None:
                    out[name + SUMMARY_SUFFIX] = np.ascontiguousarray(values[f"{name}::grid"], dtype=np.float32)
                continue
            t = np.asarray(values[name])
            if t.ndim == 0 or t.shape[0] != n:
                raise CaptureError(
                    f"Layer {name!r} gives an output of shape {t.shape}, which is not one row per input (the batch has "
                    f"{n}): choose a tensor computed per input (actclust.list_layers(model, x) shows the shapes).")
            if t.dtype.kind != "f":
                raise CaptureError(f"Layer {name!r} gives {t.dtype} values; choose a floating tensor.")
            layout = self.fixed[name] if self.fixed else self.adapter.layout(name, t.ndim, mask is not None)
            self.layouts.setdefault(name, layout)
            if mask is None and layout == "tokens":
                unmasked.append((name, t.shape))
            keep_reduced(out, name, reduce(t.astype(np.float32, copy=False), mask, layout=layout, ops=NUMPY),
                         NUMPY.to_host)
        if unmasked and not getattr(self, "_said_unmasked", False):  # every such layer, once (it named the first)
            self._said_unmasked = _warn_unmasked(unmasked, inputs)
        check_captured(logits, out, where)
        return logits, out


def _warn_unmasked(layers: list, inputs) -> bool:
    """Warn (and say so) where token maps (``(name, shape)`` of each) are averaged over all their positions while an
    input holds integer ids as long: padding, if the sequences are padded, is averaged in (an outside check: only
    list_layers said so)."""
    arrays = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else [inputs]
    lengths = {np.shape(a)[1] for a in arrays if np.asarray(a).dtype.kind in "iu" and np.ndim(a) == 2}
    named = [name for name, shape in layers if shape[1] in lengths]
    if not named:
        return False
    shape = dict(layers)[named[0]]
    what = f"Layer {named[0]!r} is a token map" if len(named) == 1 else f"Layers {named} are token maps"
    warnings.warn(f"{what} averaged over all {shape[1]} positions: the batches carry no "
                  "attention mask, and the inputs hold integer token ids as long, so padding tokens, if the sequences "
                  "are padded, are averaged in and move the vectors. Give dict batches with an 'attention_mask' (1 for "
                  "real tokens; the graph need not take it), or choose layers after the model pools its tokens.",
                  DataWarning, stacklevel=user_stacklevel())
    return True


def _unsaid(rank: int) -> str:
    """The layout of a tensor of ``rank`` axes whose operators say none: tokens for 3 axes, channels-first for more."""
    return "tokens" if rank == 3 else "channels_first"


def _dims(dims) -> str:
    return "(" + ", ".join("N" if i == 0 else ("?" if d is None else str(d)) for i, d in enumerate(dims)) + ")"


def _binary_hint(outputs: dict, n: int) -> str:
    """How to pass a binary classifier's one column (a sigmoid's probability or its logit) as two classes."""
    name = next((k for k, v in outputs.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                 and v.shape in ((n, 1), (n,))), None)
    if name is None:
        return ""
    v, col = outputs[name], f"o[{name!r}].reshape(-1, 1)"
    if v.size and float(v.min()) >= 0 and float(v.max()) <= 1:
        return (f" Output {name!r} holds one value per input, all in [0, 1]: a sigmoid's probability? Pass "
                f"output=lambda o: np.concatenate([np.log1p(-{col}), np.log({col})], 1).")
    return (f" Output {name!r} holds one value per input: a binary classifier's logit? Pass "
            f"output=lambda o: np.concatenate([np.zeros_like({col}), {col}], 1).")
