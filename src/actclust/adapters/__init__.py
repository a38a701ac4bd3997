"""Model adapters: what actclust needs from a model, per framework.

:func:`adapt` picks the adapter for a model without importing a framework the model does not
come from: a framework is only looked at when it is already imported (the model is one of its
objects), or when a path names its file format (``.onnx``, ``.keras``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional

from ..exceptions import DataNotFoundError, UnsupportedModelError
from .base import LayerInfo, ModelAdapter, Runner

__all__ = ["ModelAdapter", "Runner", "LayerInfo", "TorchAdapter", "KerasAdapter", "OnnxAdapter", "adapt",
           "list_layers", "model_fingerprint"]

_LAZY = {"TorchAdapter": ".torch", "KerasAdapter": ".keras", "OnnxAdapter": ".onnx"}


def __getattr__(name):
    if name in _LAZY:  # imported on use: the adapters' seam needs no framework
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)


def adapt(model, output: Optional[Callable] = None) -> ModelAdapter:
    """The adapter for ``model``: an adapter given as is, or a PyTorch module, Keras model or ONNX model
    wrapped in one.

    A path to a ``.keras`` file (str or PathLike) is loaded with ``keras.saving.load_model(path,
    safe_mode=True)``: that deserialises only Keras's own configuration (JSON) and weights, and
    refuses the Python code a ``Lambda`` layer would carry. Custom layers must be registered with
    ``keras.saving.register_keras_serializable`` before loading (or load the model yourself and pass
    it). The loaded model is kept for the next call on the same unchanged file. A path to an
    ``.onnx`` file, its bytes or an ``onnx.ModelProto`` is run with onnxruntime.
    """
    if isinstance(model, ModelAdapter):
        if output is not None:
            raise UnsupportedModelError("output= applies to a model, not to a ModelAdapter; give it to the adapter.")
        return model
    keras = sys.modules.get("keras")  # a Keras model means keras is imported already
    # First: on Keras's PyTorch backend a keras.Model is also a torch.nn.Module.
    if keras is not None and isinstance(model, keras.Model):
        from .keras import KerasAdapter

        return KerasAdapter(model, output)
    torch = sys.modules.get("torch")  # likewise for a torch model
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
        "actclust explains a torch.nn.Module, a Keras 3 model (or a .keras file), an ONNX model (a path, bytes or "
        f"onnx.ModelProto) or a ModelAdapter; got {type(model).__name__}."
    )


def _from_path(path: Path, output):
    """The adapter of a model file (``.onnx``, ``.keras``); a TorchScript file or a TensorFlow SavedModel
    is refused, saying how to export it."""
    if path.is_dir():
        if (path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists():
            raise UnsupportedModelError(
                f"{path} is a TensorFlow SavedModel: it keeps a traced graph, not the Keras layers, so no layer can be "
                "captured. Load the original Keras model and save it as .keras (model.save('m.keras')), or export it "
                f"to ONNX (python -m tf2onnx.convert --saved-model {path} --output model.onnx) and give the .onnx file.")
        raise UnsupportedModelError(f"{path} is a folder, not a model file (.onnx or .keras).")
    suffix = path.suffix.lower()
    if suffix == ".keras":
        from .keras import KerasAdapter

        return KerasAdapter(_load_keras(os.fspath(path)), output)
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


_LOADED: dict = {}  # (path, mtime, size) -> keras model: a path given to every call is loaded once


def _load_keras(path: str):
    from .keras import import_keras

    if not os.path.isfile(path):
        raise DataNotFoundError(f"No Keras model file at {path}.")
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
    if key not in _LOADED:
        import zipfile

        keras = import_keras()  # a missing Keras is said first
        if not zipfile.is_zipfile(path):  # Keras' own message said "File not found" of a file that is there
            raise UnsupportedModelError(f"{path} is not a Keras model file: a .keras file is a zip archive (as "
                                        "model.save('model.keras') writes it), and this one is not (an ONNX model? "
                                        "name it .onnx).")
        try:
            model = keras.saving.load_model(path, compile=False, safe_mode=True)
        except Exception as e:
            raise UnsupportedModelError(
                f"Keras could not load {path} ({type(e).__name__}: {e}). A model with custom layers needs them "
                "registered with keras.saving.register_keras_serializable before loading; or load it yourself "
                "and pass the model."
            ) from e
        _LOADED.clear()  # one file at a time: a model is not kept once another is used
        _LOADED[key] = model
    return _LOADED[key]


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
    if sample is not None and type(sample).__module__.startswith("pandas"):  # a table, taken as fit takes it
        from ..capture.data import Batches  # (the model was given the DataFrame itself: a traceback, an outside check)

        sample = next(iter(Batches(sample, batch_size=max(len(sample), 1), name="sample"))).inputs
    return adapt(model).list_layers(sample, reducer)


def model_fingerprint(model) -> str:
    """SHA-256 over the names, dtypes, shapes and values of the model's weights.

    Wrappers (DataParallel, ``torch.compile``) are looked through, so a wrapped and an
    unwrapped copy of one network have the same fingerprint.
    """
    return adapt(model).fingerprint()
