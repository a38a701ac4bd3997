"""actclust: explain a trained classifier by clustering the activations of its layers.

Method: Liu & Arik, "Explaining Deep Neural Networks using Unsupervised Clustering" (2020).

Importing actclust loads no framework and no analysis module: every public name below is
imported on first use (PEP 562), so ``import actclust`` stays cheap and a saved run can be read,
analysed and served without PyTorch, Keras or onnxruntime installed.
"""

from __future__ import annotations

import importlib

from ._version import __version__

#: public name -> module (relative to this package) that defines it
_PUBLIC = {
    "ActivationClustering": ".explainer", "load": ".explainer",
    "list_layers": ".adapters", "model_fingerprint": ".adapters", "ModelAdapter": ".adapters",
    "adapt": ".adapters", "TorchAdapter": ".adapters", "KerasAdapter": ".adapters", "OnnxAdapter": ".adapters",
    "report": ".views.report",
    "FittedState": ".state", "InputSpec": ".state", "Query": ".state",
    "Explanation": ".analysis.explanation", "Concept": ".analysis.concepts", "Neighbours": ".analysis.retrieval",
    "Clustering": ".clustering", "KMeans": ".clustering",
    "Reducer": ".capture.reduction", "make_reducer": ".capture.reduction",
}
_EXCEPTIONS = (
    "ActClustError", "ParameterError", "NotFittedError", "CaptureError", "UnsupportedModelError", "DataError",
    "InvalidSaveError", "RunExistsError", "DataNotFoundError", "ModelImportError", "IDECTrainingError",
    "MissingDependencyError", "StorageError", "DiskFullError", "StoragePermissionError",
    "ActClustWarning", "ModelMismatchWarning", "ConvergenceWarning", "DistillWarning", "IDECWarning",
    "RenderWarning", "DataWarning", "TrustWarning", "DeviceMemoryWarning", "SearchWarning",
)
_PUBLIC.update({name: ".exceptions" for name in _EXCEPTIONS})
#: public submodules reachable as attributes, e.g. ``actclust.baselines.TrustScore``
_MODULES = {"baselines": ".analysis.baselines", "retrieval": ".analysis.retrieval", "trust": ".analysis.trust",
            "surrogate": ".analysis.surrogate", "datasets": ".datasets", "models": ".models"}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name], __name__)
    else:
        raise AttributeError(f"module 'actclust' has no attribute {name!r}")
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC) | set(_MODULES))
