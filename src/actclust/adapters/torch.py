"""The PyTorch adapter: hooks, calling conventions, logits, wrapper-free names and fingerprints.

Hooks are registered for one pass and removed in ``finally`` (also when the model raises);
each hook reduces the activation at once, so an in-place operation later in the forward pass
(``ReLU(inplace=True)``) cannot change what was captured; the train/eval flag of every module
is restored afterwards. Wrappers (``DataParallel``, ``DistributedDataParallel``,
``torch.compile``) are looked through: layer names and the fingerprint are those of the wrapped
model, so a run moves between wrapped and unwrapped copies of one network.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
import weakref
from typing import Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ..capture.arrays import dtype_name, is_floating
from ..capture.data import batch_len
from ..exceptions import (ActClustError, ActClustWarning, CaptureError, DataError, DataWarning, UnsupportedModelError,
                          user_stacklevel)
from .base import (ModelAdapter, Runner, are_probabilities, call_output, check_captured, check_empty_masks, check_rows,
                   keep_reduced, model_error, token_ids)
from .torch_ops import OPS

__all__ = ["TorchAdapter", "list_layers", "tensor_bytes"]

_PREFIXES = ("module.", "_orig_mod.")
MASK_KEY = "attention_mask"
#: Modules whose 3-axis outputs are channels-first maps ``(N, C, L)``; any other module's are token maps.
_CHANNELS_FIRST_1D = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d, nn.GroupNorm, nn.MaxPool1d,
                      nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d)

#: How a layout is named in messages.
_READ_AS = {"channels_first": "a channels-first map (N, C, L)", "tokens": "tokens (N, T, D)", "dense": "dense rows"}

#: Modules that keep their input's shape and layout, value by value (activations, dropout): their map is read as
#: the one before them is.
_ELEMENTWISE = tuple(getattr(nn, n) for n in (*nn.modules.activation.__all__, *nn.modules.dropout.__all__, "Identity")
                     if n not in ("MultiheadAttention", "GLU"))  # a GLU halves an axis: see _made_by


def _own(reduced, t: torch.Tensor):
    """A hook's reduced output, copied where it is the layer's output itself (a dense layer kept as it is): an in-place
    module after the layer (``nn.ReLU(inplace=True)``) would otherwise change it before the pass ends."""
    if isinstance(reduced, tuple):
        return (_own(reduced[0], t),) + tuple(reduced[1:])
    return reduced.clone() if reduced is t else reduced


def _calls_modules(graph_module) -> bool:
    """Whether an ``fx.GraphModule`` runs any of its sub-modules (as ``torch.fx.symbolic_trace``'s graphs do), beside
    the guards torch.export adds."""
    return any(n.op == "call_module" and n.target != "_guards_fn" for n in graph_module.graph.nodes)


def _elementwise(module: nn.Module) -> bool:
    """Whether ``module`` keeps its input's shape and layout, value by value: PyTorch's activations and dropout, and
    Hugging Face's activation modules (``GELUActivation``...)."""
    return isinstance(module, _ELEMENTWISE) or type(module).__module__ == "transformers.activations"


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of any dense tensor: every dtype (bfloat16, bool...), 0-dim and strided ones too."""
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    if t.is_quantized:
        t = t.int_repr()
    t = t.resolve_conj().resolve_neg()
    t = t.cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


class TorchAdapter(ModelAdapter):
    """A PyTorch ``nn.Module`` classifier, possibly wrapped by DataParallel or ``torch.compile``.

    Layouts: outputs of 4 or 5 axes are channels-first maps; of 3 axes, channels-first ``(N, C, L)``
    for 1-D convolutions, norms and pools (or a container ending in one), token maps ``(N, T, D)``
    otherwise (transformer layers, linear layers on sequences).

    Parameters
    ----------
    model : torch.nn.Module
        Called as ``model(x)`` for a tensor batch, ``model(*x)`` for a tuple and ``model(**x)``
        for a dict (e.g. Hugging Face ``input_ids`` and ``attention_mask``).
    output : callable, optional
        ``output(model_output) -> logits tensor (N, n_classes)``. By default the logits are the
        output itself when it is a tensor, else its ``.logits``, its ``["logits"]`` or its first
        element (a tuple).
    """

    framework = "torch"
    layer_kind = "sub-module"

    def __init__(self, model: nn.Module, output: Optional[Callable] = None):
        if isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
            raise UnsupportedModelError(
                "TorchScript models cannot be explained: they run compiled code that calls no "
                "forward hooks, so no layer can be captured. Pass the original nn.Module (the one "
                "given to torch.jit.script / torch.jit.trace), with its weights loaded."
            )
        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(
                f"The model must be a torch.nn.Module; got {type(model).__name__}."
            )
        if isinstance(_unwrap(model), torch.fx.GraphModule) and not _calls_modules(_unwrap(model)):
            raise UnsupportedModelError(
                "This graph module (torch.export's program.module()) runs its graph's operations, not its "
                "sub-modules, so it calls no forward hooks and no layer can be captured. Pass the original "
                "nn.Module, or torch.export.unflatten(program) of a program exported with a dynamic batch axis.")
        if output is not None and not callable(output):
            raise UnsupportedModelError(f"output must be a callable that returns the logits; got {output!r}.")
        # DataParallel splits a batch across devices and calls our hooks once per replica: the
        # wrapped module is called instead, on its device. torch.compile's wrapper is kept.
        while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        self.model = model
        self.inner = _unwrap(model)
        self.output = output
        self._made: dict = {}  # layer -> what makes its 3-axis output: a layout, or the channels of a 1-D map
        self._features: dict = {}  # layer -> (features of the Linear/LayerNorm making its 4-axis output, itself?)
        self._shown: dict = {}  # layer -> the layout an output's shape or strides showed (of a layer _made leaves open)

    @property
    def model_class(self) -> str:
        return f"{type(self.inner).__module__}.{type(self.inner).__qualname__}"

    def layout(self, layer: str, rank: int, masked: bool, shape: tuple = (), strides: Optional[tuple] = None) -> str:
        """As :meth:`ModelAdapter.layout`; ``strides``, the output's (where known), tell a map as long as it is wide
        ``(N, C, C)`` that a block turned back to tokens by a transpose from one a 1-D convolution left as it is."""
        if rank <= 2:
            return "dense"
        if rank >= 4:
            return self._layout_4d(layer, shape)
        made = self._made.get(layer)
        if made is None:  # asked by every batch of a fit: the walk below once (see walk_once)
            made = self._made[layer] = self._made_by(self.modules().get(layer))
        if isinstance(made, tuple):
            # tokens a LayerNorm makes, unless a transpose put its features first: a map (N, D, T) (a wav2vec 2.0
            # feature encoder's block: conv, LayerNorm between transposes)
            return "channels_first" if _transposed(shape, strides) and shape[1] == made[1] else "tokens"
        if isinstance(made, str):
            return made
        if len(shape) < 2:
            return "channels_first"
        if shape[1] != made:
            shown = "tokens"
        elif len(shape) < 3 or shape[2] != made:
            shown = "channels_first"
        elif _transposed(shape, strides):
            shown = "tokens"  # (N, C, C) as a transposed view of the map: the block turned it back to tokens
        else:
            # (N, C, C) in the map's own order reads either way (a Conformer's convolution module on C time steps of C
            # features, made contiguous): as an earlier output showed, else channels-first
            return self._shown.get(layer, "channels_first")
        self._shown[layer] = shown
        return shown

    def walk_once(self, layers) -> None:
        """What makes each of ``layers``' outputs, found now, before a pass: the hooks then only read it (a compiled
        model traces them, and an entry added during its first batch made it compile the hooks again)."""
        new = [layer for layer in layers if layer not in self._made]  # every pass makes a runner: walked once
        modules = self.modules() if new else {}
        for layer in new:
            self._made[layer] = self._made_by(modules.get(layer))
            self._features[layer] = self._last_axis_features(modules.get(layer))

    def _layout_4d(self, layer: str, shape: tuple) -> str:
        """A map of 4 or 5 axes: channels-first, unless a Linear or a LayerNorm over the last axis makes it (through
        element-wise modules after it) and its last axis, not axis 1, has their features: channels-last (a ConvNeXt
        block's or a Swin block's ``(N, H, W, C)``; read channels-first, it was averaged over the width and channels)."""
        if layer not in self._features:
            self._features[layer] = self._last_axis_features(self.modules().get(layer))
        features, own = self._features[layer]
        # the Linear or LayerNorm itself: its last axis is its features, also in a map as high as it is wide
        if features and len(shape) >= 4 and shape[-1] == features and (own or shape[1] != features):
            return "channels_last"
        return "channels_first"

    def _last_axis_features(self, module: Optional[nn.Module]) -> tuple:
        """``(features, whether module is that layer itself)``: the features of the Linear, or of the LayerNorm over one
        axis, that makes ``module``'s output through the element-wise modules after it (in the order the modules are
        defined, as for 3-axis maps; a GLU over the last axis halves them); else ``(0, False)``."""
        if module is None:
            return 0, False
        halved = 1
        for m in self._leaves_back(module):
            if isinstance(m, nn.Linear):
                return int(m.out_features) // halved, m is module
            if (isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1
                    and getattr(m, "data_format", "channels_last") == "channels_last"):  # (Hugging Face's ConvNeXt)
                return int(m.normalized_shape[0]) // halved, m is module
            if isinstance(m, nn.GLU):
                halved *= 2 if m.dim == -1 else 1
            elif not _elementwise(m):
                return 0, False
        return 0, False

    def _made_by(self, module: Optional[nn.Module]):
        """What makes ``module``'s 3-axis output: its layout, or the channels of the 1-D map it ends on (then its
        output is channels-first where its axis 1 has that many, tokens otherwise), or ``("tokens", features)`` where a
        LayerNorm ends it (tokens, unless a transpose put its features on axis 1).

        The module's last leaf decides, and an element-wise one (a ReLU after a Conv1d) the leaf before it, in the
        order the modules are defined (a Sequential's: the order they run), up to the nearest module that says how
        many channels it makes (a block that transposes a convolution's map back to tokens, as a Conformer's does,
        gives (N, T, D): tokens)."""
        if module is None:
            return "tokens"
        if isinstance(module, _CHANNELS_FIRST_1D):
            return "channels_first"
        back, halved = self._leaves_back(module), 1
        for m in back:
            if isinstance(m, _CHANNELS_FIRST_1D):
                channels = next((getattr(m, a) for a in ("out_channels", "num_features", "num_channels")
                                 if getattr(m, a, None)), None)
                if channels is None:  # a pooling keeps its input's channels: look further back
                    continue
                return int(channels) // halved
            if isinstance(m, nn.GLU):  # a gated unit over the channels halves them (a Conformer's after its Conv1d)
                halved *= 2 if m.dim in (1, -2) else 1
            elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
                return "tokens", int(m.normalized_shape[0])  # unless transposed (see layout)
            elif not _elementwise(m):
                return "tokens"
        return "channels_first" if isinstance(back[0], _CHANNELS_FIRST_1D) else "tokens"

    def _leaves_back(self, module: nn.Module) -> list:
        """The model's leaf modules from ``module``'s last one backwards, in the order they are defined (``module``'s
        last leaf, or itself, alone where the model does not hold it)."""
        leaves = [m for m in self.inner.modules() if not list(m.children())]
        own = [m for m in module.modules() if not list(m.children())]
        last = own[-1] if own else module
        at = next((i for i, m in enumerate(leaves) if m is last), None)
        return list(reversed(leaves[:at + 1])) if at is not None else [last]

    def modules(self) -> dict[str, nn.Module]:
        # every attribute path, also a second name of one module (``self.act = self.relu``): PyTorch's default
        # lists a module once, so a layer asked for by its other name was unknown (an outside check)
        return {n: m for n, m in self.inner.named_modules(remove_duplicate=False) if n}

    def input_names(self) -> Optional[list]:
        """The named parameters of the model's ``forward`` where it has several (a Hugging Face model's ``input_ids``,
        ``attention_mask``...): a command line's ``.npz`` then gives the arrays named so."""
        import inspect

        try:
            params = inspect.signature(self.inner.forward).parameters.values()
        except (TypeError, ValueError):
            return None
        names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return names if len(names) > 1 else None

    def layer_names(self) -> list[str]:
        return list(self.modules())

    def canonical(self, name: str) -> str:
        known = self.modules()
        while name not in known and name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        return name

    @property
    def device(self) -> torch.device:
        for t in self.inner.parameters():
            return t.device
        for t in self.inner.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> Optional[torch.dtype]:
        for t in self.inner.parameters():
            if t.is_floating_point():
                return t.dtype
        return None

    def takes_ids(self) -> bool:
        """Whether integer inputs make sense: the model embeds token ids somewhere."""
        return any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in self.inner.modules())

    def check_inputs(self, inputs, name: str) -> None:
        """Refuse, before the forward pass, images in a form the model cannot have been trained on.

        Only a single tensor of per-sample shape (C, H, W)-like (2 or more axes) is checked: uint8
        values, or integers for a model with no embedding layer. Dict and tuple inputs (token ids,
        masks) and flat rows go to the model as given; its own error is then wrapped with context.
        """
        if isinstance(inputs, (tuple, list)):
            takes = _positional_inputs(self.inner)
            if takes is not None and len(inputs) > takes:
                raise DataError(
                    f"{name} gives the model {len(inputs)} inputs (a tuple is the model's inputs in order), but its "
                    f"forward takes {takes} positionally: pass the inputs alone, and the labels as y= (inputs its "
                    "forward takes by keyword: a dict of them by name).")
            return
        if isinstance(inputs, Mapping) or len(inputs.shape) < 3:
            return
        dtype = dtype_name(inputs)
        if dtype == "uint8":
            raise DataError(
                f"{name} holds uint8 values (raw image bytes?): convert to float and normalise as in "
                "training, e.g. x.astype('float32') / 255."
            )
        if not is_floating(inputs) and dtype != "bool" and not self.takes_ids():
            raise DataError(
                f"{name} holds {dtype} values but the model has no embedding "
                "layer that takes integer ids: convert the inputs to float (as in training)."
            )

    def weights_version(self) -> int:
        """The sum of the parameters' and buffers' version counters: PyTorch bumps them at every in-place change
        (an optimiser's step, ``copy_``, ``load_state_dict``), so a model trained on after fit is told apart in
        microseconds, without hashing its weights."""
        return sum(t._version for t in (*self.inner.parameters(), *self.inner.buffers()))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.inner.state_dict().items()):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(tensor_bytes(t))
        return h.hexdigest()

    def call(self, inputs, module: Optional[nn.Module] = None):
        """Run the model (or ``module``) on one batch moved to its device and float dtype; its raw output."""
        module = self.model if module is None else module
        inputs = _to(inputs, self.device, self.dtype)
        if isinstance(inputs, Mapping):
            return module(**inputs)
        if isinstance(inputs, (tuple, list)):
            return module(*inputs)
        return module(inputs)

    def logits(self, out, n: int) -> torch.Tensor:
        """The ``(n, n_classes)`` logits in a model output."""
        hint = ""
        if self.output is not None:
            out = call_output(self.output, out)
        elif not isinstance(out, torch.Tensor):
            if isinstance(getattr(out, "logits", None), torch.Tensor):
                out = out.logits
            elif isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
                out = out["logits"]
            elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
                rows = [o for o in out if isinstance(o, torch.Tensor) and o.ndim == 2 and len(o) == n]
                if len(rows) > 1 and not getattr(self, "_said_first", False):  # two (N, d) candidates, not (logits, h)
                    self._said_first = True  # (features, logits) read its features as 12 "classes", without a word
                    warnings.warn(f"The model returns a {type(out).__name__} of {len(out)} values; actclust reads the "
                                  f"logits from the first, of shape {tuple(out[0].shape)}. If that is not the "
                                  "classifier's output, pass output=<function of the model's output that returns its "
                                  "logits>, e.g. output=lambda o: o[1].", ActClustWarning, stacklevel=user_stacklevel())
                # the one to pick instead where the first is no (N, C) tensor (a loss first, as (loss, logits))
                other = next((i for i, o in enumerate(out) if i and isinstance(o, torch.Tensor) and o.ndim == 2
                              and len(o) == n and o.shape[1] >= 2), None)
                if other is not None:
                    hint = (f" It returns a {type(out).__name__}; its element {other} has shape "
                            f"{tuple(out[other].shape)}: if those are the logits, pass output=lambda o: o[{other}].")
                out = out[0]
        _check_logits(out, n, self.output is not None, hint)
        a = out.detach().float()
        if are_probabilities(self, len(a), float(a.min()), float(a.max()), float((a.sum(1) - 1).abs().max()),
                             out.element_size() < 4, "torch.log(p)"):  # nn.Softmax at the end: read as their log
            return torch.log(a.clamp_min(torch.finfo(torch.float32).tiny))
        return out

    def output_shapes(self, sample) -> dict:
        """Output shapes of every module that ran on ``sample`` (hooks removed, modes restored after)."""
        return {name: found[0] for name, found in self.sample_outputs(sample).items()}

    def sample_outputs(self, sample) -> dict:
        """Output shapes and strides of every module that ran on ``sample``, and how many times it ran (hooks removed,
        modes restored after)."""
        names = self.layer_names()
        shapes: dict[str, tuple] = {}
        calls: dict[str, int] = {}
        modules = self.modules()

        def record(name):
            def hook(module, args, output):
                t = (_unpacked(output) or (_first_tensor(output),))[0]
                if t is not None:
                    t = _plain(t, None)[0]
                    shapes.setdefault(name, (tuple(t.shape), tuple(t.stride())))
                    calls[name] = calls.get(name, 0) + 1
            return hook

        handles = [modules[n].register_forward_hook(record(n)) for n in names]
        modes = {m: m.training for m in self.model.modules()}
        try:
            self.model.eval()
            with torch.no_grad():
                self.call(sample if isinstance(sample, (Mapping, tuple, list, np.ndarray)) else torch.as_tensor(sample))
        except ActClustError:
            raise
        except Exception as e:  # the model's own error on the sample: said as a fit's is, with the same hints
            raise model_error(e, "the sample", sample, layout=_layout_hint(sample, str(e))) from e
        finally:
            for h in handles:
                h.remove()
            for m, training in modes.items():
                m.training = training
        return {n: (*shapes[n], calls[n]) for n in names if n in shapes}

    def runner(self, reducers: Mapping[str, Callable], layouts: Optional[Mapping[str, str]] = None) -> "_TorchRunner":
        return _TorchRunner(self, reducers, layouts)


