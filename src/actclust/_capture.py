"""Capture reduced layer activations with forward hooks, leaving the model as it was.

Hooks are registered for one pass and removed in ``finally`` (also when the model raises);
each hook reduces the activation at once, so an in-place operation later in the forward
pass (``ReLU(inplace=True)``) cannot change what was captured; the train/eval flag of
every module is restored afterwards.
"""

from __future__ import annotations

import difflib
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .exceptions import CaptureError

__all__ = ["list_layers"]


def list_layers(model: nn.Module, sample: Optional[torch.Tensor] = None):
    """Names of the model's sub-modules usable as ``layers``, in ``named_modules()`` order.

    Parameters
    ----------
    model : torch.nn.Module
    sample : torch.Tensor or ndarray, optional
        A batch of inputs. When given, one forward pass is run and the result maps each name
        to its output shape (with the batch axis), for the modules that ran.

    Returns
    -------
    list of str, or dict of str to tuple
    """
    names = [name for name, _ in model.named_modules() if name]
    if sample is None:
        return names
    shapes: dict[str, tuple] = {}

    def record(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                shapes.setdefault(name, tuple(output.shape))
        return hook

    modules = dict(model.named_modules())
    with _hooks_on(model, {n: record(n) for n in names}, modules):
        with torch.no_grad():
            model(torch.as_tensor(sample).to(_model_device(model)))
    return {n: shapes[n] for n in names if n in shapes}


def resolve_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """Map each requested name to its module, with a helpful error for unknown names."""
    modules = dict(model.named_modules())
    if isinstance(layers, str) or not layers:
        raise ValueError(
            "The 'layers' parameter of ActivationClustering must be a non-empty list of module "
            f"names; got {layers!r}. See actclust.list_layers(model)."
        )
    seen = set()
    for name in layers:
        if not isinstance(name, str) or name not in modules or name == "":
            valid = [n for n in modules if n]
            close = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.4)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"Unknown layer {name!r}: the model has no sub-module of that name.{hint} "
                "actclust.list_layers(model) lists the valid names."
            )
        if name in seen:
            raise ValueError(f"The layer {name!r} is listed twice in 'layers'.")
        seen.add(name)
    return {name: modules[name] for name in layers}


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return None


class _hooks_on:
    """Context manager: forward hooks on, model in eval mode; both undone on exit."""

    def __init__(self, model, hooks: Mapping[str, Callable], modules: Mapping[str, nn.Module]):
        self.model, self.hooks, self.modules = model, hooks, modules

    def __enter__(self):
        self.handles = []
        self.modes = {m: m.training for m in self.model.modules()}
        try:
            for name, hook in self.hooks.items():
                self.handles.append(self.modules[name].register_forward_hook(hook))
            self.model.eval()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for module, training in self.modes.items():
            module.training = training
        return False


class Capture:
    """Runs the model on batches and returns its logits and each layer's reduced activation.

    ``reducers`` maps a layer name to a callable applied to the layer's output inside the hook;
    a callable that returns ``None`` (a reducer being fitted) contributes nothing.
    """

    def __init__(self, model: nn.Module, reducers: Mapping[str, Callable]):
        self.model = model
        self.reducers = dict(reducers)
        self.modules = resolve_layers(model, list(self.reducers))
        self.device = _model_device(model)
        self.dtype = model_dtype(model)
        self._out: dict[str, torch.Tensor] = {}
        self._ran: dict[str, int] = {}

    def __enter__(self):
        hooks = {name: self._hook(name) for name in self.reducers}
        self._ctx = _hooks_on(self.model, hooks, self.modules)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def _hook(self, name):
        reduce = self.reducers[name]

        def hook(module, inputs, output):
            self._ran[name] += 1
            if self._ran[name] > 1:
                raise CaptureError(
                    f"The layer {name!r} ran more than once in one forward pass (a shared or "
                    "reused module); its activations would be mixed. Choose a module that runs once."
                )
            if not isinstance(output, torch.Tensor):
                raise CaptureError(
                    f"The layer {name!r} returned a {type(output).__name__}, not a tensor; "
                    "choose a module whose output is a single tensor."
                )
            reduced = reduce(output.detach())
            if reduced is not None:
                # Checked here, in execution order, so the first layer that went bad is named.
                if not bool(torch.isfinite(reduced).all()):
                    raise CaptureError(
                        f"The activations of layer {name!r} contain NaN or infinite values; "
                        "check the model and its inputs."
                    )
                self._out[name] = reduced.detach().float()
        return hook

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward pass; returns ``(logits, {layer: (N, d) float32 tensor})`` on the CPU."""
        self._out = {}
        self._ran = {name: 0 for name in self.reducers}
        x = x.to(self.device, non_blocking=True)
        if self.dtype is not None and x.is_floating_point():
            x = x.to(self.dtype)
        with torch.no_grad():
            logits = self.model(x)
        _check_logits(logits, x.shape[0])
        missing = [name for name, count in self._ran.items() if count == 0]
        if missing:
            raise CaptureError(
                f"The layer(s) {missing} did not run in the forward pass, so nothing was captured. "
                "Choose modules that the model's forward() calls."
            )
        out = {name: t.reshape(t.shape[0], -1).cpu() for name, t in self._out.items()}
        return logits.detach().float().cpu(), out


def _check_logits(logits, n: int) -> None:
    if not isinstance(logits, torch.Tensor):
        raise CaptureError(
            f"The model must return a tensor of logits of shape (N, n_classes); it returned a "
            f"{type(logits).__name__}. Wrap it so that forward() returns the logits tensor."
        )
    if logits.ndim != 2 or logits.shape[0] != n or logits.shape[1] < 2:
        raise CaptureError(
            "The model must return logits of shape (N, n_classes) with n_classes >= 2; for a batch "
            f"of {n} it returned shape {tuple(logits.shape)}."
        )
    if not logits.is_floating_point():
        raise CaptureError(f"The model must return floating-point logits; got dtype {logits.dtype}.")
    if not bool(torch.isfinite(logits).all()):
        raise CaptureError("The model's output contains NaN or infinite values.")
