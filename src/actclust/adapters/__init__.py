"""Model adapters: what actclust needs from a model, per framework.

:func:`adapt` picks the adapter for a model without importing a framework the model does not
come from: a framework is only looked at when it is already imported (the model is one of its
objects), or when a path names its file format.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional

from ..exceptions import UnsupportedModelError
from .base import LayerInfo, ModelAdapter, Runner

__all__ = ["ModelAdapter", "Runner", "LayerInfo", "TorchAdapter", "OnnxAdapter", "adapt", "list_layers",
           "model_fingerprint"]


def __getattr__(name):
    if name == "TorchAdapter":  # imported on use: the adapters' seam needs no framework
        from .torch import TorchAdapter

        return TorchAdapter
    if name == "OnnxAdapter":
        from .onnx import OnnxAdapter

        return OnnxAdapter
    raise AttributeError(name)


def _from_path(path: Path, output):
    """The adapter of a model file: ``.onnx`` (or bytes); a TorchScript file or a TensorFlow SavedModel
    is refused, saying how to export it."""
    if path.is_dir():
        if (path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists():
            raise UnsupportedModelError(
                f"{path} is a TensorFlow SavedModel, which actclust does not run: export it to ONNX, e.g. "
                f"python -m tf2onnx.convert --saved-model {path} --output model.onnx, and give model.onnx.")
        raise UnsupportedModelError(f"{path} is a folder, not a model file (.onnx or .keras).")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".ts", ".torchscript", ".jit"):
        raise UnsupportedModelError(
            f"{path} is a PyTorch file: loading it would run its code (pickle) and a TorchScript module calls no "
            "hooks. Build your nn.Module in Python and load its state dict, or export it to ONNX "
            "(torch.onnx.export) and give the .onnx file.")
    if suffix in (".h5", ".pb"):
        raise UnsupportedModelError(f"{path} is a TensorFlow/Keras 2 file: save it as .keras (Keras 3) or export it "
                                    "to ONNX with tf2onnx.")
    if suffix == ".onnx" or not suffix:
        from .onnx import OnnxAdapter

        return OnnxAdapter(path, output)
    raise UnsupportedModelError(f"{path}: actclust reads .onnx and .keras model files; got a {suffix} file.")


def adapt(model, output: Optional[Callable] = None) -> ModelAdapter:
    """The adapter for ``model``: an adapter given as is, or a PyTorch module wrapped in one."""
    if isinstance(model, ModelAdapter):
        if output is not None:
            raise UnsupportedModelError("output= applies to a model, not to a ModelAdapter; give it to the adapter.")
        return model
    torch = sys.modules.get("torch")  # a torch model means torch is imported already
    if torch is not None and isinstance(model, (torch.nn.Module, torch.jit.ScriptFunction)):
        from .torch import TorchAdapter

        return TorchAdapter(model, output)
    onnx = sys.modules.get("onnx")
    if isinstance(model, (bytes, bytearray)) or (onnx is not None and isinstance(model, onnx.ModelProto)):
        from .onnx import OnnxAdapter

        return OnnxAdapter(model, output)
    if isinstance(model, (str, os.PathLike)):
        return _from_path(Path(os.fspath(model)), output)
    raise UnsupportedModelError(
        "actclust explains a torch.nn.Module, a Keras 3 model, an ONNX model (a path, bytes or onnx.ModelProto) or "
        f"a ModelAdapter; got {type(model).__name__}."
    )


def list_layers(model, sample=None, *, reducer="auto"):
    """Names of the model's layers usable as ``layers``, in the model's order.

    Parameters
    ----------
    model : torch.nn.Module, keras.Model, ONNX model (path, bytes, ModelProto) or ModelAdapter
    sample : array, tuple or dict of arrays, optional
        A batch of inputs. When given, one forward pass is run and the result maps each layer
        that ran to a :class:`~actclust.adapters.base.LayerInfo`: its output shape (batch axis
        first; it compares equal to the shape tuple), its ``layout`` and the ``reduction``
        ``reducer`` applies to it (what ``reducer="auto"`` chooses, by default).

    Returns
    -------
    list of str, or dict of str to LayerInfo
    """
    return adapt(model).list_layers(sample, reducer)


def model_fingerprint(model) -> str:
    """SHA-256 over the names, dtypes, shapes and values of the model's weights.

    Wrappers (DataParallel, ``torch.compile``) are looked through, so a wrapped and an
    unwrapped copy of one network have the same fingerprint.
    """
    return adapt(model).fingerprint()