def _to(obj, device, dtype):
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj if obj.flags.writeable else obj.copy())
    if isinstance(obj, torch.Tensor):
        if device.type == "cuda" and obj.device.type == "cpu" and not obj.is_pinned():
            obj = obj.pin_memory()  # page-locked, so the copy below is asynchronous
        obj = obj.to(device, non_blocking=True)
        return obj.to(dtype) if dtype is not None and obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device, dtype) for v in obj)
    return obj


def _plain(t: torch.Tensor, mask) -> tuple:
    """A layer's output as the reducers take it, with the mask of its tokens: a nested tensor
    (``nn.TransformerEncoder``'s fast path between its layers, padding dropped) padded back to the batch's tokens, or,
    where the batch has no mask (the padding mask given to the model another way), masked by its own lengths, so that
    a vector does not depend on what else its batch holds; one value per sample ``(N,)`` a vector of one; integers and
    flags as float32."""
    if t.is_nested:
        lengths = [int(u.shape[0]) for u in t.unbind()]
        t = t.to_padded_tensor(0.0)
        if mask is not None and t.ndim == 3 and t.shape[0] == mask.shape[0] and t.shape[1] < mask.shape[1]:
            t = torch.nn.functional.pad(t, (0, 0, 0, mask.shape[1] - t.shape[1]))
        elif mask is None and t.ndim == 3:
            mask = torch.arange(t.shape[1], device=t.device)[None] < torch.tensor(lengths, device=t.device)[:, None]
    if t.ndim == 1:
        t = t[:, None]
    return (t if t.is_floating_point() else t.float()), mask


