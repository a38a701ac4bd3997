"""Model adapters: what actclust needs from a model, per framework (PyTorch today)."""

from __future__ import annotations

from typing import Callable, Optional

from ..exceptions import UnsupportedModelError
from .base import ModelAdapter, Runner

__all__ = ["ModelAdapter", "Runner", "TorchAdapter", "adapt"]


def __getattr__(name):
    if name == "TorchAdapter":  # imported on use, so that `actclust.adapters.base` needs no torch
        from .torch import TorchAdapter

        return TorchAdapter
    raise AttributeError(name)


def adapt(model, output: Optional[Callable] = None) -> ModelAdapter:
    """The adapter for ``model``: an adapter given as is, or a PyTorch module wrapped in one."""
    if isinstance(model, ModelAdapter):
        if output is not None:
            raise UnsupportedModelError("output= applies to a model, not to a ModelAdapter; give it to the adapter.")
        return model
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(model, (torch.nn.Module, torch.jit.ScriptFunction)):
        from .torch import TorchAdapter

        return TorchAdapter(model, output)
    raise UnsupportedModelError(
        f"actclust explains torch.nn.Module classifiers (or a ModelAdapter); got {type(model).__name__}."
    )
