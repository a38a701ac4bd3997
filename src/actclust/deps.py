"""Optional dependencies: imported where a feature needs them, with an error that says what to install."""

from __future__ import annotations

import importlib

from .exceptions import MissingDependencyError

__all__ = ["require", "EXTRAS"]

#: module -> the extra of actclust that installs it
EXTRAS = {"torch": "torch", "keras": "keras", "onnx": "onnx", "onnxruntime": "onnx", "ray": "ray",
          "fastapi": "study", "uvicorn": "study", "statsmodels": "study"}


def require(module: str, feature: str):
    """The imported ``module``, or :class:`MissingDependencyError` naming ``feature`` and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS.get(module.split(".")[0])
        how = f'pip install "actclust[{extra}]"' if extra else f"pip install {module.split('.')[0]}"
        raise MissingDependencyError(f"{feature} needs {module.split('.')[0]}, which is not installed ({e}); "
                                     f"install it with {how}.") from None