def _transposed(shape: tuple, strides) -> bool:
    """Whether a 3-axis output is a transposed view (its axis 1 the densest): a block's transpose, turning tokens into
    a map or a map into tokens."""
    return (strides is not None and len(shape) == 3 and len(strides) == 3 and shape[1] > 1 and shape[2] > 1
            and strides[1] == 1 != strides[2])


def _unpacked(output):
    """``(tokens (N, T, D), mask (N, T))`` of an output whose first element is a ``PackedSequence`` (an RNN fed packed
    sequences): padded back in the batch's order, the mask keeping each sequence's own steps; else None."""
    first = output[0] if isinstance(output, tuple) and not isinstance(output, PackedSequence) and output else output
    if not isinstance(first, PackedSequence):
        return None
    t, lengths = pad_packed_sequence(first, batch_first=True)
    return t, (torch.arange(t.shape[1])[None] < lengths[:, None]).to(t.device)


def _first_tensor(output):
    """A layer's activation: its output, or the first element of a tuple or ``ModelOutput``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = tuple(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _fresh_locks() -> None:
    """A forked child starts with free locks: one held by another thread of the parent at the fork would stay held
    in the child for good (a child explaining after a fork taken during a parent's pass hung)."""
    global _LOCKS, _LOCKS_GUARD
    _LOCKS, _LOCKS_GUARD = weakref.WeakKeyDictionary(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_locks)


def _model_lock(model: nn.Module) -> "threading.RLock":
    """The lock that lets one capture pass at a time hook ``model`` (re-entrant: a pass may run another inside)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


class _TorchRunner(Runner):
    """Forward hooks on the captured layers, the model in eval mode; both undone on exit."""

    in_run_order = True  # the hooks fill the outputs as the modules run

    def __init__(self, adapter: TorchAdapter, reducers: Mapping[str, Callable], layouts=None):
        self.adapter = adapter
        self.fixed = dict(layouts) if layouts else None
        self.layouts: dict = dict(layouts) if layouts else {}
        self.reducers = dict(reducers)
        modules = adapter.modules()
        self.modules = {name: modules[name] for name in self.reducers}
        adapter.walk_once(self.reducers)
        self._out: dict[str, torch.Tensor] = {}
        self._mask: Optional[torch.Tensor] = None
        self._eager = False  # set when a compiled model skipped the hooks
        self._shapes: dict = {}
        self._read_as: dict = {}  # layer -> the layout this batch was read in (unless fixed)
        self._reducing: Optional[str] = None  # the layer whose output a hook is reducing
        self._unmasked: set = set()  # token layers warned of as shorter than the attention mask
        self._own_mask: set = set()  # token layers whose output says its own lengths (packed, nested)
        self._checked = False
        self.handles: list = []

    def __enter__(self):
        # One pass at a time per model: hooks are the model's, so two threads' passes (explain from two threads)
        # saw each other's layers run and failed with "ran more than once" (found by an outside check).
        self._lock = _model_lock(self.adapter.inner)
        self._lock.acquire()
        self.modes = {}
        try:
            self.modes = {m: m.training for m in self.adapter.model.modules()}
            for name, module in self.modules.items():
                self.handles.append(module.register_forward_hook(self._hook(name)))
            self.adapter.model.eval()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        try:
            for handle in self.handles:
                handle.remove()
            self.handles = []
            for module, training in self.modes.items():
                module.training = training
        finally:
            self._lock.release()
        return False

    def _hook(self, name):
        reduce = self.reducers[name]

        # Compiled models trace this hook into their graph: no Python counters (each value would
        # be a recompile) and no data-dependent branch (a graph break); NaN checks run afterwards.
        def hook(module, args, output):
            if name in self._out:
                raise CaptureError(
                    f"The layer {name!r} ran more than once in one forward pass (a shared or "
                    "reused module); its activations would be mixed. Choose a module that runs once."
                )
            t, mask = _unpacked(output) or (_first_tensor(output), self._mask)
            if t is None:
                raise CaptureError(
                    f"The layer {name!r} returned a {type(output).__name__} with no tensor first; "
                    "choose a module whose output is a tensor (or a tuple starting with one)."
                )
            t, mask = _plain(t.detach(), mask)
            if mask is not None and self._mask is None:
                self._own_mask.add(name)
            self._shapes[name] = t.shape
            # No branch on what earlier batches saw: a compiled model would guard on it and recompile.
            if self.fixed:
                layout = self.fixed[name]
            else:
                layout = self._read_as[name] = self.adapter.layout(name, t.ndim, self._mask is not None,
                                                                   tuple(t.shape), tuple(t.stride()))
            self._reducing = name  # what fails from here is ours, not the model's
            self._out[name] = _own(reduce(t, mask, layout=layout, ops=OPS), t)
            self._reducing = None
        return hook

    def run(self, inputs, where: str = "a batch"):
        mask = inputs.get(MASK_KEY) if isinstance(inputs, Mapping) else None
        self._mask = None if mask is None else _to(mask, self.adapter.device, None)
        if not getattr(self, "_said_empty", False):
            self._said_empty = check_empty_masks(mask, where)
        n = batch_len(inputs)
        logits = self._forward(self.adapter.model if not self._eager else self.adapter.inner, inputs, where, n)
        missing = [name for name in self.reducers if name not in self._out]
        if missing and not self._eager and self.adapter.model is not self.adapter.inner:
            # torch.compile reuses a graph traced before these hooks existed (it does not guard on
            # hooks), so they never ran: run the uncompiled module, which calls every hook.
            warnings.warn(
                f"The compiled model skipped actclust's hooks on {missing} (a graph compiled before they "
                "were registered); running the uncompiled module for this pass instead.",
                ActClustWarning, stacklevel=2)
            self._eager = True
            logits = self._forward(self.adapter.inner, inputs, where, n)
            missing = [name for name in self.reducers if name not in self._out]
        if missing:
            raise CaptureError(
                f"The layer(s) {missing} did not run in the forward pass, so nothing was captured. "
                "Choose modules that the model's forward() calls."
            )
        for name, shape in self._shapes.items():
            check_rows(name, tuple(shape), n, _SEQUENCE_FIRST)
        if not self._checked:
            self._checked = True
            self._check_batch_axes(inputs, where, n)
            if not self.fixed:
                self.layouts = dict(self._read_as)
            self._check_token_maps()
            self._check_unmasked_tokens(inputs)
        elif not self.fixed:
            self._check_layouts()
        self._check_mask_lengths()
        out = {}
        for name, t in self._out.items():
            keep_reduced(out, name, t, OPS.to_host)
        logits = logits.detach().float().cpu().numpy()
        check_captured(logits, out, where)  # here, not in the hooks: a data-dependent branch breaks torch.compile's graph
        return logits, out

    def _check_batch_axes(self, inputs, where: str, n: int) -> None:
        """A 3-axis output whose first two axes both have the batch's length (an ``nn.LSTM`` without ``batch_first``
        whose sequences are as long as the batch) may be sequence-first: at fit (a query reads the layers fit
        checked), run ``n - 1`` of the inputs once and see which axis follows the batch."""
        doubtful = [name for name, shape in self._shapes.items() if len(shape) == 3 and shape[1] == n > 1]
        if not doubtful or self.fixed:
            return
        out, shapes, read_as, mask = self._out, self._shapes, self._read_as, self._mask
        try:
            self._mask = _head(mask, n - 1)  # the token maps' mask of the inputs run
            self._forward(self.adapter.model if not self._eager else self.adapter.inner, _head(inputs, n - 1), where,
                          n - 1)
            for name in doubtful:
                check_rows(name, tuple(self._shapes.get(name, ())), n - 1,
                           f"{_SEQUENCE_FIRST[:-1]}; run on {n - 1} of a batch of {n} to tell its batch axis from a "
                           "sequence axis of the batch's length)")
        finally:
            self._out, self._shapes, self._read_as, self._mask = out, shapes, read_as, mask

    def _check_layouts(self) -> None:
        """Every batch of a pass read as the first: a map as long as it is wide, ``(N, C, C)``, that shows no
        transpose reads as channels; a later batch of another length can show the layer gives tokens."""
        for name, layout in self._read_as.items():
            first = self.layouts.get(name, layout)
            if layout != first:
                raise CaptureError(
                    f"Layer {name!r} gave {tuple(self._shapes[name])} in this batch, read as {_READ_AS[layout]}, "
                    f"but was read as {_READ_AS[first]} in the first batch (of as many steps as features: its shape "
                    "read either way); the vectors would mix the two. Choose a layer after the block's last "
                    "transpose or norm, or give the first batch another sequence length.")

    def _check_unmasked_tokens(self, inputs) -> None:
        """Warn, once, where token maps of a batch without an attention mask are averaged over every position while
        the inputs hold integer token ids as long: the padding, if the sequences are padded, is averaged in. (A model
        fed ``(ids, lengths)`` packs its sequences itself: its embedding's vectors moved with the padding, without a
        word, while its LSTM's came from their own lengths: an outside check.)"""
        if self._mask is not None:
            return
        ids = {int(v.shape[1]) for _, v in token_ids(inputs) if len(v.shape) == 2}
        layers = [name for name, shape in self._shapes.items()
                  if len(shape) == 3 and int(shape[1]) in ids and (self.fixed or self._read_as).get(name) == "tokens"
                  and name not in self._own_mask
                  and getattr(self.reducers[name], "plan", {}).get("reducer") != "token_first"]
        if layers:
            warnings.warn(
                f"Layer(s) {layers} are token maps averaged over all {self._shapes[layers[0]][1]} positions: the batches "
                "carry no attention mask, and the inputs hold integer token ids as long, so padding tokens, if the "
                "sequences are padded, are averaged in and move the vectors. Give dict batches with an "
                "'attention_mask' (1 for real tokens) where the model takes one, or choose layers after the model packs "
                "its sequences (an RNN's PackedSequence output is read by its own lengths).",
                DataWarning, stacklevel=user_stacklevel())

    def _check_mask_lengths(self) -> None:
        """Warn, once per layer, where a token map is not as long as the batch's attention mask (a strided
        convolution before it): the mask cannot say which of its tokens are padding, so none is left out."""
        if self._mask is None:
            return
        for name, shape in self._shapes.items():
            layout = (self.fixed or self._read_as).get(name)
            if (layout == "tokens" and len(shape) == 3 and shape[1] != self._mask.shape[1] and name not in self._unmasked
                    and not getattr(self.reducers[name], "over_tokens", False)):
                self._unmasked.add(name)
                warnings.warn(
                    f"Layer {name!r} gives {shape[1]} tokens where the batch's attention mask has "
                    f"{self._mask.shape[1]}: the mask cannot say which of them are padding, so its vectors average "
                    "all of them, padding included.", DataWarning, stacklevel=4)

    def _check_token_maps(self) -> None:
        """Warn when a token map (N, T, D) of a masked batch is read as a channels-first map (a run saved
        before layouts were recorded), so padding changes its vectors."""
        if self._mask is None:
            return
        for name, shape in self._shapes.items():
            reducer = self.reducers[name]
            if (len(shape) == 3 and tuple(shape[:2]) == tuple(self._mask.shape) and self.layouts.get(name) != "tokens"
                    and not getattr(reducer, "over_tokens", True)):
                warnings.warn(
                    f"Layer {name!r} outputs token vectors {tuple(shape)} (N, T, D) but is read as a channels-first "
                    "map, so padding changes the vectors: use reducer='token_mean' (mean over real tokens) or "
                    "'token_first' for this layer.", DataWarning, stacklevel=4)

    def _forward(self, module, inputs, where: str, n: int):
        self._out, self._shapes, self._read_as, self._reducing = {}, {}, {}, None
        try:
            with torch.no_grad():
                return self.adapter.logits(self.adapter.call(inputs, module), n)
        except ActClustError:
            raise
        except Exception as e:
            if self._reducing is not None:  # in a hook: the layer's output, not the model's inputs
                name = self._reducing
                raise CaptureError(
                    f"Layer {name!r} gave an output of shape {tuple(self._shapes[name])} that actclust could not "
                    f"reduce to vectors on {where} ({type(e).__name__}: {e}); choose another layer, or another "
                    "reducer for it (reducer={layer: ...}).") from e
            raise model_error(e, where, inputs, layout=_layout_hint(inputs, str(e))) from e


def _layout_hint(inputs, said: str) -> str:
    """What a convolution's channel error means for inputs of this shape, before any fit knows the inputs' shape:
    channels last where PyTorch takes them first (``x.transpose``), or no channel axis at all (``x[:, None]``)."""
    import re

    if "Long, Int" in said:  # an Embedding given uint8 or int16 ids
        return "Token ids must be int64 (or int32) for an embedding: x.astype(np.int64). "
    if "keyword-only argument" in said or "takes 1 positional argument but" in said:  # forward(self, *, x)
        return "The model's forward() takes its inputs by keyword: pass X as a dict of them, {name: array}. "
    m = re.search(r"to have (\d+) channels, but got (\d+) channels", said)
    shape = tuple(getattr(inputs, "shape", ()))
    if m is None or len(shape) < 3:
        return ""
    want = int(m.group(1))
    rank = len(shape) - 1
    if rank >= 3 and shape[-1] == want and shape[1] != want:
        return (f"These inputs look channels-last {shape}; PyTorch convolutions take channels first: "
                f"x.transpose(0, {rank}, {', '.join(map(str, range(1, rank)))}). ")
    if want == 1:
        return f"These inputs {shape} have no channel axis; add it: x[:, None]. "
    return ""


_SEQUENCE_FIRST = (" (a sequence-first output, as nn.LSTM, nn.GRU and nn.MultiheadAttention give without "
                   "batch_first=True?)")


def _positional_inputs(module: nn.Module) -> Optional[int]:
    """How many positional inputs ``module``'s forward takes at most (None: any number, or unknown)."""
    import inspect

    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _head(inputs, m: int):
    """The first ``m`` inputs of a batch (a tensor, or a tuple or dict of them; other values as they are)."""
    if isinstance(inputs, Mapping):
        return {k: _head(v, m) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_head(v, m) for v in inputs)
    return inputs[:m] if getattr(inputs, "ndim", 0) and hasattr(inputs, "__getitem__") else inputs


def _check_logits(logits, n: int, custom: bool, hint: str = "") -> None:
    if not isinstance(logits, torch.Tensor):
        where = "output= returned" if custom else "The model returned"
        raise CaptureError(
            f"{where} a {type(logits).__name__}; actclust looks for the logits as a tensor, an "
            "attribute .logits, a key 'logits' or the first element of a tuple. Pass "
            "output=<function of the model's output that returns the logits tensor>."
        )
    if logits.ndim != 2 or logits.shape[0] != n or logits.shape[1] < 2:
        if tuple(logits.shape) in ((n, 1), (n,)):
            v = logits.detach().float()
            if logits.is_floating_point() and len(v) and float(v.min()) >= 0 and float(v.max()) <= 1:
                # a sigmoid at the end: its probability p is no logit; read as one, every input went to class 1
                hint += (" Its values all lie in [0, 1]: a sigmoid's probability p? Pass output=lambda p: "
                         "torch.cat([torch.log1p(-p), torch.log(p)], 1) (two classes' log-probabilities; reshape p to "
                         "(N, 1) first if it is (N,)).")
            else:
                hint += (" A binary classifier with one logit z? Pass output=lambda z: torch.cat([torch.zeros_like(z), "
                         "z], 1) (a sigmoid's logit, as two classes' logits; reshape z to (N, 1) first if it is (N,)).")
        raise CaptureError(
            "The model must return logits of shape (N, n_classes) with n_classes >= 2; for a batch "
            f"of {n} it returned shape {tuple(logits.shape)}.{hint}"
        )
    if not logits.is_floating_point():
        raise CaptureError(f"The model must return floating-point logits; got dtype {logits.dtype}.")


def list_layers(model: nn.Module, sample=None):
    """Names of the model's sub-modules usable as ``layers``; see :func:`actclust.list_layers`."""
    return TorchAdapter(model).list_layers(sample)
