"""The seam between actclust and a model framework.

Everything actclust needs from a model goes through a :class:`ModelAdapter`: which layers it
has, how to call it on a batch, where its logits are, and a fingerprint of its weights. The
PyTorch adapter is :class:`actclust.adapters.TorchAdapter`; Keras 3 or ONNX adapters plug in
here later without an ``if framework ==`` anywhere else. This module imports no framework.
"""

from __future__ import annotations

import abc
import difflib
from typing import Callable, Mapping, Sequence

import numpy as np

from ..exceptions import ParameterError

__all__ = ["ModelAdapter", "Runner", "unknown_layer_error"]


class Runner(abc.ABC):
    """Runs the model on batches with layer capture switched on (a context manager)."""

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
                raise unknown_layer_error(name, valid, how_to_list)
            if canonical in out:
                raise ParameterError(f"The layer {name!r} is listed twice in {what}.")
            out.append(canonical)
        return out

    def canonical(self, name: str) -> str:
        """``name`` without the prefixes that wrappers add (identity by default)."""
        return name

    @abc.abstractmethod
    def runner(self, reducers: Mapping[str, Callable]) -> Runner:
        """A context manager that captures ``reducers``' layers (canonical names) while running."""

    def check_inputs(self, inputs, name: str) -> None:
        """Refuse, before the first forward pass, inputs the model cannot take (nothing by default)."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """SHA-256 over the model's weights and buffers, the same for wrapped and unwrapped models."""


def unknown_layer_error(name, valid: Sequence[str], how_to_list: str) -> ParameterError:
    close = difflib.get_close_matches(str(name), list(valid), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ParameterError(f"Unknown layer {name!r}: the model has no sub-module of that name.{hint} {how_to_list}")
